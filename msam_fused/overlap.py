"""MSAM's step overlapped with the backward pass: :meth:`msam_fused.MSAM.overlap_backward`.

The plain step (``momentum_ascent.py``) cannot start before backward ends: the new
perturbation needs the global norm of the new momentum ``v' = mu v + g + wd p``, which needs
every gradient, so its read-only pass reads ``p, g, v`` before the write pass reads them again.
Here the read-only pass runs *during* backward, on groups of parameters (chunks, ~``bucket_cap_mb``
each, taken in reverse order like DDP's buckets) as soon as all their gradients are ready
(``register_post_accumulate_grad_hook``; under DDP in its communication hook, after the
all-reduce). After backward only ``perturbation_coef`` and one pass per bucket remain:

* float32/float64 parameters on a backend with the ``"stash"`` capability
  (``msam_sgd_overlap_stash_``): the hidden pass writes ``v = v'`` and moves the old momentum
  into the gradient's memory (the gradient is consumed); the exposed pass
  (``msam_sgd_overlap_finish_``) reads ``p, v', v_old`` and writes ``p``: 4 passes. A skipped
  step puts ``v_old`` back.
* otherwise (bf16/fp16 parameters have fp32 momenta, which their gradients cannot hold): the
  hidden pass is the plain read-only pass (``msam_sgd_partials``) and the exposed pass the plain
  write pass: 5 passes.

Every hidden pass returns per-segment partial sums; they are concatenated in tensor order and
handed to step(), which folds them with ``sum_segment_partials`` as it folds its own pass's,
so the norm, and the whole trajectory, is bit for bit that of the plain step.

The optimizer is reached only through its public interface (``param_groups``, ``state``,
``layout``, ``hyper``, ``refresh_hypers``, ``norm_dtype``, ``ensure_state``, ``check_param``,
``attach_overlap`` / ``detach_overlap`` / ``overlap_handle``, ``in_unperturbed``,
``is_sharded``).
A GradScaler is used through ``scale()`` (its current scale as a device tensor, without the
host read of ``get_scale()``), except for one unavoidable private write: the end of backward
records the unscale in ``_per_optimizer_states`` the way ``GradScaler.unscale_`` does (which
cannot run on consumed gradients), so that ``scaler.step`` and ``scaler.update`` work unchanged.

Between backward and ``step()`` each consumed ``p.grad`` is a :class:`ConsumedGradient`, which
raises when anything uses it (clipping, logging, a GradScaler's unscale, a second backward);
``step()`` leaves ``p.grad`` None and ``zero_grad()`` undoes the hidden pass.
"""

from __future__ import annotations

import itertools
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from msam_fused import backends

STASH_DTYPES = (torch.float32, torch.float64)
DEFAULT_BUCKET_CAP_MB = 25.0

CONSUMED = (
    "this gradient was consumed by MSAM's update, which ran during backward "
    "(MSAM.overlap_backward); it cannot be read or changed until step(), which leaves it None. "
    "Clipping or otherwise editing gradients between backward and step() is not possible in this "
    "mode; a GradScaler must be handed over (overlap_backward(..., scaler=scaler)); to accumulate "
    "gradients over several backward passes, run all but the last inside `with overlap.paused():`; "
    "zero_grad() discards the update. See docs/overlap.md")

PENDING = (
    "a backward pass already ran MSAM's overlapped update, and step() has not applied it; call "
    "step() (or zero_grad() to discard it) first. To accumulate gradients over several backward "
    "passes, run all but the last inside `with overlap.paused():` (under DDP: ddp_model.no_sync()); "
    "a backward inside the backward (reentrant activation checkpointing) is not supported: use "
    "torch.utils.checkpoint(..., use_reentrant=False)")


class ConsumedGradient(torch.Tensor):
    """Stands in for a gradient that the overlapped update consumed: same shape, dtype and
    device, no storage; every operation on it raises, saying why."""

    # Reading its dtype, shape or device must not go through __torch_function__ (slow).
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, param: Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, param.shape, strides=param.stride(),
                                                   dtype=param.dtype, device=param.device)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func}: {CONSUMED}")

    def __repr__(self) -> str:
        return f"ConsumedGradient(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


