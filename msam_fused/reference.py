"""The reference backend: the definition of every step, one tensor at a time, in plain PyTorch.

Every fused kernel (C++/CUDA, Triton) is tested against these functions, so they follow
SPEC §1 literally and favour clarity over speed. They are also the ``backend="reference"``
path: the "authors' style" per-tensor implementation the benchmarks compare against.

Conventions shared by all backends (see ``msam_fused/backends.py`` for the contract):

* Arithmetic runs in the *compute dtype*: float64 for float64 tensors, float32 otherwise
  (bf16/fp16 parameters with fp32 state). Results are rounded to the storage dtype once per
  write, at the same points the two-pass kernels write memory.
* ``coef`` arguments are 0-d tensors on the parameters' device: the perturbation coefficient
  ``c`` that was (or will be) applied. They are never read on the host.
* ``found_inf`` is ``None`` or a device tensor; non-zero means "skip": the call then leaves
  every tensor exactly as it was. ``grad_scale`` is ``None`` or a device tensor that the
  gradients are divided by (AMP ``GradScaler``).
* ``masters`` holds, per parameter, ``None`` or an fp32 master copy of the *true* weights
  ``w``; with a master copy the parameter only ever stores ``round(w - c * v)``.
* A gradient of ``None`` means "this parameter got no gradient this step": its weights and
  state stay as they are, but it is still re-perturbed with the new coefficient so that every
  parameter keeps holding ``w - c * v`` with one coefficient per group.
* Adaptive (ASAM-style) perturbation, for groups that ask for it: the perturbation is
  ``-c * x`` with ``x = w**2 * v`` (elementwise, ``w`` the true weights it is applied at) and
  ``c = rho / || |w| * v ||``. Because ``x`` depends on ``w``, it is stored (``perturbations``)
  as applied, so the old perturbation is removed along exactly the ``x`` that was applied.
  A backend that implements this sets ``supports_adaptive = True`` and accepts
  ``perturbations=`` in ``*_update_`` and ``apply_perturbation_``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

EPS_NORM = 1e-12

name = "reference"
supports_adaptive = True


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _skip_mask(found_inf: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return None if found_inf is None else found_inf.to(device=device) != 0


def _commit_(dst: Tensor, new: Tensor, skip: Optional[Tensor]) -> None:
    """Write ``new`` into ``dst`` (rounding to its dtype) unless the step is skipped."""
    new = new.to(dst.dtype)
    dst.copy_(new if skip is None else torch.where(skip, dst, new))


def _unscaled(grad: Tensor, grad_scale: Optional[Tensor]) -> Tensor:
    g = grad.to(compute_dtype(grad.dtype))
    return g if grad_scale is None else g / grad_scale.to(device=g.device, dtype=g.dtype)


def _new_momentum(p: Tensor, g: Tensor, v: Tensor, weight_decay: float, momentum: float,
                  grad_scale: Optional[Tensor]) -> Tensor:
    """SPEC §1 steps 1 and 3: ``v' = momentum * v + (g + weight_decay * p)``, in compute dtype."""
    cd = compute_dtype(p.dtype)
    d = _unscaled(g, grad_scale) + weight_decay * p.to(cd)
    return momentum * v.to(cd) + d


def _true_weights(p: Tensor, direction: Tensor, master: Optional[Tensor], coef: Tensor) -> Tensor:
    """``w``: the master copy, or the stored (perturbed) value plus ``c * direction``."""
    if master is not None:
        return master.clone()
    cd = compute_dtype(p.dtype)
    return p.to(cd) + coef.to(cd) * direction.to(cd)


def _norm_term(direction: Tensor, w: Tensor, stored: Tensor, adaptive: bool) -> Tensor:
    """A term of the perturbation norm: the direction, or ``|w| * direction`` for an adaptive
    group, with ``w`` rounded as the second pass will read it back from ``stored``."""
    return w.to(stored.dtype).to(w.dtype).abs() * direction if adaptive else direction


def _sum_of_squares(tensors: Sequence[Tensor], norm_dtype: torch.dtype, device) -> Tensor:
    total = torch.zeros((), dtype=norm_dtype, device=device)
    for t in tensors:
        total = total + t.to(norm_dtype).square().sum()
    return total


def msam_sgd_update_(
    params: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
    momenta: Sequence[Tensor],
    masters: Sequence[Optional[Tensor]],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    coef: Tensor,
    norm_dtype: torch.dtype,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    perturbations: Optional[Sequence[Tensor]] = None,
) -> Tensor:
    """First pass of MSAM-SGD (SPEC §1 steps 1-4) for the tensors of one bucket.

    Leaves the parameters at the true, updated weights ``w`` (or updates the master copy) and
    returns the bucket's sum of squares of the new momentum, for the global norm.

    ``perturbations`` (adaptive groups): the stored ``x`` the old perturbation was applied
    along; it is removed along them, and the sum of squares is that of ``|w_new| * v_new``.
    """
    device = params[0].device
    skip = _skip_mask(found_inf, device)
    adaptive = perturbations is not None
    terms = []
    for p, g, v, master, x in zip(params, grads, momenta, masters, perturbations or momenta):
        cd = compute_dtype(p.dtype)
        w = _true_weights(p, x, master, coef)
        if g is None:
            v_new = v.to(cd)
        else:
            v_new = _new_momentum(p, g, v, weight_decay, momentum, grad_scale)
            w = w - lr * v_new
            _commit_(v, v_new, skip)
        stored = master if master is not None else p
        _commit_(stored, w, skip)
        terms.append(_norm_term(v_new, w, stored, adaptive))
    return _sum_of_squares(terms, norm_dtype, device)


