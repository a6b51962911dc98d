"""How one launch reaches every tensor of a bucket: a table of addresses on the device.

Why a table and not flat buffers: the parameters belong to the model and the optimizer keeps
one state tensor per parameter, so flattening would mean copying everything in and out every
step (more memory traffic than the step itself). Instead each launch reads an int64 table
(see ``kernels.py`` for the format) with each tensor's element count, the first row of its
partial sums and the addresses of its operands. The table depends only on those, so it is built
once and cached; a step whose tensors sit where they sat last time (the usual case) copies
nothing to the device. A new table is one pinned, asynchronous host-to-device copy: never a sync.

Records whose operands are all 16-byte aligned go to one launch (vector loads), the others to a
second one (scalar loads), so one misaligned view costs only its own tensor the vector loads.

The cache's rules on a GPU (docs/triton.md):

* A table is keyed by its content, not by stream. A hit on a stream other than the one that
  copied it makes that stream wait for the copy's event, and remembers the stream; when the
  table is evicted its memory is marked used by those streams (``record_stream``), so the
  allocator does not hand it out while their kernels may still read it.
* During CUDA graph capture no event is queried or waited on (a capture begins after a
  synchronize: ``torch.cuda.graph`` does one). A table that a captured graph reads is never
  freed, since the graph reads it at every replay; a table built during a capture serves only
  that capture's launch (its upload is a node of that graph, filled only when it replays) and
  its pinned host copy is kept with it.

Tensors are read in memory order, so all operands of one parameter must be dense in one and
the same layout (all contiguous, or all channels-last, ...); ``dense_order`` tells.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from msam_fused.triton_kernels.kernels import CHUNK


class Record(NamedTuple):
    """The operands of one tensor (operand 0 gives the element count) and the first row of its
    partial sums (0 for passes that return none)."""

    first_row: int
    operands: Sequence[Optional[Tensor]]


@dataclass(frozen=True)
class Launch:
    """One kernel launch over some records."""

    table: Tensor
    programs: int
    aligned: bool  # every address of these records is a multiple of 16 bytes


@dataclass
class _Tables:
    launches: list  # per group of records, its launches
    device_words: Tensor
    host_words: Tensor  # kept: a graph that captured the upload copies from it at every replay
    stream: Optional[torch.cuda.Stream] = None  # the stream that copied it
    ready: Optional[torch.cuda.Event] = None    # recorded after the copy
    other_streams: set = field(default_factory=set)
    read_by_graph: bool = False


_CACHE_SIZE = 64
_cache: OrderedDict = OrderedDict()
_graph_tables: list = []  # read by captured graphs: never freed


def segments(numel: int) -> int:
    """How many segments (programs, rows of partial sums) a tensor of ``numel`` elements has."""
    return -(-int(numel) // int(CHUNK))


def launches(device: torch.device, groups: Sequence[Sequence[Record]]) -> list[list[Launch]]:
    """Per group of records, its launches (none for a group without elements)."""
    key = (device, tuple(tuple(_record_key(r) for r in group) for group in groups))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    tables = _cache.get(key)
    if tables is not None:
        _cache.move_to_end(key)
        _note_use(tables, device, capturing)
        return tables.launches
    tables = _build(device, key[1])
    if capturing:
        tables.read_by_graph = True
        _graph_tables.append(tables)
        return tables.launches
    _cache[key] = tables
    while len(_cache) > _CACHE_SIZE:
        _evict(_cache.popitem(last=False)[1])
    return tables.launches


def _note_use(tables: _Tables, device: torch.device, capturing: bool) -> None:
    if device.type != "cuda":
        return
    if capturing:
        tables.read_by_graph = True
        return
    stream = torch.cuda.current_stream(device)
    if stream != tables.stream:
        stream.wait_event(tables.ready)
        tables.other_streams.add(stream)


def _evict(tables: _Tables) -> None:
    if tables.read_by_graph:
        _graph_tables.append(tables)
        return
    for stream in tables.other_streams:
        tables.device_words.record_stream(stream)


def _record_key(record: Record) -> tuple:
    operands = record.operands
    return (operands[0].numel(), record.first_row) + tuple(0 if t is None else t.data_ptr()
                                                           for t in operands)


def _build(device: torch.device, groups: tuple) -> _Tables:
    words: list[int] = []
    spans = []
    for group in groups:
        parts = []
        for aligned in (True, False):
            members = [rec for rec in group if all(a % 16 == 0 for a in rec[2:]) == aligned]
            chunks = [(i, c) for i, rec in enumerate(members) for c in range(segments(rec[0]))]
            if not chunks:
                continue
            start = len(words)
            width = len(members[0])
            records_at = 2 * len(chunks)
            for i, c in chunks:
                words += (records_at + i * width, c)
            for rec in members:
                words += rec
            parts.append((start, len(words) - start, len(chunks), aligned))
        spans.append(parts)
    host = torch.tensor(words or [0], dtype=torch.int64)
    tables = _Tables([], host, host)
    if device.type == "cuda":
        tables.host_words = host.pin_memory()
        tables.device_words = tables.host_words.to(device, non_blocking=True)
        if not torch.cuda.is_current_stream_capturing():
            tables.stream = torch.cuda.current_stream(device)
            tables.ready = torch.cuda.Event()
            tables.ready.record(tables.stream)
    table = tables.device_words
    tables.launches = [[Launch(table[start:start + size], programs, aligned)
                        for start, size, programs, aligned in parts] for parts in spans]
    return tables


def clear_cache() -> None:
    """Forget every table (tests use this to check that a rebuilt table gives the same result)."""
    while _cache:
        _evict(_cache.popitem(last=False)[1])


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
