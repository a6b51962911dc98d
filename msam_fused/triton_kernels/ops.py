"""The Triton kernels as ``torch.library`` ops (namespace ``msam_triton``), with fake versions.

The ops over lists of tensors are plain custom ops: their implementation reads tensor
addresses to build the launch table (``layout.py``), which only real tensors have, so
``torch.compile`` treats them as opaque calls and traces through them with the fake versions.
``sum_segment_partials`` and ``perturbation_coef`` take fixed tensors and are ``triton_op``s
where torch has them (and the kernels are compiled, not interpreted), so Inductor sees their
kernels.

Each op launches one kernel per group of tensors that share a variant (with or without a
gradient; all operands 16-byte aligned or not): at most four launches per pass, plus the
step counters' increment for AdamW. Never one per tensor.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from msam_fused.triton_kernels import kernels, layout, tuning
from msam_fused.triton_kernels.layout import Record

NAMESPACE = "msam_triton"
INTERPRETED = not isinstance(kernels.move_kernel, triton.runtime.JITFunction)
USES_TRITON_OP = hasattr(torch.library, "triton_op") and not INTERPRETED

MSAM_SGD_HYPER_LEN = 4    # reference.MSAM_SGD_HYPER
ADAMW_MSAM_HYPER_LEN = 6  # reference.ADAMW_MSAM_HYPER

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _check_hyper(where: str, hyper: Tensor, length: int, device: torch.device) -> None:
    if hyper.dtype != torch.float64 or hyper.dim() != 1 or hyper.numel() != length \
            or hyper.device != device:
        raise ValueError(f"{where}: hyper must be a 1-D float64 tensor of {length} entries on "
                         f"{device}, got {hyper.dtype} of shape {tuple(hyper.shape)} on {hyper.device}")


def segment_count(numel: int) -> int:
    return layout.segments(numel)


def _first_rows(tensors: Sequence[Tensor]) -> list[int]:
    """The first row of each tensor's partial sums: rows run in tensor order."""
    rows, row = [], 0
    for t in tensors:
        rows.append(row)
        row += segment_count(t.numel())
    return rows


