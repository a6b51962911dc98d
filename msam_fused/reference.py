"""The reference backend: the definition of every step, one tensor at a time, in plain PyTorch.

Every fused kernel (C++/CUDA, Triton) is tested against these functions, so they follow the
algorithms of docs/design.md literally and favour clarity over speed. They are also the
``backend="reference"`` path: the "authors' style" per-tensor implementation the benchmarks
compare against. The contract every backend implements is described in docs/design.md and typed
in ``msam_fused/backends.py``.

Conventions shared by all backends:

* Arithmetic runs in the *compute dtype*: float64 for float64 tensors, float32 otherwise
  (bf16/fp16 parameters with fp32 state). Results are rounded to the storage dtype once per
  write. Hyper-parameters arrive as float64 (``hyper``) and are cast to the compute dtype where
  they are used; the coefficient and the AdamW bias corrections are formed in float64.
* ``coef_old``/``coef_new`` are 0-d tensors on the parameters' device: the perturbation
  coefficient ``c`` that was applied and the one to apply. They are never read on the host.
* ``found_inf`` is ``None`` or a device tensor; non-zero means "skip": the call then leaves
  every tensor exactly as it was. ``grad_scale`` is ``None`` or a device tensor that the
  gradients are divided by (AMP ``GradScaler``).
* ``masters`` holds, per parameter, ``None`` or an fp32 master copy of the *true* weights
  ``w``; with a master copy the parameter only ever stores ``round(w - c * x)``.
* A gradient of ``None`` means "this parameter got no gradient this step": its weights and
  state stay as they are, but it is still re-perturbed with the new coefficient so that every
  parameter keeps holding ``w - c * x`` with one coefficient per group.
* Adaptive (ASAM-style) perturbation, for groups that ask for it (backends with the
  "adaptive" capability): the perturbation is ``-c * x`` with ``x = w**2 * v`` (elementwise,
  ``w`` the true weights as stored) and ``c = rho / || |w| * v ||``. Because ``x`` depends on
  ``w``, it is stored (``perturbations``) as applied, so the old perturbation is removed along
  exactly the ``x`` that was applied.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

EPS_NORM = 1e-12

name = "reference"
capabilities = frozenset({"stash", "adaptive"})  # see msam_fused/backends.py


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in for tensors stored in ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm_dtype(dtypes) -> torch.dtype:
    """The dtype of a global norm over tensors stored in ``dtypes``: float64 as soon as one of
    them is float64, else float32."""
    return torch.float64 if torch.float64 in set(dtypes) else torch.float32


def _skip_mask(found_inf: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return None if found_inf is None else found_inf.to(device=device) != 0


def _commit_(dst: Tensor, new: Tensor, skip: Optional[Tensor]) -> None:
    """Write ``new`` into ``dst`` (rounding to its dtype) unless the step is skipped."""
    new = new.to(dst.dtype)
    dst.copy_(new if skip is None else torch.where(skip, dst, new))


def _unscaled(grad: Tensor, grad_scale: Optional[Tensor]) -> Tensor:
    g = grad.to(compute_dtype(grad.dtype))
    return g if grad_scale is None else g / grad_scale.to(device=g.device, dtype=g.dtype)


def _true_weights(p: Tensor, direction: Tensor, master: Optional[Tensor], coef: Tensor) -> Tensor:
    """``w``: the master copy, or the stored (perturbed) value plus ``c * direction``."""
    if master is not None:
        return master.clone()
    cd = compute_dtype(p.dtype)
    return p.to(cd) + coef.to(cd) * direction.to(cd)


# ------------------------------------------------------------------------ hyper-parameters
# A bucket's hyper-parameters reach every backend as one float64 vector ``hyper`` on the bucket's
# device, in the order below. Its entries may come from floats or from 0-d tensors that LR and
# rho schedules update in place; kernels read them from device memory, so a step captured in a
# CUDA graph follows the schedule. Each value is cast once to the compute dtype where it is used.
MSAM_SGD_HYPER = ("lr", "weight_decay", "momentum", "rho")
ADAMW_MSAM_HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay", "rho")


def adam_bias(lr: Tensor, beta1: Tensor, beta2: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``lr / (1 - beta1**t)`` and ``sqrt(1 - beta2**t)``, formed in float64 on every backend
    (in float32, ``1 - beta2**t`` loses up to 1e-4 relative at small ``t``)."""
    t = t.to(torch.float64)
    step_size = lr.to(torch.float64) / (1 - torch.pow(beta1.to(torch.float64), t))
    bias2_sqrt = torch.sqrt(1 - torch.pow(beta2.to(torch.float64), t))
    return step_size, bias2_sqrt


