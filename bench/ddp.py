"""torchrun / DDP wiring for the benchmark scripts, in plain ``torch.distributed``.

Launch with torchrun; every process reads its place from the environment torchrun sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). Without torchrun everything here is a no-op.

SAM's two passes under DDP (local or global ascent, ``no_sync`` around the first forward and
backward) are the library's :func:`msam_fused.distributed.sam_step`, called by
``bench.optimizers.train_step``. Sharded state (FSDP2) would replace :func:`wrap` with
``fully_shard`` and the checkpoints with ``msam_fused.distributed.save_checkpoint``; the
scripts do not offer it yet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from bench.data import Shard


@dataclass(frozen=True)
class Process:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world)


def start(device: str) -> Process:
    """Join the process group torchrun set up (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)
    if world == 1:
        return Process(0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Process(rank, world, device)


def stop(proc: Process) -> None:
    if proc.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, proc: Process, sync_bn: bool) -> nn.Module:
    """DDP around the model when there are several processes (SyncBatchNorm if asked)."""
    if proc.world == 1:
        return model
    if sync_bn:
        if proc.device.type != "cuda":
            raise ValueError("--sync-bn: SyncBatchNorm runs only on CUDA devices (torch's limit); "
                             "drop --sync-bn on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)


def all_sum(values: torch.Tensor, proc: Process) -> torch.Tensor:
    if proc.world > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def all_gather(obj, proc: Process) -> list:
    """Every rank's ``obj``, in rank order (a one-element list without DDP)."""
    if proc.world == 1:
        return [obj]
    out = [None] * proc.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, proc: Process):
    """Rank 0's ``obj`` on every rank."""
    if proc.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(proc: Process) -> None:
    if proc.world > 1:
        dist.barrier()