def _partials_like(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    rows = sum(segment_count(t.numel()) for t in tensors)
    return torch.empty((rows, 2), dtype=torch.float64, device=device)


# ------------------------------------------------------------------------------ launching
def _stage(records: list, mutated: Sequence[int]) -> list:
    """Make every record's operands line up in memory order; returns the copies to write back.

    Operands of one parameter usually share a layout (all contiguous, or all channels-last with
    state made by ``zeros_like``). Where they do not, the record is run on contiguous copies
    and the results copied back (extra traffic for those tensors only).
    """
    write_back = []
    for i, (row, rec) in enumerate(records):
        if all(t is None or t.is_contiguous() for t in rec):
            continue
        full = [t for t in rec if t is not None and t.numel() == rec[0].numel() and t.dim()]
        orders = {layout.dense_order(t) for t in full}
        if len(orders) == 1 and None not in orders:
            continue
        staged = [t if t is None or t.is_contiguous() else t.contiguous() for t in rec]
        write_back += [(rec[k], staged[k]) for k in mutated
                       if rec[k] is not None and staged[k] is not rec[k]]
        records[i] = Record(row, staged)
    return write_back


def _write_back(pairs: list) -> None:
    for original, copy in pairs:
        original.copy_(copy)


def _launch(kernel, device: torch.device, groups: list, head: tuple, args: tuple, consts: dict,
            dtype: torch.dtype) -> None:
    """Run ``kernel`` over each group of records: ``groups`` is a list of (records, constexprs
    of that group); ``dtype`` (the parameters') picks the launch configuration."""
    cfg = tuning.config(kernel.fn.__name__, dtype, INTERPRETED)
    plans = layout.launches(device, [records for records, _ in groups])
    for (_, group_consts), parts in zip(groups, plans):
        for plan in parts:
            kernel[(plan.programs,)](plan.table, *head, *args, UNROLL=cfg.unroll,
                                     num_warps=cfg.num_warps, ALIGNED=plan.aligned,
                                     **consts, **group_consts)


def _by_gradient(records: list, grads: Sequence[Optional[Tensor]], consts: dict) -> list:
    with_grad = [r for r, g in zip(records, grads) if g is not None]
    without = [r for r, g in zip(records, grads) if g is None]
    return [(with_grad, {**consts, "HAS_GRAD": True}), (without, {**consts, "HAS_GRAD": False})]


def _state_consts(dtype: torch.dtype, grad_scale: Optional[Tensor]) -> dict:
    return dict(P=_tl(dtype), STATE=_tl(compute_dtype(dtype)), HAS_SCALE=grad_scale is not None)


# -------------------------------------------------------------------- the read-only passes
def _direction_partials(kernel, where: str, params: list, grads: list, state: dict, operands: list,
                        hyper: Tensor, hyper_len: int, norm_dtype: torch.dtype,
                        grad_scale: Optional[Tensor]) -> Tensor:
    """The read-only pass of MSAM-SGD or AdamW-MSAM: ``state`` names the state list the
    kernel reads (checked to be of the compute dtype), ``operands`` are each tensor's."""
    dtype, device = params[0].dtype, params[0].device
    _check_dtypes(where, dtype, params=params, grads=grads)
    _check_dtypes(where, compute_dtype(dtype), **state)
    _check_hyper(where, hyper, hyper_len, device)
    records = [Record(row, ops_) for row, ops_ in zip(_first_rows(params), operands)]
    _stage(records, mutated=())
    partials = _partials_like(params, device)
    consts = {**_state_consts(dtype, grad_scale), "ACC": _tl(norm_dtype)}
    _launch(kernel, device, _by_gradient(records, grads, consts), (partials,), (hyper, grad_scale),
            {}, dtype)
    return partials


@torch.library.custom_op(f"{NAMESPACE}::msam_sgd_partials", mutates_args=())
def msam_sgd_partials(params: list[Tensor], grads: list[Optional[Tensor]], momenta: list[Tensor],
                      hyper: Tensor, norm_dtype: torch.dtype, grad_scale: Optional[Tensor]) -> Tensor:
    return _direction_partials(kernels.msam_sgd_partials_kernel, "msam_triton.msam_sgd_partials",
                               params, grads, dict(momenta=momenta),
                               [[p, g, v] for p, g, v in zip(params, grads, momenta)],
                               hyper, MSAM_SGD_HYPER_LEN, norm_dtype, grad_scale)


@msam_sgd_partials.register_fake
def _(params, grads, momenta, hyper, norm_dtype, grad_scale):
    return _partials_like(params, params[0].device)


@torch.library.custom_op(f"{NAMESPACE}::adamw_msam_partials", mutates_args=())
def adamw_msam_partials(params: list[Tensor], grads: list[Optional[Tensor]], exp_avgs: list[Tensor],
                        hyper: Tensor, norm_dtype: torch.dtype,
                        grad_scale: Optional[Tensor]) -> Tensor:
    """Reads only ``grads`` and ``exp_avgs`` (``params`` give the dtype and the device)."""
    return _direction_partials(kernels.adamw_msam_partials_kernel, "msam_triton.adamw_msam_partials",
                               params, grads, dict(exp_avgs=exp_avgs),
                               [[m, g] for m, g in zip(exp_avgs, grads)],
                               hyper, ADAMW_MSAM_HYPER_LEN, norm_dtype, grad_scale)


@adamw_msam_partials.register_fake
def _(params, grads, exp_avgs, hyper, norm_dtype, grad_scale):
    return _partials_like(params, params[0].device)


@torch.library.custom_op(f"{NAMESPACE}::sam_ascent_partials", mutates_args=())
def sam_ascent_partials(params: list[Tensor], grads: list[Tensor], adaptive: bool,
                        norm_dtype: torch.dtype) -> Tensor:
    dtype, device = params[0].dtype, params[0].device
    _check_dtypes("msam_triton.sam_ascent_partials", dtype, params=params, grads=grads)
    records = [Record(row, [p, g]) for row, p, g in zip(_first_rows(params), params, grads)]
    _stage(records, mutated=())
    partials = _partials_like(params, device)
    consts = dict(P=_tl(dtype), CD=_tl(compute_dtype(dtype)), ADAPTIVE=adaptive, ACC=_tl(norm_dtype))
    _launch(kernels.sam_ascent_partials_kernel, device, [(records, {})], (partials,), (), consts, dtype)
    return partials


@sam_ascent_partials.register_fake
def _(params, grads, adaptive, norm_dtype):
    return _partials_like(params, params[0].device)


# ------------------------------------------------------------------------ the write passes
@torch.library.custom_op(f"{NAMESPACE}::msam_sgd_step_", mutates_args=("params", "momenta", "masters"))
def msam_sgd_step_(params: list[Tensor], grads: list[Optional[Tensor]], momenta: list[Tensor],
                   masters: list[Tensor], hyper: Tensor, coef_old: Tensor, coef_new: Tensor,
                   grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """``masters`` is empty or holds one fp32 master per parameter."""
    where = "msam_triton.msam_sgd_step_"
    dtype, device = params[0].dtype, params[0].device
    _check_dtypes(where, dtype, params=params, grads=grads)
    _check_dtypes(where, compute_dtype(dtype), momenta=momenta)
    _check_dtypes(where, torch.float32, masters=masters)
    _check_hyper(where, hyper, MSAM_SGD_HYPER_LEN, device)
    records = [Record(0, [p, g, v, m]) for p, g, v, m in
               zip(params, grads, momenta, masters or [None] * len(params))]
    write_back = _stage(records, mutated=(0, 2, 3))
    consts = dict(**_state_consts(dtype, grad_scale), HAS_MASTER=bool(masters),
                  HAS_FOUND_INF=found_inf is not None)
    _launch(kernels.msam_sgd_step_kernel, device, _by_gradient(records, grads, consts), (),
            (hyper, coef_old, coef_new, grad_scale, found_inf), {}, dtype)
    _write_back(write_back)


@msam_sgd_step_.register_fake
def _(params, grads, momenta, masters, hyper, coef_old, coef_new, grad_scale, found_inf):
    return None


@torch.library.custom_op(f"{NAMESPACE}::adamw_msam_step_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps", "masters"))
def adamw_msam_step_(params: list[Tensor], grads: list[Optional[Tensor]], exp_avgs: list[Tensor],
                     exp_avg_sqs: list[Tensor], steps: list[Tensor], masters: list[Tensor],
                     hyper: Tensor, coef_old: Tensor, coef_new: Tensor,
                     grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """``masters`` is empty or holds one fp32 master per parameter."""
    where = "msam_triton.adamw_msam_step_"
    dtype, device = params[0].dtype, params[0].device
    _check_dtypes(where, dtype, params=params, grads=grads)
    _check_dtypes(where, compute_dtype(dtype), exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    _check_dtypes(where, torch.float32, masters=masters, steps=steps)
    _check_hyper(where, hyper, ADAMW_MSAM_HYPER_LEN, device)
    records = [Record(0, [p, g, m, s, mw, t]) for p, g, m, s, mw, t in
               zip(params, grads, exp_avgs, exp_avg_sqs, masters or [None] * len(params), steps)]
    write_back = _stage(records, mutated=(0, 2, 3, 4))
    consts = dict(**_state_consts(dtype, grad_scale), HAS_MASTER=bool(masters),
                  HAS_FOUND_INF=found_inf is not None)
    _launch(kernels.adamw_msam_step_kernel, device, _by_gradient(records, grads, consts), (),
            (hyper, coef_old, coef_new, grad_scale, found_inf), {}, dtype)
    _write_back(write_back)
    # after every program has read the counts: one program per counter of a stepped tensor
    counters = [Record(0, [t]) for t, g in zip(steps, grads) if g is not None]
    (parts,) = layout.launches(device, [counters])
    for plan in parts:
        kernels.advance_steps_kernel[(plan.programs,)](plan.table, found_inf,
                                                       HAS_FOUND_INF=found_inf is not None)


@adamw_msam_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, steps, masters, hyper, coef_old, coef_new, grad_scale,
      found_inf):
    return None


# --------------------------------------------------- capability "stash": MSAM-SGD during backward
@torch.library.custom_op(f"{NAMESPACE}::msam_sgd_overlap_stash_", mutates_args=("grads", "momenta"))
def msam_sgd_overlap_stash_(params: list[Tensor], grads: list[Tensor], momenta: list[Tensor],
                            hyper: Tensor, norm_dtype: torch.dtype,
                            grad_scale: Optional[Tensor]) -> Tensor:
    where = "msam_triton.msam_sgd_overlap_stash_"
    dtype, device = params[0].dtype, params[0].device
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{where}: {dtype} parameters have float32 momenta, which their gradients "
                         "cannot hold; use msam_sgd_partials")
    _check_dtypes(where, dtype, params=params, grads=grads, momenta=momenta)
    _check_hyper(where, hyper, MSAM_SGD_HYPER_LEN, device)
    records = [Record(row, [p, g, v]) for row, p, g, v in zip(_first_rows(params), params, grads, momenta)]
    write_back = _stage(records, mutated=(1, 2))
    partials = _partials_like(params, device)
    consts = dict(P=_tl(dtype), HAS_SCALE=grad_scale is not None, ACC=_tl(norm_dtype))
    _launch(kernels.msam_sgd_overlap_stash_kernel, device, [(records, {})], (partials,),
            (hyper, grad_scale), consts, dtype)
    _write_back(write_back)
    return partials


@msam_sgd_overlap_stash_.register_fake
def _(params, grads, momenta, hyper, norm_dtype, grad_scale):
    return _partials_like(params, params[0].device)


@torch.library.custom_op(f"{NAMESPACE}::msam_sgd_overlap_finish_", mutates_args=("params", "momenta"))
def msam_sgd_overlap_finish_(params: list[Tensor], stashes: list[Optional[Tensor]],
                             momenta: list[Tensor], hyper: Tensor, coef_old: Tensor,
                             coef_new: Tensor, found_inf: Optional[Tensor]) -> None:
    where = "msam_triton.msam_sgd_overlap_finish_"
    dtype, device = params[0].dtype, params[0].device
    _check_dtypes(where, dtype, params=params, stashes=stashes, momenta=momenta)
    _check_hyper(where, hyper, MSAM_SGD_HYPER_LEN, device)
    records = [Record(0, [p, x, v]) for p, x, v in zip(params, stashes, momenta)]
    write_back = _stage(records, mutated=(0, 2))
    groups = [([r for r, x in zip(records, stashes) if (x is not None) == has], {"HAS_STASH": has})
              for has in (True, False)]
    consts = dict(P=_tl(dtype), HAS_FOUND_INF=found_inf is not None)
    _launch(kernels.msam_sgd_overlap_finish_kernel, device, groups, (),
            (hyper, coef_old, coef_new, found_inf), consts, dtype)
    _write_back(write_back)


@msam_sgd_overlap_finish_.register_fake
def _(params, stashes, momenta, hyper, coef_old, coef_new, found_inf):
    return None


# ---------------------------------------------------------- perturbations and SAM's moves
def _move(params: Sequence[Tensor], directions: Sequence[Optional[Tensor]],
          sources: Sequence[Optional[Tensor]], *, coef: Optional[Tensor], sign: int, adaptive: bool,
          found_inf: Optional[Tensor]) -> None:
    """``p = (source or p) + sign * coef * direction``, grouped by whether a source is given."""
    dtype = params[0].dtype
    records = [Record(0, [p, x, s]) for p, x, s in zip(params, directions, sources)]
    write_back = _stage(records, mutated=(0,))

    def group(from_source: bool) -> tuple:
        members = [r for r in records if (r.operands[2] is not None) == from_source]
        ref = members[0].operands if members else records[0].operands
        return members, dict(DIRECTION=_tl(dtype if ref[1] is None else ref[1].dtype),
                             SOURCE=_tl(dtype if ref[2] is None else ref[2].dtype),
                             FROM_SOURCE=from_source)

    consts = dict(P=_tl(dtype), CD=_tl(compute_dtype(dtype)), SIGN=sign, ADAPTIVE=adaptive,
                  HAS_FOUND_INF=found_inf is not None)
    _launch(kernels.move_kernel, params[0].device, [group(False), group(True)], (),
            (coef, found_inf), consts, dtype)
    _write_back(write_back)


@torch.library.custom_op(f"{NAMESPACE}::perturb_", mutates_args=("params",))
def perturb_(params: list[Tensor], directions: list[Tensor], masters: list[Optional[Tensor]],
             coef: Tensor, sign: int) -> None:
    """``sign = -1``: ``p = w - coef * x`` from the true weights (the master copy, or ``p``);
    ``sign = +1``: the true weights back into ``p`` (a copy of the master where there is one)."""
    if sign not in (-1, 1):
        raise ValueError(f"msam_triton.perturb_: sign must be -1 (apply) or +1 (remove), got {sign}")
    if sign < 0:
        _move(params, directions, masters, coef=coef, sign=-1, adaptive=False, found_inf=None)
        return
    with_master = [m is not None for m in masters]
    if any(with_master):
        _move([p for p, h in zip(params, with_master) if h], [None] * sum(with_master),
              [m for m in masters if m is not None], coef=None, sign=0, adaptive=False, found_inf=None)
    if not all(with_master):
        _move([p for p, h in zip(params, with_master) if not h],
              [x for x, h in zip(directions, with_master) if not h],
              [None] * (len(params) - sum(with_master)), coef=coef, sign=1, adaptive=False,
              found_inf=None)


@perturb_.register_fake
def _(params, directions, masters, coef, sign):
    return None


@torch.library.custom_op(f"{NAMESPACE}::sam_ascent_", mutates_args=("outs",))
def sam_ascent_(params: list[Tensor], grads: list[Tensor], outs: list[Tensor], scale: Tensor,
                adaptive: bool, found_inf: Optional[Tensor]) -> None:
    """``outs = w + e`` from ``w = params`` (``outs = w`` when ``found_inf`` is set); an out that
    is its parameter is moved in place (and left alone when skipped)."""
    _check_dtypes("msam_triton.sam_ascent_", params[0].dtype, grads=grads, outs=outs)
    sources = [None if _same_memory(o, p) else p for p, o in zip(params, outs)]
    _move(outs, grads, sources, coef=scale, sign=1, adaptive=adaptive, found_inf=found_inf)


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


@sam_ascent_.register_fake
def _(params, grads, outs, scale, adaptive, found_inf):
    return None


@torch.library.custom_op(f"{NAMESPACE}::sam_restore_", mutates_args=("params",))
def sam_restore_(params: list[Tensor], backups: list[Tensor]) -> None:
    _check_dtypes("msam_triton.sam_restore_", params[0].dtype, backups=backups)
    _move(params, [None] * len(params), backups, coef=None, sign=0, adaptive=False, found_inf=None)


@sam_restore_.register_fake
def _(params, backups):
    return None


# ------------------------------------------------------------------- ops on fixed tensors
def _fixed_tensor_op(name: str, fake):
    """A ``triton_op`` (Inductor sees the kernel) where available, else a custom op with
    ``fake``; the implementation launches through ``_launcher``."""
    def register(impl):
        if USES_TRITON_OP:
            return torch.library.triton_op(f"{NAMESPACE}::{name}", impl, mutates_args=())
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=())
        op.register_fake(fake)
        return op
    return register


