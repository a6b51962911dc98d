"""The Triton kernels as ``torch.library`` ops (namespace ``msam_triton``), with fake versions.

The ops over lists of tensors are plain custom ops: their implementation reads tensor
addresses to build the launch table (``layout.py``), which only real tensors have, so
``torch.compile`` treats them as opaque calls and traces through them with the fake versions.
``perturbation_coef`` takes fixed tensors and is a ``triton_op`` where torch has it (and the
kernels are compiled, not interpreted), so Inductor sees its kernel.

Each op launches one kernel per group of tensors that share a variant (with or without a
gradient, with or without master weights): at most two launches per pass, plus one tiny
kernel that adds the per-program partial sums. Never one per tensor.
"""

from __future__ import annotations

import struct
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from msam_fused.triton_kernels import kernels, layout, tuning

NAMESPACE = "msam_triton"
INTERPRETED = not isinstance(kernels.move_kernel, triton.runtime.JITFunction)
USES_TRITON_OP = hasattr(torch.library, "triton_op") and not INTERPRETED

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bits(x: float) -> int:
    """A Python float as the int64 with the same bits (``kernels._double`` undoes it)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _tl(dtype: torch.dtype):
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"msam_fused triton backend: unsupported dtype {dtype}; "
                        "use float32, float64, bfloat16 or float16") from None


def _check_dtypes(where: str, expected: torch.dtype, **lists: Sequence[Optional[Tensor]]) -> None:
    for what, tensors in lists.items():
        for t in tensors:
            if t is not None and t.dtype != expected:
                raise TypeError(f"{where}: {what} holds a {t.dtype} tensor, expected {expected} "
                                "(one bucket is one dtype; state is float32 for half parameters)")


# ------------------------------------------------------------------------------ launching
def _stage(records: list, mutated: Sequence[int]) -> list:
    """Make every record's operands line up in memory order; returns the copies to write back.

    Operands of one parameter usually share a layout (all contiguous, or all channels-last with
    state made by ``zeros_like``). Where they do not, the record is run on contiguous copies
    and the results copied back (extra traffic for those tensors only).
    """
    write_back = []
    for i, rec in enumerate(records):
        if all(t is None or t.is_contiguous() for t in rec):
            continue
        full = [t for t in rec if t is not None and t.numel() == rec[0].numel() and t.dim()]
        orders = {layout.dense_order(t) for t in full}
        if len(orders) == 1 and None not in orders:
            continue
        staged = [t if t is None or t.is_contiguous() else t.contiguous() for t in rec]
        write_back += [(rec[k], staged[k]) for k in mutated
                       if rec[k] is not None and staged[k] is not rec[k]]
        records[i] = staged
    return write_back


def _write_back(pairs: list) -> None:
    for original, copy in pairs:
        original.copy_(copy)


def _launch(kernel, device: torch.device, groups: list, args: tuple, consts: dict,
            partials_dtype: Optional[torch.dtype] = None):
    """Run ``kernel`` once per non-empty group of records.

    ``groups`` is a list of (records, constexprs of that group). With ``partials_dtype`` every
    program writes its partial sum to its own slot of a new buffer, which is returned with the
    launches (their tables hold the records for the finish kernel).
    """
    plans = layout.launches(device, [records for records, _ in groups])
    partials = None
    if partials_dtype is not None:
        partials = torch.empty(max(1, sum(p.programs for p in plans)), dtype=partials_dtype,
                               device=device)
    offset = 0
    for (records, group_consts), plan in zip(groups, plans):
        if plan.programs == 0:
            continue
        c = {**consts, **group_consts, "ALIGNED": plan.aligned}
        head = () if partials is None else (partials[offset:],)
        numel = sum(rec[0].numel() for rec in records)

        def bench(cfg, records=records, head=head, c=c, numel=numel):
            _run_scratch(kernel, device, records, numel, head, args, c, cfg)

        cfg = tuning.config((kernel, tuple(sorted((k, str(v)) for k, v in c.items())),
                             tuning.size_class(numel)), INTERPRETED, bench)
        kernel[(plan.programs,)](plan.table, *head, *args, UNROLL=cfg.unroll,
                                 num_warps=cfg.num_warps, **c)
        offset += plan.programs
    return plans, partials, offset


def _run_scratch(kernel, device, records, numel, head, args, consts, cfg) -> None:
    """One launch on zero-filled scratch operands shaped like ``records`` (for tuning)."""
    n = min(numel, tuning.SCRATCH_LIMIT)
    scratch = [[None if t is None else torch.zeros(n, dtype=t.dtype, device=device)
                for t in records[0]]]
    plan = layout.build(device, [scratch])[0]  # not cached: the scratch goes away
    head = () if not head else (torch.empty(plan.programs, dtype=head[0].dtype, device=device),)
    kernel[(plan.programs,)](plan.table, *head, *args, UNROLL=cfg.unroll,
                             num_warps=cfg.num_warps, **consts)


def _finish(partials: Tensor, n_partials: int, found_inf: Optional[Tensor],
            step_plan: Optional[layout.Launch] = None, n_steps: int = 0,
            record_width: int = 1, step_operand: int = 0) -> Tensor:
    """The bucket's sum of squares from the partial sums. With ``step_plan`` (a launch whose
    first ``n_steps`` records hold a step counter as operand ``step_operand``), it also
    advances those counters: after every program of the update has read them."""
    out = torch.empty((), dtype=partials.dtype, device=partials.device)
    has_steps = step_plan is not None and n_steps > 0
    records = step_plan.table[2 * step_plan.programs:] if has_steps else None
    kernels.finish_kernel[(1,)](partials, n_partials, out, records, n_steps, found_inf,
                                RECORD_WIDTH=record_width, STEP_OPERAND=step_operand,
                                HAS_STEPS=has_steps, HAS_FOUND_INF=found_inf is not None,
                                ACC=_tl(partials.dtype))
    return out


def _by_gradient(records: list, grads: Sequence[Optional[Tensor]], consts: dict) -> list:
    with_grad = [r for r, g in zip(records, grads) if g is not None]
    without = [r for r, g in zip(records, grads) if g is None]
    return [(with_grad, {**consts, "HAS_GRAD": True}), (without, {**consts, "HAS_GRAD": False})]


# ------------------------------------------------------------------------------ the ops
@torch.library.custom_op(f"{NAMESPACE}::msam_sgd_update_", mutates_args=("params", "momenta", "masters"))
def msam_sgd_update_(params: list[Tensor], grads: list[Optional[Tensor]], momenta: list[Tensor],
                     masters: list[Tensor], lr: float, weight_decay: float, momentum: float,
                     coef: Tensor, norm_dtype: torch.dtype, grad_scale: Optional[Tensor],
                     found_inf: Optional[Tensor]) -> Tensor:
    """``masters`` is empty or holds one fp32 master per parameter."""
    where = "msam_triton.msam_sgd_update_"
    dtype = params[0].dtype
    _check_dtypes(where, dtype, params=params, grads=grads)
    _check_dtypes(where, compute_dtype(dtype), momenta=momenta)
    _check_dtypes(where, torch.float32, masters=masters)
    records = [[p, g, v, m] for p, g, v, m in
               zip(params, grads, momenta, masters or [None] * len(params))]
    write_back = _stage(records, mutated=(0, 2, 3))
    consts = dict(P=_tl(dtype), STATE=_tl(compute_dtype(dtype)), HAS_MASTER=bool(masters),
                  HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
                  ACC=_tl(norm_dtype))
    args = (_bits(lr), _bits(weight_decay), _bits(momentum), coef, grad_scale, found_inf)
    _, partials, n = _launch(kernels.msam_sgd_kernel, params[0].device,
                             _by_gradient(records, grads, consts), args, {}, norm_dtype)
    _write_back(write_back)
    return _finish(partials, n, found_inf)


@msam_sgd_update_.register_fake
def _(params, grads, momenta, masters, lr, weight_decay, momentum, coef, norm_dtype, grad_scale,
      found_inf):
    return params[0].new_empty((), dtype=norm_dtype)


@torch.library.custom_op(f"{NAMESPACE}::adamw_msam_update_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps", "masters"))
def adamw_msam_update_(params: list[Tensor], grads: list[Optional[Tensor]], exp_avgs: list[Tensor],
                       exp_avg_sqs: list[Tensor], steps: list[Tensor], masters: list[Tensor],
                       lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                       coef: Tensor, norm_dtype: torch.dtype, grad_scale: Optional[Tensor],
                       found_inf: Optional[Tensor]) -> Tensor:
    """``masters`` is empty or holds one fp32 master per parameter."""
    where = "msam_triton.adamw_msam_update_"
    dtype = params[0].dtype
    _check_dtypes(where, dtype, params=params, grads=grads)
    _check_dtypes(where, compute_dtype(dtype), exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    _check_dtypes(where, torch.float32, masters=masters, steps=steps)
    records = [[p, g, m, s, mw, t] for p, g, m, s, mw, t in
               zip(params, grads, exp_avgs, exp_avg_sqs, masters or [None] * len(params), steps)]
    write_back = _stage(records, mutated=(0, 2, 3, 4))
    consts = dict(P=_tl(dtype), STATE=_tl(compute_dtype(dtype)), HAS_MASTER=bool(masters),
                  HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
                  ACC=_tl(norm_dtype))
    args = (_bits(lr), _bits(beta1), _bits(1 - beta1), _bits(beta2), _bits(1 - beta2), _bits(eps),
            _bits(1 - lr * weight_decay), coef, grad_scale, found_inf)
    groups = _by_gradient(records, grads, consts)
    plans, partials, n = _launch(kernels.adamw_msam_kernel, params[0].device, groups, args, {},
                                 norm_dtype)
    _write_back(write_back)
    with_grad = groups[0][0]
    return _finish(partials, n, found_inf, plans[0], len(with_grad), record_width=7, step_operand=5)


@adamw_msam_update_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, steps, masters, lr, beta1, beta2, eps, weight_decay,
      coef, norm_dtype, grad_scale, found_inf):
    return params[0].new_empty((), dtype=norm_dtype)


def _move(params: Sequence[Tensor], directions: Sequence[Optional[Tensor]],
          sources: Sequence[Optional[Tensor]], backups: Optional[Sequence[Tensor]], *,
          coef: Optional[Tensor], sign: int, adaptive: bool, found_inf: Optional[Tensor]) -> None:
    """``p = (source or p) + sign * coef * direction``, grouped by whether a source is given."""
    dtype = params[0].dtype
    backups = backups or [None] * len(params)
    records = [[p, x, s, b] for p, x, s, b in zip(params, directions, sources, backups)]
    write_back = _stage(records, mutated=(0, 3))

    def group(from_source: bool) -> tuple:
        members = [r for r in records if (r[2] is not None) == from_source]
        ref = members[0] if members else records[0]
        return members, dict(DIRECTION=_tl(dtype if ref[1] is None else ref[1].dtype),
                             SOURCE=_tl(dtype if ref[2] is None else ref[2].dtype),
                             FROM_SOURCE=from_source)

    consts = dict(P=_tl(dtype), CD=_tl(compute_dtype(dtype)), SIGN=sign, ADAPTIVE=adaptive,
                  SAVE_BACKUP=backups[0] is not None, HAS_FOUND_INF=found_inf is not None)
    _launch(kernels.move_kernel, params[0].device, [group(False), group(True)],
            (coef, found_inf), consts)
    _write_back(write_back)


@torch.library.custom_op(f"{NAMESPACE}::apply_perturbation_", mutates_args=("params",))
def apply_perturbation_(params: list[Tensor], directions: list[Tensor],
                        masters: list[Optional[Tensor]], coef: Tensor,
                        found_inf: Optional[Tensor]) -> None:
    _move(params, directions, masters, None, coef=coef, sign=-1, adaptive=False,
          found_inf=found_inf)


@apply_perturbation_.register_fake
def _(params, directions, masters, coef, found_inf):
    return None


@torch.library.custom_op(f"{NAMESPACE}::remove_perturbation_", mutates_args=("params",))
def remove_perturbation_(params: list[Tensor], directions: list[Tensor],
                         masters: list[Optional[Tensor]], coef: Tensor) -> None:
    # with a master copy the true weights are the master itself: copy it (no coefficient)
    with_master = [m is not None for m in masters]
    if any(with_master):
        _move([p for p, h in zip(params, with_master) if h], [None] * sum(with_master),
              [m for m in masters if m is not None], None, coef=None, sign=0, adaptive=False,
              found_inf=None)
    if not all(with_master):
        _move([p for p, h in zip(params, with_master) if not h],
              [x for x, h in zip(directions, with_master) if not h],
              [None] * (len(params) - sum(with_master)), None, coef=coef, sign=1,
              adaptive=False, found_inf=None)


@remove_perturbation_.register_fake
def _(params, directions, masters, coef):
    return None


@torch.library.custom_op(f"{NAMESPACE}::sam_ascent_sum_of_squares", mutates_args=())
def sam_ascent_sum_of_squares(params: list[Tensor], grads: list[Tensor], adaptive: bool,
                              norm_dtype: torch.dtype) -> Tensor:
    dtype = params[0].dtype
    _check_dtypes("msam_triton.sam_ascent_sum_of_squares", dtype, params=params, grads=grads)
    records = [[p, g] for p, g in zip(params, grads)]
    _stage(records, mutated=())
    consts = dict(P=_tl(dtype), CD=_tl(compute_dtype(dtype)), ADAPTIVE=adaptive,
                  ACC=_tl(norm_dtype))
    _, partials, n = _launch(kernels.ascent_sum_of_squares_kernel, params[0].device,
                             [(records, {})], (), consts, norm_dtype)
    return _finish(partials, n, None)


@sam_ascent_sum_of_squares.register_fake
def _(params, grads, adaptive, norm_dtype):
    return params[0].new_empty((), dtype=norm_dtype)


@torch.library.custom_op(f"{NAMESPACE}::sam_ascent_", mutates_args=("params", "backups"))
def sam_ascent_(params: list[Tensor], grads: list[Tensor], backups: list[Tensor], scale: Tensor,
                adaptive: bool, found_inf: Optional[Tensor]) -> None:
    _check_dtypes("msam_triton.sam_ascent_", params[0].dtype, grads=grads, backups=backups)
    _move(params, grads, [None] * len(params), backups, coef=scale, sign=1, adaptive=adaptive,
          found_inf=found_inf)


@sam_ascent_.register_fake
def _(params, grads, backups, scale, adaptive, found_inf):
    return None


@torch.library.custom_op(f"{NAMESPACE}::sam_restore_", mutates_args=("params",))
def sam_restore_(params: list[Tensor], backups: list[Tensor]) -> None:
    _check_dtypes("msam_triton.sam_restore_", params[0].dtype, backups=backups)
    _move(params, [None] * len(params), backups, None, coef=None, sign=0, adaptive=False,
          found_inf=None)


@sam_restore_.register_fake
def _(params, backups):
    return None


def _perturbation_coef(sum_of_squares: Tensor, rho: float, coef_old: Tensor,
                       found_inf: Optional[Tensor]) -> Tensor:
    out = torch.empty_like(coef_old)
    launcher = torch.library.wrap_triton(kernels.perturbation_coef_kernel) if USES_TRITON_OP \
        else kernels.perturbation_coef_kernel
    launcher[(1,)](sum_of_squares, coef_old, found_inf, out, _bits(rho),
                   HAS_FOUND_INF=found_inf is not None)
    return out


if USES_TRITON_OP:
    perturbation_coef = torch.library.triton_op(f"{NAMESPACE}::perturbation_coef",
                                                _perturbation_coef, mutates_args=())
else:
    perturbation_coef = torch.library.custom_op(f"{NAMESPACE}::perturbation_coef",
                                                _perturbation_coef, mutates_args=())

    @perturbation_coef.register_fake
    def _(sum_of_squares, rho, coef_old, found_inf):
        return torch.empty_like(coef_old)
