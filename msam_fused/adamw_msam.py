"""AdamW-MSAM: the MSAM idea on AdamW, perturbing along the first moment (SPEC §1)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from msam_fused.momentum_ascent import Bucket, MomentumAscentOptimizer
from msam_fused.validation import check_betas, check_number


class AdamWMSAM(MomentumAscentOptimizer):
    r"""Momentum-SAM on AdamW (the paper's optimizer for ViTs).

    Parameters hold ``p = w - c * m`` between steps, ``c = rho / ||m||``. Per step, with the
    gradient ``g`` taken at ``p`` and the per-parameter step count ``t`` (from 1)::

        p = p + c_old * m
        m = b1 * m + (1 - b1) * g;  s = b2 * s + (1 - b2) * g * g
        p = p - (lr / (1 - b1**t)) * m / (sqrt(s) / sqrt(1 - b2**t) + eps)
        p = p * (1 - lr * weight_decay)          # decoupled decay, after the Adam update
        c_new = rho / (||m|| + 1e-12);  p = p - c_new * m

    Arguments as in ``torch.optim.AdamW`` plus ``rho``, ``adaptive``, ``backend``,
    ``nonfinite`` and ``master_weights``, and the group option ``perturb`` (see
    :class:`~msam_fused.MSAM`; adaptive perturbs along ``w**2 * m``). ``amsgrad`` is not
    supported.
    The paper's ViT recipe uses ``rho = 0`` during the LR warm-up and clips gradients at 1.0
    (clip before :meth:`step`).
    """

    hyperparameter_keys = ("lr", "betas", "eps", "weight_decay", "rho")
    torch_counterpart = "torch.optim.AdamW"
    direction_key = "exp_avg"
    one_pass_functions = ("adamw_msam_sum_of_squares", "adamw_msam_step_")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, rho: float = 1.0, *, adaptive: bool = False,
                 amsgrad: bool = False, backend: str = "auto", nonfinite: str = "skip",
                 master_weights: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, rho=rho, adaptive=adaptive, amsgrad=amsgrad)
        super().__init__(params, defaults, backend=backend, nonfinite=nonfinite,
                         master_weights=master_weights)

    @classmethod
    def check_hyperparameters(cls, where: str, group: dict) -> None:
        for key in ("lr", "eps", "weight_decay", "rho"):
            check_number(where, key, group[key])
        check_betas(where, group["betas"])
        if group.get("amsgrad", False):
            raise ValueError(f"{where}: amsgrad=True is not supported by AdamWMSAM")

    def _state_spec(self, p: Tensor) -> dict[str, tuple]:
        dtype = self._state_dtype(p)
        return {"exp_avg": (p.shape, dtype), "exp_avg_sq": (p.shape, dtype),
                "step": ((), torch.float32), **self._common_state_spec(p)}

    def _update_bucket(self, bucket: Bucket, coef: Tensor, norm_dtype: torch.dtype,
                       grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> Tensor:
        g = bucket.group
        beta1, beta2 = g["betas"]
        return bucket.backend.adamw_msam_update_(
            bucket.params, bucket.grads, bucket.column("exp_avg"), bucket.column("exp_avg_sq"),
            bucket.column("step"), bucket.column("master_weight"), lr=g["lr"], beta1=beta1,
            beta2=beta2, eps=g["eps"], weight_decay=g["weight_decay"], coef=coef,
            norm_dtype=norm_dtype, grad_scale=grad_scale, found_inf=found_inf,
            **bucket.adaptive_kwargs())

    def _bucket_sum_of_squares(self, bucket: Bucket, norm_dtype: torch.dtype,
                               grad_scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return bucket.backend.adamw_msam_sum_of_squares(
            bucket.params, bucket.grads, bucket.column("exp_avg"), beta1=bucket.group["betas"][0],
            norm_dtype=norm_dtype, grad_scale=grad_scale)

    def _step_bucket(self, bucket: Bucket, coef_old: Tensor, coef_new: Tensor,
                     grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        g = bucket.group
        beta1, beta2 = g["betas"]
        bucket.backend.adamw_msam_step_(
            bucket.params, bucket.grads, bucket.column("exp_avg"), bucket.column("exp_avg_sq"),
            bucket.column("step"), bucket.column("master_weight"), lr=g["lr"], beta1=beta1,
            beta2=beta2, eps=g["eps"], weight_decay=g["weight_decay"], coef_old=coef_old,
            coef_new=coef_new, grad_scale=grad_scale, found_inf=found_inf)