def _launcher(kernel):
    return torch.library.wrap_triton(kernel) if USES_TRITON_OP else kernel


@_fixed_tensor_op("sum_segment_partials", lambda partials, norm_dtype: (
    partials.new_empty((), dtype=norm_dtype), partials.new_empty((), dtype=torch.bool)))
def sum_segment_partials(partials: Tensor, norm_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if partials.dtype != torch.float64 or partials.dim() != 2 or partials.shape[1] != 2 \
            or not partials.is_contiguous():
        raise ValueError("msam_triton.sum_segment_partials: partials must be a contiguous float64 "
                         f"[segments, 2] tensor, got {partials.dtype} {tuple(partials.shape)}")
    total = torch.empty((), dtype=norm_dtype, device=partials.device)
    nonfinite = torch.empty((), dtype=torch.bool, device=partials.device)
    _launcher(kernels.sum_segment_partials_kernel)[(1,)](partials, partials.shape[0], total,
                                                         nonfinite, ACC=_tl(norm_dtype))
    return total, nonfinite


@_fixed_tensor_op("perturbation_coef", lambda sum_of_squares, rho, coef_old, found_inf:
                  torch.empty_like(coef_old))
def perturbation_coef(sum_of_squares: Tensor, rho: Tensor, coef_old: Tensor,
                      found_inf: Optional[Tensor]) -> Tensor:
    out = torch.empty_like(coef_old)
    _launcher(kernels.perturbation_coef_kernel)[(1,)](sum_of_squares, rho, coef_old, found_inf, out,
                                                      HAS_FOUND_INF=found_inf is not None)
    return out


# ---------------------------------------------------------------------------------- tuning
def tune(device, dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16)) -> dict:
    """Time every launch configuration of the pass kernels on scratch tensors (at most
    ``tuning.SCRATCH_BYTES`` per op) and keep the fastest per kernel and parameter dtype.

    Call it once before training, outside any step and never during CUDA graph capture:
    it synchronizes the device. Steps only look the choice up. Returns the choices.
    """
    device = torch.device(device)
    if INTERPRETED or device.type != "cuda":
        raise RuntimeError("msam_triton.tune times compiled kernels on a GPU")
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("msam_triton.tune synchronizes the device: call it before capturing")
    from triton.testing import do_bench

    chosen = {}
    for dtype in dtypes:
        for kernel, run in _scratch_runs(device, dtype):
            chosen[kernel.fn.__name__, dtype] = tuning.choose(
                kernel.fn.__name__, dtype, lambda: do_bench(run))
    return chosen


