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


def msam_sgd_update_(params, grads, momenta, masters, *, lr, weight_decay, momentum, coef,
                     norm_dtype, grad_scale=None, found_inf=None) -> Tensor:
    def update(indices, with_masters):
        return ops.msam_sgd_update_(
            [params[i] for i in indices], [grads[i] for i in indices],
            [momenta[i] for i in indices], [masters[i] for i in indices] if with_masters else [],
            lr, weight_decay, momentum, coef, norm_dtype, grad_scale, found_inf)
    return _per_master_kind(masters, update)


def adamw_msam_update_(params, grads, exp_avgs, exp_avg_sqs, steps, masters, *, lr, beta1, beta2,
                       eps, weight_decay, coef, norm_dtype, grad_scale=None, found_inf=None) -> Tensor:
    def update(indices, with_masters):
        return ops.adamw_msam_update_(
            [params[i] for i in indices], [grads[i] for i in indices],
            [exp_avgs[i] for i in indices], [exp_avg_sqs[i] for i in indices],
            [steps[i] for i in indices], [masters[i] for i in indices] if with_masters else [],
            lr, beta1, beta2, eps, weight_decay, coef, norm_dtype, grad_scale, found_inf)
    return _per_master_kind(masters, update)


def _per_master_kind(masters: Sequence[Optional[Tensor]], update) -> Tensor:
    """Run ``update(indices, with_masters)`` for the parameters with and those without a
    master copy (a bucket normally has only one kind) and add their sums of squares."""
    with_master = [i for i, m in enumerate(masters) if m is not None]
    without = [i for i, m in enumerate(masters) if m is None]
    sums = [update(idx, kind) for idx, kind in ((without, False), (with_master, True)) if idx]
    return sums[0] if len(sums) == 1 else sums[0] + sums[1]


def perturbation_coef(sum_of_squares, rho, coef_old, found_inf=None) -> Tensor:
    return ops.perturbation_coef(sum_of_squares, rho, coef_old, found_inf)


def apply_perturbation_(params, directions, masters, *, coef, found_inf=None) -> None:
    ops.apply_perturbation_(list(params), list(directions), list(masters), coef, found_inf)


def remove_perturbation_(params, directions, masters, *, coef) -> None:
    ops.remove_perturbation_(list(params), list(directions), list(masters), coef)


def sam_ascent_sum_of_squares(params, grads, *, adaptive, norm_dtype) -> Tensor:
    return ops.sam_ascent_sum_of_squares(list(params), list(grads), adaptive, norm_dtype)


def sam_ascent_(params, grads, backups, *, scale, adaptive, found_inf=None) -> None:
    ops.sam_ascent_(list(params), list(grads), list(backups), scale, adaptive, found_inf)


def sam_restore_(params, backups) -> None:
    ops.sam_restore_(list(params), list(backups))
