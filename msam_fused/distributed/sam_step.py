"""SAM's two passes under DDP and FSDP2, done right: the ascent, no_sync and BatchNorm."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from msam_fused.batchnorm import disable_running_stats
from msam_fused.distributed.sharding import is_dtensor

#: "local": each rank ascends along its own batch's gradient (no all-reduce in the first pass);
#: "global": the first pass's gradients are all-reduced, every rank ascends along the same ``e``.
ASCENTS = ("local", "global")
DEFAULT_ASCENT = "local"


def sam_step(model: nn.Module, optimizer, compute_loss: Callable[[], Tensor], *,
             ascent: str = DEFAULT_ASCENT, scaler: Any = None,
             max_grad_norm: Optional[float] = None) -> Tensor:
    """One full SAM step: two forward/backward passes, the ascent, the base step, zero_grad.

    Args:
        model: the module ``compute_loss`` runs: a ``DistributedDataParallel`` wrapper, an
            FSDP2 (``fully_shard``) module, or a plain module in a single process.
        optimizer: a :class:`msam_fused.SAM`.
        compute_loss: runs the forward pass on this rank's batch and returns the loss. It is
            called twice: at ``w`` and at ``w + e``; the second time BatchNorm layers use
            batch statistics without updating their running averages.
        ascent: ``"local"`` (default) or ``"global"``; matters only under DDP. Local: the
            first forward *and* backward run under ``model.no_sync()``, so each rank ascends
            along the gradient of its own batch, as the SAM paper's per-accelerator
            ("m-sharpness") ascent, and the step costs one gradient all-reduce, like SGD.
            Global: the first gradients are all-reduced too, every rank ascends along the same
            direction, and the run equals one process on the concatenated batch. Under FSDP2
            parameters are shards, so only ``"global"`` is possible.
        scaler: an AMP ``GradScaler`` (optional): losses are scaled, ``scaler.step`` and
            ``scaler.update`` finish the step.
        max_grad_norm: clip the second pass's gradients (the ones the base optimizer uses)
            to this global norm, unscaling them first under a scaler.

    Returns the first pass's loss (detached). Every rank must call it in the same order.
    """
    if ascent not in ASCENTS:
        raise ValueError(f"sam_step: ascent must be one of {ASCENTS}, got {ascent!r}")
    local_group, first_pass = _first_pass_context(model, ascent)
    with first_pass:
        loss = compute_loss()
        _backward(loss, scaler)
    optimizer.first_step(zero_grad=True, local_ascent_group=local_group)
    with disable_running_stats(model):
        _backward(compute_loss(), scaler)
    if max_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.second_step()
    optimizer.zero_grad()
    return loss.detach()


def _backward(loss: Tensor, scaler: Any) -> None:
    (loss if scaler is None else scaler.scale(loss)).backward()


def _first_pass_context(model: nn.Module, ascent: str) -> tuple[Any, Any]:
    """(the process group of a local ascent or None, the context of the first pass)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        if ascent == "local":
            return model.process_group, model.no_sync()
        return None, nullcontext()
    if any(is_dtensor(p) for p in model.parameters()):
        if ascent == "local":
            raise ValueError("sam_step: ascent='local' needs whole parameters on every rank, but "
                             "this model's parameters are DTensor shards (FSDP2); use "
                             "ascent='global'")
        return None, nullcontext()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            f"sam_step: torch.distributed runs {dist.get_world_size()} ranks but the model is "
            "neither DistributedDataParallel nor fully_shard-ed, so nothing would average the "
            "gradients and the ranks would drift apart; wrap it in DistributedDataParallel")
    return None, nullcontext()
