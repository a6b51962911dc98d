"""Check that DDP replicas are bit-identical (a debugging aid: it broadcasts every tensor)."""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from msam_fused.distributed.sharding import is_dtensor, require_initialized


def check_replicas_identical(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                             *, group: Any = None) -> None:
    """Raise ``RuntimeError`` naming the tensors that differ, bit for bit, from rank 0's.

    Compares the parameters of ``model`` and every tensor in the optimizer's state. Under DDP
    they must agree exactly: the gradients are all-reduced and the step is deterministic.
    Buffers (BatchNorm statistics) are not compared: each rank updates its own in the forward
    pass, and DDP broadcasts rank 0's at the start of the next forward, so they differ
    between steps by design. Every rank must call it (it broadcasts each tensor from rank 0).
    """
    import torch.distributed as dist

    require_initialized("check_replicas_identical")
    src = dist.get_global_rank(group, 0) if group is not None else 0
    tensors = list(_named_tensors(model, optimizer))
    for name, t in tensors:
        if is_dtensor(t):
            raise ValueError(f"check_replicas_identical: {name} is a DTensor shard; shards differ "
                             "between ranks by design (this check is for DDP replicas)")
    # The same tensors in the same order on every rank, or the broadcasts below would not pair up.
    layout = [(name, tuple(t.shape), str(t.dtype)) for name, t in tensors]
    layouts = [None] * dist.get_world_size(group)
    dist.all_gather_object(layouts, layout, group=group)
    if any(other != layouts[0] for other in layouts):
        raise RuntimeError("check_replicas_identical: the ranks hold different sets of tensors "
                           "(parameters, buffers or optimizer state)")
    differing = []
    for name, t in tensors:
        mine = t.detach().reshape(-1).contiguous().view(torch.uint8)
        theirs = mine.clone()
        dist.broadcast(theirs, src=src, group=group)
        if not torch.equal(mine, theirs):
            differing.append(name)
    count = torch.tensor([len(differing)], dtype=torch.int64, device=_device(model))
    dist.all_reduce(count, group=group)
    if int(count):
        mine = ", ".join(differing[:5]) + (f" and {len(differing) - 5} more" if len(differing) > 5 else "")
        raise RuntimeError(f"check_replicas_identical: rank {dist.get_rank()} differs from rank "
                           f"{src} in {mine or 'nothing (another rank differs)'}")


def _named_tensors(model: nn.Module, optimizer) -> Iterator[tuple[str, Tensor]]:
    yield from model.named_parameters()
    if optimizer is None:
        return
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for key, value in sorted(state.items()):
            if isinstance(value, Tensor):
                yield f"optimizer state '{key}' of {names.get(id(p), 'a parameter')}", value


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
