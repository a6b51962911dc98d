"""MSAM's step overlapped with the backward pass: :meth:`msam_fused.MSAM.overlap_backward`.

The plain step (``momentum_ascent.py``) cannot start before backward ends: the new
perturbation needs the global norm of the new momentum ``v' = mu v + g + wd p``, which needs
every gradient, so it reads ``p, g, v`` twice (8 passes over memory against 5 for fused SGD).
Here the first pass runs *during* backward, on groups of parameters (chunks, ~``bucket_cap_mb``
each, taken in reverse order like DDP's buckets) as soon as all their gradients are ready
(``register_post_accumulate_grad_hook``; under DDP in its communication hook, after the
all-reduce). After backward only ``perturbation_coef`` and one pass per bucket remain:

* float32/float64 parameters (``*_overlap_stash_``): the hidden pass writes ``v = v'`` and moves
  the old momentum into the gradient's memory (the gradient is consumed); the exposed pass
  reads ``p, v', v_old`` and writes ``p``: 4 passes. A skipped step puts ``v_old`` back.
* bf16/fp16 parameters (fp32 momenta, which their gradients cannot hold): the hidden pass only
  reads (``*_overlap_norm``) and the exposed pass is the plain one-pass step: 5 passes.

Every hidden pass returns per-segment partial sums; they are put where the plain step's pass
would have summed them, and ``sum_segment_partials`` adds them in its order with its
arithmetic, so the norm, and the whole trajectory, is bit for bit that of the plain step.

Between backward and ``step()`` each consumed ``p.grad`` is a :class:`ConsumedGradient`, which
raises when anything uses it (clipping, logging, a GradScaler's unscale, a second backward);
``step()`` leaves ``p.grad`` None and ``zero_grad()`` undoes the hidden pass.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from msam_fused.momentum_ascent import Bucket
from msam_fused.validation import ParamPlace, check_param_for_step

HIDDEN_FUNCTIONS = ("segment_count", "msam_sgd_overlap_norm", "msam_sgd_overlap_stash_",
                    "msam_sgd_overlap_finish_", "sum_segment_partials")
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
    backend: Any
    stashes: bool  # the hidden pass writes (float32/float64 parameters)
    starts: list   # where row r's partial sums begin when every row takes part
    counts: list
    # This backward's pass:
    partials: Optional[Tensor] = None  # [segments, 2] float64, rows in group order
    grads: list = field(default_factory=list)  # per row: what the step reads (stash or gradient)
    done: list = field(default_factory=list)
    hypers: Optional[tuple] = None  # (momentum, weight_decay) the hidden pass used
    sums: Optional[tuple] = None    # (sum of squares, non-finite flag)
    plain: Any = None               # the plain step's Bucket, ready at the end of backward
    indices: dict = field(default_factory=dict)  # segment_rows' index tensors

    def reset(self) -> None:
        total = self.starts[-1] + self.counts[-1] if self.params else 0
        device = self.params[0].device
        self.partials = torch.zeros((total, 2), dtype=torch.float64, device=device)
        self.grads = [None] * len(self.params)
        self.done = [False] * len(self.params)
        self.hypers = self.sums = self.plain = None

    def segment_rows(self, rows: list) -> Tensor | slice:
        """Where the partial sums of ``rows`` (ascending) go in ``partials``: a slice, or an
        index tensor made once per set of rows (an upload from the host would wait for the
        device, so it must not happen every step)."""
        if rows == list(range(rows[0], rows[-1] + 1)):
            return slice(self.starts[rows[0]], self.starts[rows[-1]] + self.counts[rows[-1]])
        key = tuple(rows)
        if key not in self.indices:
            self.indices[key] = torch.cat([torch.arange(self.starts[r], self.starts[r] + self.counts[r])
                                           for r in rows]).to(self.params[0].device)
        return self.indices[key]


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
        self._buckets = self._plan_buckets(where)
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
        self._norm_dtype = optimizer._norm_dtype()
        self._requeued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient)
                         for b in self._buckets.values() for p in b.params if p.requires_grad]
        if self._ddp is not None:
            self._ddp.register_comm_hook(self._ddp.process_group, self._comm_hook)
        optimizer._overlap = self

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
        if self.optimizer._overlap is self:
            self.optimizer._overlap = None

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

    def take(self, where: str) -> Optional["OverlappedBackward"]:
        """For step(): this handle if a finished backward left an update to complete, None if
        no backward ran since the last step (a plain step then runs)."""
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
        return self

    def buckets(self, where: str) -> list:
        """The plain step's buckets (the same parameters, in the same order) with what backward
        prepared: the gradients (or stashes) to read, and each bucket's sum of squares and
        non-finite flag. The parameters were checked when their pass ran."""
        out = [b.plain for b in self._buckets.values() if b.plain is not None]
        for b in out:
            self.optimizer.check_group(where, b.group)  # lr and rho are read from here on
        return out

    @property
    def grad_scale(self) -> Optional[Tensor]:
        return self._grad_scale

    def skip_flag(self, policy: str, where: str, scaler_found_inf: Optional[Tensor],
                  device: torch.device) -> Optional[Tensor]:
        """The step's found_inf: the GradScaler's, else (``nonfinite="skip"``) the flag of the
        hidden passes; with ``"raise"`` it is read here, and the update undone before raising."""
        if scaler_found_inf is not None:
            return scaler_found_inf
        flag = self._flag.to(device, non_blocking=True)
        if policy == "skip":
            return flag
        if bool(flag):
            groups = sorted({b.key[0] for b in self._buckets.values() if b.sums and bool(b.sums[1])})
            self.discard()
            raise FloatingPointError(
                f"{where}: non-finite gradient (inf or NaN) in param group(s) {groups}; the update "
                "the backward pass started was undone and nothing was changed (nonfinite='skip' "
                "would skip the step instead)")
        return None

    def finish(self, pb, coef_old: Tensor, coef_new: Tensor, found_inf: Optional[Tensor]) -> None:
        """The exposed pass of a bucket whose hidden pass stashed: p from p, v' and v_old."""
        pb.backend.msam_sgd_overlap_finish_(pb.params, pb.grads, pb.column("momentum_buffer"),
                                            lr=pb.group["lr"], coef_old=coef_old, coef_new=coef_new,
                                            found_inf=found_inf)

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
    def _plan_buckets(self, where: str) -> dict:
        opt = self.optimizer
        buckets: dict[tuple, _Bucket] = {}
        for gi, group in enumerate(opt.param_groups):
            for p in group["params"]:
                key = (gi, p.device, p.dtype)
                if key not in buckets:
                    backend = opt._bucket_backend(group, p.device)
                    stashes = p.dtype in STASH_DTYPES
                    _check_backend(where, backend, stashes, opt.one_pass_functions)
                    buckets[key] = _Bucket(key, group, [], backend, stashes, [], [])
                b = buckets[key]
                b.starts.append(b.starts[-1] + b.counts[-1] if b.params else 0)
                b.counts.append(b.backend.segment_count(p.numel(), p.device))
                b.params.append(p)
        return buckets

    def _present_rows(self, b: _Bucket) -> list:
        """The rows the plain step would take: a gradient this step, or state."""
        return [r for r, p in enumerate(b.params) if b.grads[r] is not None or self.optimizer.state.get(p)]

    # ------------------------------------------------------------------- during backward
    def _on_gradient(self, p: Tensor) -> None:
        """Post-accumulate-grad hook: runs a chunk's pass once all its gradients are in."""
        if self._paused or self.optimizer._unperturbed_depth:
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
        scale = self.scaler._scale if self.scaler is not None and self.scaler.is_enabled() else None
        self._grad_scale = scale
        self._norm_dtype = self.optimizer._norm_dtype()
        # Runs after every hook and after DDP's own end-of-backward callback (see _end).
        torch.autograd.Variable._execution_engine.queue_callback(self._end)

    def _comm_hook(self, process_group, bucket):  # no annotations: DDP checks them as objects
        """DDP's own reduction (scale by 1 / world size, as its built-in reduction does, then
        sum over ranks), then the hidden pass on this bucket's reduced gradients."""
        import torch.distributed as dist

        buffer = bucket.buffer()
        buffer.mul_(1.0 / dist.get_world_size(process_group))
        reduced = dist.all_reduce(buffer, group=process_group, async_op=True).get_future()
        if self._phase != "running" or self.optimizer._overlap is not self:
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

    def _run_pass(self, b: _Bucket, rows: list, grads: list) -> None:
        """The hidden pass over some rows of a bucket; a row without a gradient only adds its
        momentum to the norm. Checks everything first, so a bad gradient changes nothing."""
        opt = self.optimizer
        where = f"{type(opt).__name__} (overlapped step, during backward)"
        gi = b.key[0]
        opt.check_group(f"{where}: param group {gi}", b.group)
        for r in rows:
            p = b.params[r]
            check_param_for_step(where, ParamPlace(b.group, gi, r, p), p, opt._layouts[id(p)])
        if b.hypers is None:
            b.hypers = _hypers(b.group)
        with_grad = [(r, g) for r, g in zip(rows, grads) if g is not None]
        without = [r for r, g in zip(rows, grads) if g is None and opt.state.get(b.params[r])]
        for r, _ in with_grad:
            self._ensure_state(b, r)
        common = dict(weight_decay=b.hypers[1], momentum=b.hypers[0], norm_dtype=self._norm_dtype,
                      grad_scale=None if self._grad_scale is None
                      else self._grad_scale.to(b.params[0].device, non_blocking=True))
        if with_grad:
            idx = [r for r, _ in with_grad]
            params, gs = [b.params[r] for r in idx], [g for _, g in with_grad]
            momenta = [opt.state[p]["momentum_buffer"] for p in params]
            pass_fn = b.backend.msam_sgd_overlap_stash_ if b.stashes else b.backend.msam_sgd_overlap_norm
            b.partials[b.segment_rows(idx)] = pass_fn(params, gs, momenta, **common)
            for r, g in with_grad:
                b.grads[r], b.done[r] = g, True
        if without:
            params = [b.params[r] for r in without]
            b.partials[b.segment_rows(without)] = b.backend.msam_sgd_overlap_norm(
                params, [None] * len(params), [opt.state[p]["momentum_buffer"] for p in params], **common)
            for r in without:
                b.done[r] = True

    def _ensure_state(self, b: _Bucket, r: int) -> None:
        """State for a parameter's first gradient, sharing its group's coefficient tensor (as
        the plain step leaves it), so that step() reads the coefficient last applied."""
        opt, p = self.optimizer, b.params[r]
        if opt.state.get(p):
            return
        coef = opt._group_coef(b.group)
        state = opt._init_state(p, b.group)
        if coef is not None:
            state["perturbation_coef"] = coef
        opt.state[p] = state

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
            opt = self.optimizer
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
                params = [b.params[r] for r in present]
                b.plain = Bucket(b.group, b.key[1], params, [b.grads[r] for r in present],
                                 [opt.state[p] for p in params], b.backend, hidden=b.sums, stashed=b.stashes)
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
            b.partials = b.sums = b.plain = None

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


def _check_backend(where: str, backend, stashes: bool, one_pass_functions: tuple) -> None:
    missing = [f for f in HIDDEN_FUNCTIONS if not hasattr(backend, f)]
    if not stashes:
        missing += [f for f in one_pass_functions if not hasattr(backend, f)]
    if missing:
        raise NotImplementedError(
            f"{where}: backend '{backend.name}' does not implement the overlapped step "
            f"({', '.join(missing)})" + ("" if stashes else " for bf16/fp16 parameters")
            + "; use backend 'cpu' or 'cuda' (or 'reference' for float32/float64), or the plain step")


def _check_setup(where: str, optimizer, model, scaler, bucket_cap_mb) -> Any:
    """Refuse what the overlapped step cannot do exactly; the DDP module, if ``model`` is one."""
    if getattr(optimizer, "_overlap", None) is not None:
        raise RuntimeError(f"{where}: this optimizer already overlaps its step with backward; call "
                           "remove() on the handle overlap_backward() returned first")
    if optimizer._sharding is not None:
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