@dataclass
class _Bucket:
    """The parameters of one bucket of the plain step: one param group on one device in one
    dtype, in group order (row ``r`` is ``params[r]``)."""

    key: tuple  # (group index, device, dtype), the plain step's bucket key
    group: dict
    params: list
    group_indices: list  # where each parameter is in its group (for messages)
    backend: Any
    stashes: bool  # the hidden pass writes (float32/float64 parameters, "stash" backends)
    starts: list   # where row r's partial sums begin when every row takes part
    counts: list
    # This backward's pass:
    partials: Optional[Tensor] = None  # [segments, 2] float64, rows in group order
    grads: list = field(default_factory=list)  # per row: what the step reads (stash or gradient)
    done: list = field(default_factory=list)
    hypers: Optional[tuple] = None  # (momentum, weight_decay) the hidden pass used
    sums: Optional[tuple] = None    # (sum of squares, non-finite flag)
    ready: Optional[tuple] = None   # (grads or stashes, partials, stashed) of the present rows
    indices: dict = field(default_factory=dict)  # segment_rows' (index tensor, its host source)

    def reset(self) -> None:
        total = self.starts[-1] + self.counts[-1] if self.params else 0
        device = self.params[0].device
        self.partials = torch.zeros((total, 2), dtype=torch.float64, device=device)
        self.grads = [None] * len(self.params)
        self.done = [False] * len(self.params)
        self.hypers = self.sums = self.ready = None

    def segment_rows(self, rows: list) -> Tensor | slice:
        """Where the partial sums of ``rows`` (ascending) go in ``partials``: a slice, or an
        index tensor made once per set of rows (an upload from the host would wait for the
        device, so it must not happen every step)."""
        if rows == list(range(rows[0], rows[-1] + 1)):
            return slice(self.starts[rows[0]], self.starts[rows[-1]] + self.counts[rows[-1]])
        key = tuple(rows)
        if key not in self.indices:
            index = torch.cat([torch.arange(self.starts[r], self.starts[r] + self.counts[r]) for r in rows])
            device = self.params[0].device
            if device.type == "cuda":
                # This runs inside backward: a copy from pageable memory would block the host.
                # The pinned source stays referenced beside its copy until the copy is done.
                index = index.pin_memory()
            self.indices[key] = (index.to(device, non_blocking=True), index)
        return self.indices[key][0]


@dataclass
class _Chunk:
    """Rows of one bucket whose hidden pass runs once all their gradients are ready."""

    bucket: _Bucket
    rows: list  # ascending
    waiting: int = 0