def adamw_msam_update_(
    params: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    masters: Sequence[Optional[Tensor]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    coef: Tensor,
    norm_dtype: torch.dtype,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    perturbations: Optional[Sequence[Tensor]] = None,
) -> Tensor:
    """First pass of AdamW-MSAM (SPEC §1 steps 1-4); returns the bucket's sum of ``m**2``
    (of ``(|w_new| * m_new)**2`` with ``perturbations``, as in :func:`msam_sgd_update_`).

    ``steps`` are per-parameter 0-d float32 counters on the device; they advance only for
    parameters that got a gradient and only when the step is not skipped.
    """
    device = params[0].device
    skip = _skip_mask(found_inf, device)
    adaptive = perturbations is not None
    terms = []
    for p, g, m, s, t, master, x in zip(params, grads, exp_avgs, exp_avg_sqs, steps, masters,
                                        perturbations or exp_avgs):
        cd = compute_dtype(p.dtype)
        w = _true_weights(p, x, master, coef)
        if g is None:
            m_new = m.to(cd)
        else:
            g = _unscaled(g, grad_scale)
            m_new = beta1 * m.to(cd) + (1 - beta1) * g
            s_new = beta2 * s.to(cd) + (1 - beta2) * g * g
            t_new = t + 1
            tc = t_new.to(cd)
            bias1 = 1 - torch.pow(torch.tensor(beta1, dtype=cd, device=device), tc)
            bias2_sqrt = torch.sqrt(1 - torch.pow(torch.tensor(beta2, dtype=cd, device=device), tc))
            w = w - (lr / bias1) * m_new / (torch.sqrt(s_new) / bias2_sqrt + eps)
            w = w * (1 - lr * weight_decay)
            _commit_(m, m_new, skip)
            _commit_(s, s_new, skip)
            _commit_(t, t_new, skip)
        stored = master if master is not None else p
        _commit_(stored, w, skip)
        terms.append(_norm_term(m_new, w, stored, adaptive))
    return _sum_of_squares(terms, norm_dtype, device)


# ------------------------------------------------------------- MSAM-SGD overlapped with backward
# The first pass of a step runs during backward, a few tensors at a time, as their gradients
# become ready (msam_fused/overlap.py, docs/overlap.md). Each call returns *partial sums*: a
# float64 tensor [segments, 2] holding, per segment, the sum of squares of the new momentum and
# a non-finite marker (0, or NaN when a gradient entry is inf or NaN). The optimizer puts them
# in the order the plain step would have summed them, and ``sum_segment_partials`` adds them
# up as that step does, so the global norm does not depend on when the gradients arrived.
# Here a segment is a whole tensor, summed in norm_dtype, and the sum is a fold in norm_dtype
# (as msam_sgd_update_ sums); the fused kernels cut tensors into fixed segments.


def segment_count(numel: int, device: torch.device) -> int:
    """How many partial sums the overlapped passes return for a tensor of ``numel`` elements."""
    return 1 if numel else 0


def _partials(terms: Sequence[Tensor], grads: Sequence[Optional[Tensor]], norm_dtype: torch.dtype,
              device) -> Tensor:
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


def msam_sgd_overlap_norm(
    params: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
    momenta: Sequence[Tensor],
    *,
    weight_decay: float,
    momentum: float,
    norm_dtype: torch.dtype,
    grad_scale: Optional[Tensor] = None,
) -> Tensor:
    """The overlapped first pass that only reads: partial sums of the new momenta (those of
    ``msam_sgd_update_``; a ``None`` gradient keeps the momentum)."""
    terms = [v.to(compute_dtype(p.dtype)) if g is None else
             _new_momentum(p, g, v, weight_decay, momentum, grad_scale)
             for p, g, v in zip(params, grads, momenta)]
    return _partials(terms, grads, norm_dtype, params[0].device)


def msam_sgd_overlap_stash_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    *,
    weight_decay: float,
    momentum: float,
    norm_dtype: torch.dtype,
    grad_scale: Optional[Tensor] = None,
) -> Tensor:
    """The overlapped first pass that writes, for float32/float64 parameters: ``v = v'`` (the
    new momentum, SPEC §1 step 3) and the old momentum into the gradient's memory (the gradient
    is consumed; its dtype holds the momentum exactly). Returns the partial sums of ``v'``.
    :func:`msam_sgd_overlap_finish_` completes the step, or undoes this one."""
    for p in params:
        if p.dtype in (torch.bfloat16, torch.float16):
            raise ValueError(f"msam_sgd_overlap_stash_: {p.dtype} parameters have float32 momenta, "
                             "which their gradients cannot hold; use msam_sgd_overlap_norm")
    terms = [_new_momentum(p, g, v, weight_decay, momentum, grad_scale)
             for p, g, v in zip(params, grads, momenta)]
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
    lr: float,
    coef_old: Tensor,
    coef_new: Tensor,
    found_inf: Optional[Tensor] = None,
) -> None:
    """The rest of a step after :func:`msam_sgd_overlap_stash_` and the global norm: with
    ``v' = momenta`` and ``v_old = stashes`` (``None``: that parameter had no gradient and its
    momentum stayed), ``p = (p + coef_old v_old) - lr v' - coef_new v'`` (SPEC §1 steps 2, 4,
    6). A skipped step (``found_inf``) puts ``v_old`` back and leaves ``p``: bit for bit the
    state before the stash."""
    skip = _skip_mask(found_inf, params[0].device)
    for p, v_old, v in zip(params, stashes, momenta):
        cd = compute_dtype(p.dtype)
        v_new = v.to(cd)
        w = _true_weights(p, v_new if v_old is None else v_old, None, coef_old)
        if v_old is not None:
            w = w - lr * v_new
            if skip is not None:
                v.copy_(torch.where(skip, v_old, v))
        _commit_(p, w - coef_new.to(cd) * v_new, skip)


