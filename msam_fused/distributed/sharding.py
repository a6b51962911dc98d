"""Parameters held as DTensor shards (FSDP2's ``fully_shard``): local tensors and the global norm.

The optimizers run their backends on each rank's local shard (``DTensor._local_tensor``: the
same storage, so in-place updates land in the sharded parameter FSDP2 all-gathers). Every
rank then holds a *partial* sum of squares of the ascent direction; :meth:`ShardLayout.sum`
turns it into the global one with a single all-reduce on the device (no host sync), so every
rank perturbs by ``rho / ||x||`` with the norm over the whole model, exactly as unsharded.

A parameter replicated over some mesh dimensions (HSDP's replica dimension, tensor-parallel
norms) is counted once: its partial sum is weighted by ``1 / replicas`` before the one
all-reduce over the whole mesh.

``torch.distributed.tensor`` is not imported here: it costs a second at start-up, and no
parameter can be a DTensor unless someone imported it already.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

NOT_INITIALIZED = ("torch.distributed is not initialised (or its process group was destroyed); "
                   "call torch.distributed.init_process_group() first (torchrun sets the "
                   "environment it reads)")


def is_dtensor(t: Any) -> bool:
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return cls is not None and isinstance(t, cls)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The local shard of a DTensor (sharing its storage), anything else as it is.

    ``_local_tensor`` rather than ``to_local()``: the latter is an autograd Function call,
    a few microseconds per tensor per step; the storage is the same.
    """
    return t._local_tensor if is_dtensor(t) else t


def require_initialized(where: str) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{where}: {NOT_INITIALIZED}")


class RankGroup:
    """Ranks that take every step together: one reduced flag, one reduced norm."""

    def __init__(self, group: Any = None):
        self.group = group  # None: the default (world) group

    def check_alive(self, where: str) -> None:
        """Raise before a step modifies anything if the collectives could not run."""
        require_initialized(where)

    def sum(self, total: Tensor) -> Tensor:
        import torch.distributed as dist

        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def any(self, flag: Tensor) -> Tensor:
        """True on every rank if ``flag`` is non-zero on any rank (non-finite gradients)."""
        import torch.distributed as dist

        reduced = (flag != 0).to(torch.int32)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=self.group)
        return (reduced != 0).to(flag.dtype)


class ShardLayout(RankGroup):
    """The one device mesh an optimizer's DTensor parameters live on."""

    def __init__(self, mesh: Any, group: Any, weights: dict[int, float]):
        super().__init__(group)
        self.mesh = mesh
        self._weights = weights  # id(param) -> 1 / replicas

    def weight(self, p: Tensor) -> float:
        """What a rank's partial sum of squares of ``p`` counts for in the all-reduce."""
        return self._weights[id(p)]


def shard_layout(where: str, params: Iterable[Tensor]) -> Optional[ShardLayout]:
    """The layout of the optimizer's parameters, or ``None`` when none is a DTensor.

    Raises, naming the parameter, when DTensor and plain parameters are mixed, when DTensors
    sit on different meshes, or when a parameter is 0-d or has a ``Partial`` placement (0-d
    state is always plain: the step counter and the perturbation coefficient).
    """
    params = list(params)
    sharded = [is_dtensor(p) for p in params]
    if not any(sharded):
        return None
    if not all(sharded):
        i = sharded.index(False)
        raise ValueError(
            f"{where}: parameter {i} (shape {tuple(params[i].shape)}) is a plain tensor while "
            "others are DTensors (FSDP2 shards); one optimizer cannot mix them, because the "
            "global norm would count the plain one once per rank. Shard it too (fully_shard "
            "the module that owns it) or give it its own optimizer")
    require_initialized(where)
    mesh = params[0].device_mesh
    weights = {}
    for i, p in enumerate(params):
        if p.dim() == 0:
            raise ValueError(f"{where}: parameter {i} is a 0-d DTensor; use shape (1,) (FSDP2's "
                             "fully_shard rejects scalars too)")
        if p.device_mesh != mesh:
            raise ValueError(f"{where}: parameter {i} (shape {tuple(p.shape)}) is on device mesh "
                             f"{p.device_mesh}, parameter 0 on {mesh}; all parameters of one "
                             "optimizer must share one mesh")
        replicas = 1
        for dim, placement in enumerate(p.placements):
            if placement.is_partial():
                raise ValueError(f"{where}: parameter {i} (shape {tuple(p.shape)}) has a Partial "
                                 "placement; parameters must be sharded or replicated")
            if placement.is_replicate():
                replicas *= mesh.size(dim)
        weights[id(p)] = 1.0 / replicas
    return ShardLayout(mesh, _mesh_group(where, mesh), weights)


def _mesh_group(where: str, mesh: Any) -> Any:
    import torch.distributed as dist

    if mesh.ndim == 1:
        return mesh.get_group()
    if math.prod(mesh.shape) == dist.get_world_size():
        return None  # the mesh spans the world: the default group reduces over all of it
    raise ValueError(f"{where}: parameters on a {mesh.ndim}-D device mesh that spans "
                     f"{math.prod(mesh.shape)} of {dist.get_world_size()} ranks are not supported; "
                     "use a 1-D mesh or one that spans all ranks")


def check_grad(where: str, what: str, p: Tensor) -> None:
    """A DTensor parameter's gradient must be sharded the same way (its local shard is used)."""
    g = p.grad
    if g is None:
        return
    if not is_dtensor(g) or g.placements != p.placements or g.device_mesh != p.device_mesh:
        layout = g.placements if is_dtensor(g) else "a plain tensor"
        raise RuntimeError(f"{where}: {what} is a DTensor with placements {p.placements} but its "
                           f"gradient is {layout}; the gradient must be sharded like the parameter")


def check_state_layout(where: str, what: str, key: str, value: Tensor, p: Tensor) -> None:
    """Loaded state that has the parameter's shape must also have its sharding."""
    if value.dim() == 0:
        return  # step counters and the perturbation coefficient are plain, replicated scalars
    if is_dtensor(p) != is_dtensor(value):
        kinds = ("a DTensor", "a plain tensor") if is_dtensor(p) else ("a plain tensor", "a DTensor")
        raise ValueError(
            f"{where}: {what} is {kinds[0]} but its saved state '{key}' is {kinds[1]}; load sharded "
            "state with torch.distributed.checkpoint (set_optimizer_state_dict converts a full "
            "state dict to shards)")
    if is_dtensor(p) and (value.placements != p.placements or value.device_mesh != p.device_mesh):
        raise ValueError(f"{where}: saved state '{key}' of {what} has placements {value.placements}, "
                         f"the parameter {p.placements}; load it with torch.distributed.checkpoint")


def zeros_like_param(p: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """Fresh zero state: shaped, strided and (for DTensors) sharded like ``p`` when it has
    ``p``'s shape, so kernels read state and parameter with one layout (channels-last
    weights keep channels-last state); plain otherwise (0-d)."""
    if tuple(shape) == tuple(p.shape):
        fmt = torch.contiguous_format if is_dtensor(p) else torch.preserve_format
        return torch.zeros_like(p, dtype=dtype, memory_format=fmt)
    return torch.zeros(shape, dtype=dtype, device=p.device)