class OverlappedBackward:
    """The handle :meth:`msam_fused.MSAM.overlap_backward` returns: hooks that run MSAM's first
    pass during backward. ``remove()`` stops it; ``paused()`` lets gradients accumulate."""

    def __init__(self, optimizer, model: Optional[torch.nn.Module] = None, *, scaler=None,
                 bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB):
        where = f"{type(optimizer).__name__}.overlap_backward"
        self.optimizer = optimizer
        self.scaler = scaler
        self._ddp = _check_setup(where, optimizer, model, scaler, bucket_cap_mb)
        self._buckets = self._plan_buckets()
        self._row_of = {id(p): (b, r) for b in self._buckets.values() for r, p in enumerate(b.params)}
        self._chunks = {} if self._ddp is not None else _chunks(self._buckets, bucket_cap_mb)
        self._lock = threading.Lock()
        self._phase = "idle"        # idle -> running (a backward started) -> ready (it ended)
        self._graph_task = None     # the backward the running phase belongs to
        self._skipped_task = None   # a backward that runs no pass (under DDP's no_sync)
        self._paused = 0
        self._grad_scale: Optional[Tensor] = None
        self._placeholders: dict[int, ConsumedGradient] = {}
        self._flag: Optional[Tensor] = None  # any gradient inf/NaN: set at the end of backward
        self._norm_dtype = optimizer.norm_dtype()
        self._requeued = False
        optimizer.attach_overlap(self)
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient)
                         for b in self._buckets.values() for p in b.params if p.requires_grad]
        if self._ddp is not None:
            self._ddp.register_comm_hook(self._ddp.process_group, self._comm_hook)

    # ---------------------------------------------------------------------------- public
    def remove(self) -> None:
        """Stop overlapping: later steps are plain steps. An update a backward already ran is
        undone (as by ``zero_grad()``). Under DDP the communication hook stays registered (DDP
        cannot unregister one) and does what DDP's default one does."""
        with self._lock:
            self._discard()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.optimizer.detach_overlap(self)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Backward passes inside leave gradients in ``p.grad`` to accumulate, as without
        overlap; the next backward outside runs the pass on the accumulated gradients."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @property
    def pending(self) -> bool:
        """A backward ran (or is running) the hidden pass, and no step() applied it yet."""
        return self._phase != "idle"

    # ------------------------------------------------------------ what the optimizer calls
    def check_idle(self, where: str) -> None:
        if self._phase != "idle":
            raise RuntimeError(f"{where}: {PENDING}")

    def take(self, where: str) -> Optional[dict]:
        """For step(): what a finished backward prepared, per plain-step bucket key
        ``(group index, device, dtype)``: ``(grads, partials, stashed)`` of the rows the plain
        step takes (with ``stashed``, ``grads`` are the old momenta). None if no backward ran
        since the last step (a plain step then runs)."""
        if self._phase == "idle":
            return None
        if self._phase == "running":
            raise RuntimeError(f"{where}: the last backward started MSAM's overlapped update but did "
                               "not finish (did it raise?); call zero_grad() to discard it")
        for b in self._buckets.values():
            if b.hypers is not None and b.hypers != _hypers(b.group):
                self.discard()
                raise ValueError(
                    f"{where}: momentum or weight_decay of a param group changed between backward and "
                    f"step() (from {b.hypers} to {_hypers(b.group)}), but the overlapped update used them "
                    "during backward; change them before backward (e.g. step schedulers after "
                    "opt.step()). This step's gradients were discarded; nothing was changed")
        return {key: b.ready for key, b in self._buckets.items() if b.ready is not None}

    @property
    def grad_scale(self) -> Optional[Tensor]:
        """What the hidden passes divided the gradients by (a GradScaler's scale), or None."""
        return self._grad_scale

    def nonfinite_groups(self) -> list:
        """The param groups whose gradients held inf/NaN in the last backward (reads the device)."""
        return sorted({b.key[0] for b in self._buckets.values() if b.sums and bool(b.sums[1])})

    def release(self) -> None:
        """After the step: the consumed gradients are gone (``p.grad`` None)."""
        with self._lock:
            self._clear_gradients()
            self._phase = "idle"

    def discard(self) -> None:
        """Undo what backward did (``zero_grad()``): the stashed momenta go back."""
        with self._lock:
            self._discard()

    # ------------------------------------------------------------------------ the layout
    def _plan_buckets(self) -> dict:
        buckets: dict[tuple, _Bucket] = {}
        for plain in self.optimizer.layout():
            stashes = plain.dtype in STASH_DTYPES and backends.STASH in plain.backend.capabilities
            counts = [plain.backend.segment_count(p.numel(), p.device) for p in plain.sources]
            starts = [0, *itertools.accumulate(counts)][:-1]
            key = (plain.group_index, plain.device, plain.dtype)
            buckets[key] = _Bucket(key, plain.group, plain.sources, plain.indices, plain.backend, stashes,
                                   starts, counts)
        return buckets

    def _present_rows(self, b: _Bucket) -> list:
        """The rows the plain step would take: a gradient this step, or state."""
        return [r for r, p in enumerate(b.params) if b.grads[r] is not None or self.optimizer.state.get(p)]

    # ------------------------------------------------------------------- during backward
    def _on_gradient(self, p: Tensor) -> None:
        """Post-accumulate-grad hook: runs a chunk's pass once all its gradients are in."""
        if self._paused or self.optimizer.in_unperturbed:
            return
        task = torch._C._current_graph_task_id()
        if task == self._skipped_task:
            return
        if self._ddp is not None and not self._ddp.require_backward_grad_sync:
            self._skipped_task = task  # DDP's no_sync(): gradients accumulate, nothing is reduced
            return
        with self._lock:
            self._begin(task)
            if self._ddp is not None:
                return  # the passes run on the reduced gradients, in the communication hook
            chunk = self._chunks[id(p)]
            chunk.waiting -= 1
            if chunk.waiting == 0:
                b = chunk.bucket
                self._run_pass(b, chunk.rows, [b.params[r].grad for r in chunk.rows])

    def _begin(self, task: int) -> None:
        if self._phase == "running" and task == self._graph_task:
            return
        if self._phase != "idle":
            raise RuntimeError(f"{type(self.optimizer).__name__}: {PENDING}")
        self._phase, self._graph_task = "running", task
        for b in self._buckets.values():
            b.reset()
        for chunk in self._chunks.values():
            chunk.waiting = len(chunk.rows)
        self._grad_scale = None
        if self.scaler is not None and self.scaler.is_enabled():
            # the scale as a device tensor (1 * scale, exact); get_scale() would read it on the host
            device = next(iter(self._buckets.values())).params[0].device
            self._grad_scale = self.scaler.scale(torch.ones((), dtype=torch.float32, device=device))
        self._norm_dtype = self.optimizer.norm_dtype()
        self.optimizer.refresh_hypers(f"{type(self.optimizer).__name__} (overlapped step, during backward)")
        # Runs after every hook and after DDP's own end-of-backward callback (see _end).
        torch.autograd.Variable._execution_engine.queue_callback(self._end)

    def _comm_hook(self, process_group, bucket):  # no annotations: DDP checks them as objects
        """DDP's own reduction (scale by 1 / world size, as its built-in reduction does, then
        sum over ranks), then the hidden pass on this bucket's reduced gradients."""
        import torch.distributed as dist

        buffer = bucket.buffer()
        buffer.mul_(1.0 / dist.get_world_size(process_group))
        reduced = dist.all_reduce(buffer, group=process_group, async_op=True).get_future()
        if self._phase != "running" or self.optimizer.overlap_handle is not self:
            return reduced.then(lambda fut: fut.value()[0])  # removed, paused, or under no_sync
        return reduced.then(lambda fut: self._after_all_reduce(bucket, fut.value()[0]))

    def _after_all_reduce(self, bucket, buffer: Tensor) -> Tensor:
        rows_of: dict[tuple, list] = {}  # DDP's bucket may span several of ours
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            if id(p) in self._row_of:
                b, r = self._row_of[id(p)]
                rows_of.setdefault(b.key, []).append((r, g))
        with self._lock:
            for key, pairs in rows_of.items():
                pairs.sort(key=lambda pair: pair[0])
                self._run_pass(self._buckets[key], [r for r, _ in pairs], [g for _, g in pairs])
        return buffer

    @torch.no_grad()  # DDP's communication hook runs with grad mode on
    def _run_pass(self, b: _Bucket, rows: list, grads: list) -> None:
        """The hidden pass over some rows of a bucket; a row without a gradient only adds its
        momentum to the norm. Checks everything first, so a bad gradient changes nothing."""
        opt = self.optimizer
        where = f"{type(opt).__name__} (overlapped step, during backward)"
        for r in rows:
            opt.check_param(where, b.key[0], b.group_indices[r], b.params[r])
        if b.hypers is None:
            b.hypers = _hypers(b.group)
        with_grad = [(r, g) for r, g in zip(rows, grads) if g is not None]
        without = [r for r, g in zip(rows, grads) if g is None and opt.state.get(b.params[r])]
        for r, _ in with_grad:
            opt.ensure_state(b.params[r], b.group)
        device = b.params[0].device
        common = dict(hyper=opt.hyper(b.group, device), norm_dtype=self._norm_dtype,
                      grad_scale=None if self._grad_scale is None
                      else self._grad_scale.to(device, non_blocking=True))
        if with_grad:
            idx = [r for r, _ in with_grad]
            params, gs = [b.params[r] for r in idx], [g for _, g in with_grad]
            momenta = [opt.state[p]["momentum_buffer"] for p in params]
            if b.stashes:
                partials = b.backend.msam_sgd_overlap_stash_(params, gs, momenta, **common)
            else:
                partials = b.backend.msam_sgd_partials(params, gs, momenta, _masters(opt, params), **common)
            b.partials[b.segment_rows(idx)] = partials
            for r, g in with_grad:
                b.grads[r], b.done[r] = g, True
        if without:
            params = [b.params[r] for r in without]
            b.partials[b.segment_rows(without)] = b.backend.msam_sgd_partials(
                params, [None] * len(params), [opt.state[p]["momentum_buffer"] for p in params],
                _masters(opt, params), **common)
            for r in without:
                b.done[r] = True

    def _end(self) -> None:
        """Engine callback at the end of backward: passes for rows whose chunk never completed
        (parameters without a gradient), the norms, the gradients swapped for placeholders."""
        if self._ddp is not None and not self._requeued:
            # DDP writes the reduced gradients into p.grad in its own end-of-backward callback,
            # queued during backward, so after this one: go to the back of the queue once.
            self._requeued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end)
            return
        self._requeued = False
        with self._lock:
            if self._phase != "running":
                return
            flag = None
            for b in self._buckets.values():
                rows = [r for r in range(len(b.params)) if not b.done[r]]
                if rows:
                    self._run_pass(b, rows, [b.params[r].grad for r in rows])
                present = self._present_rows(b)
                if not present:
                    continue
                partials = b.partials
                if len(present) != len(b.params):  # skip the segments of absent rows
                    partials = b.partials[b.segment_rows(present)]
                b.sums = b.backend.sum_segment_partials(partials, self._norm_dtype)
                flag = b.sums[1] if flag is None else flag | b.sums[1].to(flag.device, non_blocking=True)
                b.ready = ([b.grads[r] for r in present], partials, b.stashes)
                for r in present:
                    if b.grads[r] is not None:
                        b.params[r].grad = self._placeholder(b.params[r])
            self._flag = flag
            self._hand_flag_to_scaler()
            self._phase = "ready"

    def _placeholder(self, p: Tensor) -> ConsumedGradient:
        placeholder = self._placeholders.get(id(p))
        if placeholder is None:
            placeholder = self._placeholders[id(p)] = ConsumedGradient(p)
        return placeholder

    def _hand_flag_to_scaler(self) -> None:
        """What ``scaler.unscale_(opt)`` would have recorded: the gradients are unscaled (the
        hidden pass divided by the scale) and whether any was inf/NaN. ``scaler.step(opt)``
        then hands that flag to step(), and ``scaler.update()`` adjusts the scale by it."""
        if self.scaler is None or not self.scaler.is_enabled() or self._grad_scale is None or self._flag is None:
            return
        from torch.amp.grad_scaler import OptState

        state = self.scaler._per_optimizer_states[id(self.optimizer)]
        device = self._grad_scale.device
        state["found_inf_per_device"] = {device: self._flag.to(device, torch.float32, non_blocking=True)}
        state["stage"] = OptState.UNSCALED

    # --------------------------------------------------------------------- end of update
    def _clear_gradients(self) -> None:
        for b in self._buckets.values():
            for r, p in enumerate(b.params):
                if b.grads[r] is not None:
                    p.grad = None
            b.grads = [None] * len(b.params)
            b.partials = b.sums = b.ready = None

    def _discard(self) -> None:
        if self._phase == "idle":
            return
        for b in self._buckets.values():
            if b.stashes:
                rows = [r for r in range(len(b.params)) if b.grads[r] is not None]
                if rows:
                    momenta = [self.optimizer.state[b.params[r]]["momentum_buffer"] for r in rows]
                    torch._foreach_copy_(momenta, [b.grads[r] for r in rows])
        self._clear_gradients()
        self._phase = "idle"