def _scratch_runs(device: torch.device, dtype: torch.dtype) -> list:
    """(kernel, a call of its op on scratch tensors) for each pass kernel."""
    cd = compute_dtype(dtype)
    # AdamW's write pass has the most operands: two of the parameters' dtype, two of state
    n = tuning.SCRATCH_BYTES // (2 * torch.finfo(dtype).bits // 8 + 2 * torch.finfo(cd).bits // 8)

    def zeros(dt):
        return [torch.zeros(n, dtype=dt, device=device)]

    p, g, m, s = zeros(dtype), zeros(dtype), zeros(cd), zeros(cd)
    steps = [torch.zeros((), device=device)]
    coef = torch.zeros((), dtype=cd, device=device)
    sgd = torch.tensor([0.1, 0.0, 0.9, 0.1], dtype=torch.float64, device=device)
    adamw = torch.tensor([0.1, 0.9, 0.999, 1e-8, 0.0, 0.1], dtype=torch.float64, device=device)
    return [
        (kernels.msam_sgd_partials_kernel, lambda: msam_sgd_partials(p, g, m, sgd, cd, None)),
        (kernels.msam_sgd_step_kernel, lambda: msam_sgd_step_(p, g, m, [], sgd, coef, coef, None, None)),
        (kernels.adamw_msam_partials_kernel, lambda: adamw_msam_partials(p, g, m, adamw, cd, None)),
        (kernels.adamw_msam_step_kernel,
         lambda: adamw_msam_step_(p, g, m, s, steps, [], adamw, coef, coef, None, None)),
    ]
