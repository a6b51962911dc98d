"""Non-finite gradients: skip the whole step (on the device) or raise.

Detection costs no pass of its own: every backend's read-only pass returns a non-finite marker
per segment beside its sums of squares (docs/design.md, "The step contract"), so a step's skip
flag comes with its norm. SAM checks its second gradients with the same pass. Under an AMP
``GradScaler`` the scaler has already done that check and hands its ``found_inf`` to the
optimizer.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


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