def _rounded_as_stored(w: Tensor, stored: Tensor) -> Tensor:
    """``w`` as the parameter (or its master copy) would hold it: the adaptive perturbation is
    formed from the true weights as stored, so that removing it later finds the same ``w``."""
    return w.to(stored.dtype).to(w.dtype)


# ------------------------------------------------------------------------ the step contract
# Every backend implements a step of MSAM-SGD and AdamW-MSAM as the same three calls per step
# (docs/design.md):
#
# 1. ``*_partials``: a read-only pass over each bucket returning per-segment partial sums
#    (float64 [segments, 2]: the sum of squares of the new ascent direction, and a non-finite
#    marker, NaN when a gradient entry is inf or NaN, else 0); ``sum_segment_partials`` turns
#    a bucket's partials into its sum of squares (in ``norm_dtype``) and non-finite flag;
# 2. ``perturbation_coef``: ``c_new = rho / (||x|| + EPS_NORM)`` from the global sum, on the device;
# 3. ``*_step_``: one write pass that removes the old perturbation (``coef_old``), updates state
#    and weights, and applies the new one (``coef_new``).
#
# Both passes take the same columns (params, grads, the algorithm's state, masters) and
# ``hyper``, so the optimizer calls them the same way; a pass reads only what it needs.
# Here a segment is a whole tensor; the fused kernels cut tensors into fixed segments and sum
# them in a fixed order, so results never depend on timing.


def _msam_sgd_direction(p: Tensor, g: Optional[Tensor], v: Tensor, hyper: Tensor,
                        grad_scale: Optional[Tensor]) -> Tensor:
    """The new momentum (steps 1 and 3 of the algorithm): ``momentum * v + (g + weight_decay * p)``
    in the compute dtype; ``v`` itself when the parameter has no gradient this step."""
    cd = compute_dtype(p.dtype)
    if g is None:
        return v.to(cd)
    weight_decay, momentum = hyper[1].to(cd), hyper[2].to(cd)
    d = _unscaled(g, grad_scale) + weight_decay * p.to(cd)
    return momentum * v.to(cd) + d


def _msam_sgd_new_weights(p, g, v, master, x, v_new, hyper, coef_old) -> Tensor:
    """The true weights after the step: the old perturbation removed, then ``- lr * v_new``."""
    w = _true_weights(p, x, master, coef_old)
    return w if g is None else w - hyper[0].to(w.dtype) * v_new


def _adamw_msam_moments(p, g, m, s, t, hyper, grad_scale):
    """``(m_new, s_new, t_new)`` in the compute dtype; the old values without a gradient."""
    cd = compute_dtype(p.dtype)
    if g is None:
        return m.to(cd), s.to(cd), t
    beta1, beta2 = hyper[1], hyper[2]
    g = _unscaled(g, grad_scale)
    m_new = beta1.to(cd) * m.to(cd) + (1 - beta1).to(cd) * g
    s_new = beta2.to(cd) * s.to(cd) + (1 - beta2).to(cd) * g * g
    return m_new, s_new, t + 1


def _adamw_msam_new_weights(p, g, master, x, m_new, s_new, t_new, hyper, coef_old) -> Tensor:
    w = _true_weights(p, x, master, coef_old)
    if g is None:
        return w
    cd = w.dtype
    lr, beta1, beta2, eps, weight_decay = (hyper[i] for i in range(5))
    step_size, bias2_sqrt = adam_bias(lr, beta1, beta2, t_new)
    w = w - step_size.to(cd) * m_new / (torch.sqrt(s_new) / bias2_sqrt.to(cd) + eps.to(cd))
    return w * (1 - lr.to(torch.float64) * weight_decay).to(cd)  # decoupled, after the Adam update


def msam_sgd_partials(
    params: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
    momenta: Sequence[Tensor],
    masters: Sequence[Optional[Tensor]],
    *,
    hyper: Tensor,
    norm_dtype: torch.dtype,
    grad_scale: Optional[Tensor] = None,
    coef_old: Optional[Tensor] = None,
    perturbations: Optional[Sequence[Tensor]] = None,
) -> Tensor:
    """The read-only pass of MSAM-SGD: partial sums of squares of the new momenta.

    ``perturbations`` (adaptive groups, with ``coef_old``): the stored ``x`` the old
    perturbation was applied along; the terms are then ``|w_new| * v_new``, ``w_new`` the true
    weights after the step as they will be stored.
    """
    terms = []
    for i, (p, g, v, master) in enumerate(zip(params, grads, momenta, masters)):
        v_new = _msam_sgd_direction(p, g, v, hyper, grad_scale)
        if perturbations is not None:
            w = _msam_sgd_new_weights(p, g, v, master, perturbations[i], v_new, hyper, coef_old)
            v_new = _rounded_as_stored(w, master if master is not None else p).abs() * v_new
        terms.append(v_new)
    return _partials(terms, grads, norm_dtype, params[0].device)


