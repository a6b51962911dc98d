"""Non-finite gradients: detect on the device, then skip the whole step or raise.

Detection reads every gradient once (on a GPU ``_foreach_norm`` with ``ord=inf``, on the CPU
each tensor's min and max: finite exactly when all entries are), so ``nonfinite="skip"`` costs one extra read of the gradients and no host
sync. Under an AMP ``GradScaler`` the scaler has already done that check and hands its
``found_inf`` to the optimizer, so no second check runs.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch
from torch import Tensor


def nonfinite_flag(grads: Sequence[Tensor], device: torch.device) -> Tensor:
    """A 0-d bool tensor on ``device``: True if any gradient holds an inf or NaN."""
    by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    for g in grads:
        if g.numel():  # the inf-norm of an empty tensor (e.g. an empty FSDP2 shard) is an error
            by_device[g.device].append(g)
    flag = torch.zeros((), dtype=torch.bool, device=device)
    for where, tensors in by_device.items():
        if where.type == "cpu":
            # The CPU inf-norm is a scalar loop (~1 GB/s, 6x slower than a vectorised min and
            # max); the least and the greatest entry are both finite exactly when all are.
            extremes = [e for t in tensors for e in torch.aminmax(t)]
        else:
            extremes = torch._foreach_norm(tensors, float("inf"))  # one launch per many tensors
        bad = ~torch.stack([e.isfinite() for e in extremes]).all()
        flag = flag | bad.to(device, non_blocking=True)
    return flag


def step_skip_flag(policy: str, where: str, grads: Sequence[Tensor], labels: Sequence[str],
                   device: torch.device, scaler_found_inf: Optional[Tensor],
                   all_ranks=None) -> Optional[Tensor]:
    """The device flag that makes the step a no-op, or None when nothing needs checking.

    ``policy="raise"`` reads the flag on the host and raises, naming the offending tensors,
    before anything is modified. ``all_ranks`` (a ``msam_fused.distributed.sharding.RankGroup``)
    is given when the ranks see different gradients (shards, a local SAM ascent): the flag is
    then all-reduced, so that every rank skips, or raises, together.
    """
    if scaler_found_inf is not None:
        return scaler_found_inf if all_ranks is None else all_ranks.any(scaler_found_inf)
    if not grads:
        return None
    flag = nonfinite_flag(grads, device)
    if all_ranks is not None:
        flag = all_ranks.any(flag)
    if policy == "raise":
        if bool(flag):
            raise_nonfinite(where, list(zip(grads, labels)))
        return None
    return flag


def raise_nonfinite(where: str, labelled: Sequence[tuple]) -> None:
    """Raise for a step whose (gradient, label) pairs hold an inf or NaN, naming them."""
    bad = [str(label) for g, label in labelled if not bool(torch.isfinite(g).all())]
    raise FloatingPointError(
        f"{where}: non-finite gradient (inf or NaN) in "
        f"{', '.join(bad[:5]) or 'the gradients of another rank'}"
        + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        + "; nothing was changed (nonfinite='skip' would skip the step instead)")


class SkippedStepCount:
    """Mixin for the optimizers: counts skipped steps on the device (``self._skipped_steps``,
    None until the first checked step), so that counting never waits for the device."""

    _skipped_steps: Optional[Tensor]

    def _count_skipped(self, found_inf: Optional[Tensor]) -> None:
        if found_inf is None:
            return
        if self._skipped_steps is None:
            self._skipped_steps = (found_inf != 0).to(torch.int64)
        else:
            self._skipped_steps.add_((found_inf != 0).to(self._skipped_steps.device))

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for non-finite gradients (reads the device)."""
        return 0 if self._skipped_steps is None else int(self._skipped_steps)