def _hypers(group: dict) -> tuple:
    return (group["momentum"], group["weight_decay"])


def _chunks(buckets: dict, bucket_cap_mb: float) -> dict:
    """Each parameter's chunk: rows of one bucket, taken from its end (backward produces the
    last layers' gradients first), ~bucket_cap_mb of parameters each. Parameters that do not
    require gradients get none: their rows are handled at the end of backward."""
    cap = bucket_cap_mb * 2**20
    chunk_of = {}
    for b in buckets.values():
        trainable = [r for r in range(len(b.params)) if b.params[r].requires_grad]
        rows: list = []
        size = 0
        for r in reversed(trainable):
            rows.append(r)
            size += b.params[r].numel() * b.params[r].element_size()
            if size >= cap or r == trainable[0]:
                chunk = _Chunk(b, sorted(rows))
                for row in rows:
                    chunk_of[id(b.params[row])] = chunk
                rows, size = [], 0
    return chunk_of


def _masters(optimizer, params: list) -> list:
    return [optimizer.state[p].get("master_weight") for p in params]


def _check_setup(where: str, optimizer, model, scaler, bucket_cap_mb) -> Any:
    """Refuse what the overlapped step cannot do exactly; the DDP module, if ``model`` is one."""
    if optimizer.overlap_handle is not None:
        raise RuntimeError(f"{where}: this optimizer already overlaps its step with backward; call "
                           "remove() on the handle overlap_backward() returned first")
    if optimizer.is_sharded:
        raise NotImplementedError(
            f"{where}: the parameters are DTensor shards (FSDP2); their gradients are reduce-scattered "
            "after the post-accumulate-grad hooks, so the overlapped step does not apply; use the plain step")
    for gi, group in enumerate(optimizer.param_groups):
        if group.get("adaptive", False):
            raise NotImplementedError(
                f"{where}: param group {gi} has adaptive=True; the overlapped step implements the "
                "plain perturbation only; use the plain step")
    if not (isinstance(bucket_cap_mb, (int, float)) and math.isfinite(bucket_cap_mb) and bucket_cap_mb > 0):
        raise ValueError(f"{where}: bucket_cap_mb must be a positive number, got {bucket_cap_mb!r}")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"{where}: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if model is None:
        return None
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module (or DistributedDataParallel), "
                        f"got {type(model).__name__}")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        if model.find_unused_parameters:
            raise NotImplementedError(
                f"{where}: DDP with find_unused_parameters=True: which parameters are unused on every "
                "rank is known only after the reduction, so the pass cannot tell them from zero "
                "gradients; use find_unused_parameters=False or the plain step")
        return model
    return None