def msam_sgd_step_(
    params: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
    momenta: Sequence[Tensor],
    masters: Sequence[Optional[Tensor]],
    *,
    hyper: Tensor,
    coef_old: Tensor,
    coef_new: Tensor,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    perturbations: Optional[Sequence[Tensor]] = None,
) -> None:
    """The write pass of MSAM-SGD, all six steps of the algorithm for one bucket::

        d = g + weight_decay * p;  w = p + coef_old * x_old;  v = momentum * v + d
        w = w - lr * v;            p = w - coef_new * x_new

    with ``x = v`` (adaptive: ``x_new = w**2 * v``, stored in ``perturbations``). With a master
    copy, the master holds ``w`` and the parameter ``round(w - coef_new * x_new)``. A parameter
    without a gradient keeps ``w`` and ``v`` and is re-perturbed with ``coef_new``. When
    ``found_inf`` is set nothing is written.
    """
    skip = _skip_mask(found_inf, params[0].device)
    for i, (p, g, v, master) in enumerate(zip(params, grads, momenta, masters)):
        x_old = v if perturbations is None else perturbations[i]
        v_new = _msam_sgd_direction(p, g, v, hyper, grad_scale)
        w = _msam_sgd_new_weights(p, g, v, master, x_old, v_new, hyper, coef_old)
        if g is not None:
            _commit_(v, v_new, skip)
        _write_weights(p, master, w, v_new, coef_new, skip, None if perturbations is None else perturbations[i])


def adamw_msam_partials(
    params: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    masters: Sequence[Optional[Tensor]],
    *,
    hyper: Tensor,
    norm_dtype: torch.dtype,
    grad_scale: Optional[Tensor] = None,
    coef_old: Optional[Tensor] = None,
    perturbations: Optional[Sequence[Tensor]] = None,
) -> Tensor:
    """The read-only pass of AdamW-MSAM: partial sums of squares of the new first moments
    (adaptive: of ``|w_new| * m_new``, as in :func:`msam_sgd_partials`). The non-adaptive pass
    reads only ``grads`` and ``exp_avgs``."""
    terms = []
    for i, (p, g, m, s, t, master) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps, masters)):
        if perturbations is None:
            cd = compute_dtype(p.dtype)
            terms.append(m.to(cd) if g is None else
                         hyper[1].to(cd) * m.to(cd) + (1 - hyper[1]).to(cd) * _unscaled(g, grad_scale))
            continue
        m_new, s_new, t_new = _adamw_msam_moments(p, g, m, s, t, hyper, grad_scale)
        w = _adamw_msam_new_weights(p, g, master, perturbations[i], m_new, s_new, t_new, hyper, coef_old)
        terms.append(_rounded_as_stored(w, master if master is not None else p).abs() * m_new)
    return _partials(terms, grads, norm_dtype, params[0].device)


def adamw_msam_step_(
    params: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    masters: Sequence[Optional[Tensor]],
    *,
    hyper: Tensor,
    coef_old: Tensor,
    coef_new: Tensor,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    perturbations: Optional[Sequence[Tensor]] = None,
) -> None:
    """The write pass of AdamW-MSAM::

        w = p + coef_old * x_old
        m = beta1 * m + (1 - beta1) * g;  s = beta2 * s + (1 - beta2) * g * g;  t = t + 1
        w = w - (lr / (1 - beta1**t)) * m / (sqrt(s) / sqrt(1 - beta2**t) + eps)
        w = w * (1 - lr * weight_decay)
        p = w - coef_new * x_new

    with ``x = m`` (adaptive: ``w**2 * m``) and the bias corrections of :func:`adam_bias`.
    ``steps`` are per-parameter 0-d float32 counters; they advance only for parameters that got
    a gradient, and nothing is written when ``found_inf`` is set.
    """
    skip = _skip_mask(found_inf, params[0].device)
    for i, (p, g, m, s, t, master) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps, masters)):
        x_old = m if perturbations is None else perturbations[i]
        m_new, s_new, t_new = _adamw_msam_moments(p, g, m, s, t, hyper, grad_scale)
        w = _adamw_msam_new_weights(p, g, master, x_old, m_new, s_new, t_new, hyper, coef_old)
        if g is not None:
            _commit_(m, m_new, skip)
            _commit_(s, s_new, skip)
            _commit_(t, t_new, skip)
        _write_weights(p, master, w, m_new, coef_new, skip, None if perturbations is None else perturbations[i])