def sum_segment_partials(partials: Tensor, norm_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A bucket's sum of squares (in ``norm_dtype``) and non-finite flag from the partial sums
    of its tensors, in tensor order."""
    total = torch.zeros((), dtype=norm_dtype, device=partials.device)
    for square_sum in partials[:, 0]:
        total = total + square_sum.to(norm_dtype)
    return total, partials[:, 1].sum().isnan()


def perturbation_coef(sum_of_squares: Tensor, rho: float, coef_old: Tensor,
                      found_inf: Optional[Tensor] = None) -> Tensor:
    """Finalize: ``c = rho / (||x|| + EPS_NORM)`` from the global sum of squares, on the device.

    A skipped step keeps the old coefficient, so the parameters keep holding ``w - c_old * v``.
    """
    coef = rho / (torch.sqrt(sum_of_squares) + EPS_NORM)
    coef = coef.to(coef_old.dtype)
    skip = _skip_mask(found_inf, coef.device)
    return coef if skip is None else torch.where(skip, coef_old, coef)


def apply_perturbation_(
    params: Sequence[Tensor],
    directions: Sequence[Tensor],
    masters: Sequence[Optional[Tensor]],
    *,
    coef: Tensor,
    found_inf: Optional[Tensor] = None,
    perturbations: Optional[Sequence[Tensor]] = None,
) -> None:
    """Second pass (SPEC §1 step 6): ``p = w - c * direction``, with ``w`` where the first pass
    left it (in the parameter itself, or in the master copy).

    With ``perturbations`` (adaptive groups) the perturbation is along ``x = w**2 * direction``
    instead, and ``x`` is stored in them, for the next step's removal.
    """
    skip = _skip_mask(found_inf, params[0].device)
    for p, d, master, stored_x in zip(params, directions, masters, perturbations or directions):
        cd = compute_dtype(p.dtype)
        w = (master if master is not None else p).to(cd)
        x = d.to(cd)
        if perturbations is not None:
            x = w * w * x
            _commit_(stored_x, x, skip)
        _commit_(p, w - coef.to(cd) * x, skip)


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


def sam_ascent_sum_of_squares(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    adaptive: bool,
    norm_dtype: torch.dtype,
) -> Tensor:
    """SAM's ascent norm, first half: the bucket's sum of squares of ``g`` (or ``|w| * g``)."""
    terms = []
    for p, g in zip(params, grads):
        cd = compute_dtype(p.dtype)
        terms.append(p.to(cd).abs() * g.to(cd) if adaptive else g)
    return _sum_of_squares(terms, norm_dtype, params[0].device)


def sam_ascent_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    *,
    scale: Tensor,
    adaptive: bool,
    found_inf: Optional[Tensor] = None,
) -> None:
    """SAM's ascent: remember ``w`` in ``backups``, then ``p = w + e`` with
    ``e = scale * g`` (or ``scale * w**2 * g`` when adaptive) and ``scale = rho / ||.||``.

    Restoring copies the backup back, so the return to ``w`` is exact bit for bit.
    """
    skip = _skip_mask(found_inf, params[0].device)
    for p, g, backup in zip(params, grads, backups):
        cd = compute_dtype(p.dtype)
        backup.copy_(p)
        w = p.to(cd)
        e = scale.to(cd) * g.to(cd)
        if adaptive:
            e = e * w * w
        _commit_(p, w + e, skip)


def sam_restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """SAM's descent side: put the remembered weights back."""
    torch._foreach_copy_(list(params), list(backups))
