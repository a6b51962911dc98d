"""The ``backend="triton"`` backend: every fused op of ``msam_fused.reference`` in Triton.

The functions below have the signatures and results of ``msam_fused.reference`` (the
contract in ``msam_fused/backends.py``); they call the ``torch.ops.msam_triton`` ops of
``ops.py``, which launch the kernels of ``kernels.py`` over a table of tensor addresses
(``layout.py``). See ``docs/triton.md``.

CUDA (and ROCm) tensors run compiled kernels. CPU tensors run only under the Triton
interpreter (``TRITON_INTERPRET=1`` set before triton is first imported), which is how the
tests run without a GPU.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from msam_fused.triton_kernels import ops

name = "triton"


def unavailable_reason(device) -> Optional[str]:
    """None if this backend can run tensors on ``device``, else why not."""
    device = torch.device(device)
    if ops.INTERPRETED:
        if device.type == "cpu":
            return None
        return (f"TRITON_INTERPRET=1 is set, so Triton runs kernels on the CPU and cannot run "
                f"{device} tensors; unset it to use the GPU")
    if device.type == "cpu":
        return ("CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1 "
                "before importing triton; slow, meant for tests); use backend='cpu' or "
                "'reference' for CPU training")
    if device.type != "cuda":
        return f"Triton kernels run on CUDA/ROCm GPUs, not on {device.type}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA/ROCm GPU"
    return None


capabilities: frozenset[str] = frozenset({"stash"})


def segment_count(numel: int, device) -> int:
    """Rows of partial sums a tensor of ``numel`` elements contributes: one per segment of
    ``kernels.CHUNK`` elements (0 for an empty tensor)."""
    return ops.segment_count(numel)


def _fused_only(where: str, perturbations) -> None:
    """The adaptive variant is the reference's alone (``coef_old`` matters only with it)."""
    if perturbations is not None:
        raise NotImplementedError(f"{where}: the adaptive perturbation (perturbations=...) is "
                                  "implemented by the reference backend only")


def msam_sgd_partials(params, grads, momenta, masters, *, hyper, norm_dtype, grad_scale=None,
                      coef_old=None, perturbations=None) -> Tensor:
    _fused_only("msam_sgd_partials", perturbations)
    return ops.msam_sgd_partials(list(params), list(grads), list(momenta), hyper, norm_dtype,
                                 grad_scale)


def adamw_msam_partials(params, grads, exp_avgs, exp_avg_sqs, steps, masters, *, hyper, norm_dtype,
                        grad_scale=None, coef_old=None, perturbations=None) -> Tensor:
    _fused_only("adamw_msam_partials", perturbations)
    return ops.adamw_msam_partials(list(params), list(grads), list(exp_avgs), hyper, norm_dtype,
                                   grad_scale)


def sum_segment_partials(partials: Tensor, norm_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return ops.sum_segment_partials(partials, norm_dtype)


def perturbation_coef(sum_of_squares, rho, coef_old, found_inf=None) -> Tensor:
    if not isinstance(rho, Tensor):  # a fill on the device: no host-to-device copy
        rho = torch.full((), rho, dtype=torch.float64, device=sum_of_squares.device)
    return ops.perturbation_coef(sum_of_squares, rho, coef_old, found_inf)


def msam_sgd_step_(params, grads, momenta, masters, *, hyper, coef_old, coef_new, grad_scale=None,
                   found_inf=None, perturbations=None) -> None:
    _fused_only("msam_sgd_step_", perturbations)

    def step(indices, with_masters):
        ops.msam_sgd_step_([params[i] for i in indices], [grads[i] for i in indices],
                           [momenta[i] for i in indices],
                           [masters[i] for i in indices] if with_masters else [],
                           hyper, coef_old, coef_new, grad_scale, found_inf)
    _per_master_kind(masters, step)


def adamw_msam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, masters, *, hyper, coef_old,
                     coef_new, grad_scale=None, found_inf=None, perturbations=None) -> None:
    _fused_only("adamw_msam_step_", perturbations)

    def step(indices, with_masters):
        ops.adamw_msam_step_([params[i] for i in indices], [grads[i] for i in indices],
                             [exp_avgs[i] for i in indices], [exp_avg_sqs[i] for i in indices],
                             [steps[i] for i in indices],
                             [masters[i] for i in indices] if with_masters else [],
                             hyper, coef_old, coef_new, grad_scale, found_inf)
    _per_master_kind(masters, step)


def _per_master_kind(masters: Sequence[Optional[Tensor]], run) -> None:
    """``run(indices, with_masters)`` for the parameters without and those with a master
    copy (a bucket normally has only one kind): the mutating ops take masters as a plain list,
    since torch's auto-functionalization fails on a mutable ``Tensor?[]`` holding None."""
    with_master = [i for i, m in enumerate(masters) if m is not None]
    without = [i for i, m in enumerate(masters) if m is None]
    for indices, kind in ((without, False), (with_master, True)):
        if indices:
            run(indices, kind)


def msam_sgd_overlap_stash_(params, grads, momenta, *, hyper, norm_dtype, grad_scale=None) -> Tensor:
    return ops.msam_sgd_overlap_stash_(list(params), list(grads), list(momenta), hyper, norm_dtype,
                                       grad_scale)


def msam_sgd_overlap_finish_(params, stashes, momenta, *, hyper, coef_old, coef_new,
                             found_inf=None) -> None:
    ops.msam_sgd_overlap_finish_(list(params), list(stashes), list(momenta), hyper, coef_old,
                                 coef_new, found_inf)


def apply_perturbation_(params, directions, masters, *, coef) -> None:
    ops.perturb_(list(params), list(directions), list(masters), coef, -1)


def remove_perturbation_(params, directions, masters, *, coef) -> None:
    ops.perturb_(list(params), list(directions), list(masters), coef, 1)


def sam_ascent_partials(params, grads, *, adaptive, norm_dtype) -> Tensor:
    return ops.sam_ascent_partials(list(params), list(grads), adaptive, norm_dtype)


def sam_ascent_(params, grads, outs, *, scale, adaptive, found_inf=None) -> None:
    ops.sam_ascent_(list(params), list(grads), list(outs), scale, adaptive, found_inf)


def sam_restore_(params, backups) -> None:
    ops.sam_restore_(list(params), list(backups))


tune = ops.tune