def _write_weights(p: Tensor, master: Optional[Tensor], w: Tensor, direction: Tensor, coef_new: Tensor,
                   skip: Optional[Tensor], stored_x: Optional[Tensor]) -> None:
    """``p = w - coef_new * x`` (the master copy, if any, keeps ``w``); with ``stored_x``
    (adaptive) ``x = w**2 * direction`` from ``w`` as stored, and ``x`` is kept there."""
    cd = w.dtype
    if master is not None:
        _commit_(master, w, skip)
    x = direction
    if stored_x is not None:
        w = _rounded_as_stored(w, master if master is not None else p)
        x = w * w * direction
        _commit_(stored_x, x, skip)
    _commit_(p, w - coef_new.to(cd) * x, skip)


# ------------------------------------------------------------------------ partial sums
def segment_count(numel: int, device: torch.device) -> int:
    """How many partial sums a pass returns for a tensor of ``numel`` elements (here: one per
    non-empty tensor)."""
    return 1 if numel else 0


def _partials(terms: Sequence[Tensor], grads: Sequence[Optional[Tensor]], norm_dtype: torch.dtype,
              device) -> Tensor:
    """One row per non-empty tensor: its sum of squares (in ``norm_dtype``, stored as float64)
    and its non-finite marker (NaN when its gradient holds inf or NaN)."""
    rows = []
    for t, g in zip(terms, grads):
        if t.numel() == 0:
            continue
        square_sum = t.to(norm_dtype).square().sum().to(torch.float64)
        marker = torch.zeros((), dtype=torch.float64, device=device)
        if g is not None:
            marker = torch.where(torch.isfinite(g).all(), marker, float("nan"))
        rows.append(torch.stack([square_sum, marker]))
    return torch.stack(rows) if rows else torch.zeros((0, 2), dtype=torch.float64, device=device)


