"""AdamW-MSAM: the MSAM idea on AdamW, perturbing along the first moment (docs/design.md)."""

from __future__ import annotations

from msam_fused.momentum_ascent import Algorithm, MomentumAscentOptimizer
from msam_fused.validation import check_betas, check_hyperparameter

#: AdamW-MSAM's part of the step: ``hyper`` is reference.ADAMW_MSAM_HYPER, the betas taken
#: from the group's ``betas`` pair
ADAMW_MSAM = Algorithm(
    direction_key="exp_avg", state_keys=("exp_avg", "exp_avg_sq", "step"), counter_keys=frozenset({"step"}),
    hyper_sources=(("lr", None), ("betas", 0), ("betas", 1), ("eps", None), ("weight_decay", None),
                   ("rho", None)),
    partials="adamw_msam_partials", step="adamw_msam_step_")


class AdamWMSAM(MomentumAscentOptimizer):
    r"""Momentum-SAM on AdamW (the paper's optimizer for ViTs).

    Parameters hold ``p = w - c * m`` between steps, ``c = rho / ||m||``. Per step, with the
    gradient ``g`` taken at ``p`` and the per-parameter step count ``t`` (from 1)::

        p = p + c_old * m
        m = b1 * m + (1 - b1) * g;  s = b2 * s + (1 - b2) * g * g
        p = p - (lr / (1 - b1**t)) * m / (sqrt(s) / sqrt(1 - b2**t) + eps)
        p = p * (1 - lr * weight_decay)          # decoupled decay, after the Adam update
        c_new = rho / (||m|| + EPS_NORM);  p = p - c_new * m   # EPS_NORM = 1e-12

    Arguments as in ``torch.optim.AdamW`` plus ``rho``, ``adaptive``, ``backend``,
    ``nonfinite`` and ``master_weights``, and the group option ``perturb`` (see
    :class:`~msam_fused.MSAM`; adaptive perturbs along ``w**2 * m``). ``amsgrad`` is not
    supported.
    The paper's ViT recipe uses ``rho = 0`` during the LR warm-up and clips gradients at 1.0
    (clip before :meth:`step`).
    """

    algorithm = ADAMW_MSAM
    torch_counterpart = "torch.optim.AdamW"

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
            check_hyperparameter(where, key, group[key])
        check_betas(where, group["betas"])
        if group.get("amsgrad", False):
            raise ValueError(f"{where}: amsgrad=True is not supported by AdamWMSAM")
