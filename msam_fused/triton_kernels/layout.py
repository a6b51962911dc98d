"""How one launch reaches every tensor of a bucket: a table of addresses on the device.

Why a table and not flat buffers: the parameters belong to the model and the optimizer keeps
one state tensor per parameter, so flattening would mean copying everything in and out every
step (more memory traffic than the step itself). Instead each launch reads an int64 table
(see ``kernels.py`` for the format) with each tensor's element count and the addresses of its
operands. The table depends only on those addresses and counts, so it is built once and
cached; a step whose tensors sit where they sat last time (the usual case) copies nothing to
the device. A new table is one pinned, asynchronous host-to-device copy: never a sync.

Tensors are read in memory order, so all operands of one parameter must be dense in one and
the same layout (all contiguous, or all channels-last, ...); ``dense_order`` tells.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from msam_fused.triton_kernels.kernels import CHUNK

Record = Sequence[Optional[Tensor]]  # the operands of one tensor; operand 0 gives the numel

_CACHE_SIZE = 64
_cache: OrderedDict = OrderedDict()


@dataclass(frozen=True)
class Launch:
    """What one kernel launch over a list of records needs."""

    table: Tensor
    programs: int
    aligned: bool  # every address is a multiple of 16 bytes


def launches(device: torch.device, groups: Sequence[Sequence[Record]]) -> list[Launch]:
    """One :class:`Launch` per group of records (groups with no elements give 0 programs)."""
    key = (device, tuple(tuple(_record_key(r) for r in group) for group in groups))
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    built = _build(device, key[1])
    _cache[key] = built
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return built


def build(device: torch.device, groups: Sequence[Sequence[Record]]) -> list[Launch]:
    """Like :func:`launches`, without the cache (for tensors that live briefly)."""
    return _build(device, tuple(tuple(_record_key(r) for r in group) for group in groups))


def _record_key(record: Record) -> tuple:
    return (record[0].numel(),) + tuple(0 if t is None else t.data_ptr() for t in record)


def _build(device: torch.device, groups: tuple) -> list[Launch]:
    words: list[int] = []
    spans = []
    for group in groups:
        start = len(words)
        chunks = [(i, c) for i, rec in enumerate(group) for c in range(-(-rec[0] // CHUNK))]
        width = len(group[0]) if group else 0
        records_at = 2 * len(chunks)
        for i, c in chunks:
            words += (records_at + i * width, c)
        for rec in group:
            words += rec
        aligned = all(a % 16 == 0 for rec in group for a in rec[1:])
        spans.append((start, len(words) - start, len(chunks), aligned))
    host = torch.tensor(words or [0], dtype=torch.int64)
    if device.type == "cuda":
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host
    return [Launch(table[start:start + size], programs, aligned)
            for start, size, programs, aligned in spans]


def clear_cache() -> None:
    """Forget every table (tests use this to check that a rebuilt table gives the same result)."""
    _cache.clear()


def dense_order(t: Tensor) -> Optional[tuple]:
    """The strides of ``t`` (ignoring size-1 dims) if its elements fill a block of memory
    without gaps or overlap, in any dim order, else None. Tensors of one shape with equal
    dense orders line up element by element in memory order."""
    strides = tuple(s if n != 1 else 0 for s, n in zip(t.stride(), t.shape))
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(strides, t.shape) if n != 1):
        if stride != expected:
            return None
        expected *= size
    return strides