def sum_segment_partials(partials: Tensor, norm_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A bucket's sum of squares (in ``norm_dtype``, folded in row order) and non-finite flag
    (0-d bool) from its partials. Partials computed in pieces (during backward) and concatenated
    in tensor order give the same sum as one pass over the bucket."""
    total = torch.zeros((), dtype=norm_dtype, device=partials.device)
    for square_sum in partials[:, 0]:
        total = total + square_sum.to(norm_dtype)
    return total, partials[:, 1].sum().isnan()


def perturbation_coef(sum_of_squares: Tensor, rho: Tensor | float, coef_old: Tensor,
                      found_inf: Optional[Tensor] = None) -> Tensor:
    """``c = rho / (||x|| + EPS_NORM)`` from the global sum of squares, in float64, as a new
    tensor of ``coef_old``'s dtype on its device. ``rho`` is a float or a 0-d tensor (read on
    the device). A skipped step keeps the old coefficient, so the parameters keep holding
    ``w - c_old * x``."""
    rho = torch.as_tensor(rho, dtype=torch.float64, device=sum_of_squares.device)
    coef = rho / (torch.sqrt(sum_of_squares.to(torch.float64)) + EPS_NORM)
    coef = coef.to(coef_old.dtype)
    skip = _skip_mask(found_inf, coef.device)
    return coef if skip is None else torch.where(skip, coef_old, coef)


# --------------------------------------------------- capability "stash": MSAM-SGD during backward
# The overlapped step (msam_fused/overlap.py, docs/overlap.md) may run MSAM-SGD's read-only
# pass during backward (``msam_sgd_partials`` on the buckets whose gradients are ready), or,
# on backends with the "stash" capability, a pass that already writes the new momenta and keeps
# the old ones in the consumed gradients' memory; ``msam_sgd_overlap_finish_`` then completes the
# step with one pass that reads less than ``msam_sgd_step_``.


def msam_sgd_overlap_stash_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    *,
    hyper: Tensor,
    norm_dtype: torch.dtype,
    grad_scale: Optional[Tensor] = None,
) -> Tensor:
    """For float32/float64 parameters: ``v = v_new`` and the old momentum into the gradient's
    memory (the gradient is consumed; its dtype holds the momentum exactly). Returns the partial
    sums of ``v_new`` (those of :func:`msam_sgd_partials`)."""
    for p in params:
        if p.dtype in (torch.bfloat16, torch.float16):
            raise ValueError(f"msam_sgd_overlap_stash_: {p.dtype} parameters have float32 momenta, "
                             "which their gradients cannot hold; use msam_sgd_partials")
    terms = [_msam_sgd_direction(p, g, v, hyper, grad_scale) for p, g, v in zip(params, grads, momenta)]
    partials = _partials(terms, grads, norm_dtype, params[0].device)  # reads g before it is overwritten
    for g, v, v_new in zip(grads, momenta, terms):
        g.copy_(v)
        v.copy_(v_new)
    return partials


def msam_sgd_overlap_finish_(
    params: Sequence[Tensor],
    stashes: Sequence[Optional[Tensor]],
    momenta: Sequence[Tensor],
    *,
    hyper: Tensor,
    coef_old: Tensor,
    coef_new: Tensor,
    found_inf: Optional[Tensor] = None,
) -> None:
    """The rest of a step after :func:`msam_sgd_overlap_stash_`: with ``v_new = momenta`` and
    ``v_old = stashes`` (``None``: no gradient, the momentum stayed),
    ``p = (p + coef_old * v_old) - lr * v_new - coef_new * v_new``. A skipped step puts
    ``v_old`` back and leaves ``p``: bit for bit the state before the stash."""
    skip = _skip_mask(found_inf, params[0].device)
    for p, v_old, v in zip(params, stashes, momenta):
        cd = compute_dtype(p.dtype)
        v_new = v.to(cd)
        w = _true_weights(p, v_new if v_old is None else v_old, None, coef_old)
        if v_old is not None:
            w = w - hyper[0].to(cd) * v_new
            if skip is not None:
                v.copy_(torch.where(skip, v_old, v))
        _commit_(p, w - coef_new.to(cd) * v_new, skip)


# ------------------------------------------------------------------- outside the step
def apply_perturbation_(
    params: Sequence[Tensor],
    directions: Sequence[Tensor],
    masters: Sequence[Optional[Tensor]],
    *,
    coef: Tensor,
) -> None:
    """``p = w - coef * x`` from true weights ``w`` (in the parameters, or in the master copies)
    along the applied directions ``x``: puts a perturbation back, e.g. after loading true
    weights into a model."""
    for p, x, master in zip(params, directions, masters):
        cd = compute_dtype(p.dtype)
        w = (master if master is not None else p).to(cd)
        p.copy_((w - coef.to(cd) * x.to(cd)).to(p.dtype))


def remove_perturbation_(
    params: Sequence[Tensor],
    directions: Sequence[Tensor],
    masters: Sequence[Optional[Tensor]],
    *,
    coef: Tensor,
) -> None:
    """Put the true weights ``w`` into the parameters (for evaluation and export)."""
    for p, x, master in zip(params, directions, masters):
        p.copy_(_true_weights(p, x, master, coef).to(p.dtype))


# ------------------------------------------------------------------------------------ SAM
def sam_ascent_partials(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    adaptive: bool,
    norm_dtype: torch.dtype,
) -> Tensor:
    """SAM's read-only pass: partial sums of squares of ``g`` (adaptive: ``|w| * g``) and the
    non-finite markers of ``g``, as the MSAM passes return them."""
    terms = []
    for p, g in zip(params, grads):
        cd = compute_dtype(p.dtype)
        terms.append(p.to(cd).abs() * g.to(cd) if adaptive else g)
    return _partials(terms, grads, norm_dtype, params[0].device)


def sam_ascent_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    outs: Sequence[Tensor],
    *,
    scale: Tensor,
    adaptive: bool,
    found_inf: Optional[Tensor] = None,
) -> None:
    """SAM's ascent from ``w = params`` (only read): ``outs = w + e`` with
    ``e = scale * g`` (or ``scale * w**2 * g`` when adaptive) and ``scale = rho / ||.||``;
    ``outs = w`` bit for bit when ``found_inf`` is set.

    An out may be its parameter itself (the ascent in place; a skipped step then changes
    nothing). Into a spare buffer, ``w`` stays where it is, so the return to it is exact.
    """
    skip = _skip_mask(found_inf, params[0].device)
    for p, g, out in zip(params, grads, outs):
        cd = compute_dtype(p.dtype)
        w = p.to(cd)
        e = scale.to(cd) * g.to(cd)
        if adaptive:
            e = e * w * w
        new = (w + e).to(out.dtype)
        out.copy_(new if skip is None else torch.where(skip, p, new))


def sam_restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """SAM's descent side: put the remembered weights back."""
    torch._foreach_copy_(list(params), list(backups))
