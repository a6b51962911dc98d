"""MSAM: SGD with momentum, evaluated at the point the momentum says is uphill (docs/design.md)."""

from __future__ import annotations

from typing import Optional

import torch

from msam_fused import reference
from msam_fused.momentum_ascent import Algorithm, MomentumAscentOptimizer
from msam_fused.overlap import DEFAULT_BUCKET_CAP_MB, OverlappedBackward
from msam_fused.validation import check_hyperparameter

#: MSAM-SGD's part of the step (see msam_fused/momentum_ascent.py)
MSAM_SGD = Algorithm(
    direction_key="momentum_buffer", state_keys=("momentum_buffer",), counter_keys=frozenset(),
    hyper_sources=tuple((key, None) for key in reference.MSAM_SGD_HYPER),
    partials="msam_sgd_partials", step="msam_sgd_step_")


class MSAM(MomentumAscentOptimizer):
    r"""Momentum-SAM with SGD momentum (Becker et al., arXiv 2401.12033, Algorithm 1).

    A drop-in for ``torch.optim.SGD(momentum=...)``: one forward/backward per step, like SGD,
    yet sharpness-aware, because the parameters always hold the perturbed weights
    ``p = w - c * v`` with ``c = rho / ||v||`` (global norm over all param groups). Per step,
    with ``g`` the gradient at ``p``::

        d = g + weight_decay * p          # coupled decay, at the perturbed point
        p = p + c_old * v                 # back to the true weights w
        v = momentum * v + d
        p = p - lr * v
        c_new = rho / (||v|| + EPS_NORM) # one global norm; per-group rho; EPS_NORM = 1e-12
        p = p - c_new * v                 # the new perturbation; c_new is remembered

    Evaluate or export under :meth:`unperturbed` (or :meth:`unperturbed_state_dict`).

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        lr, momentum, weight_decay: as in ``torch.optim.SGD``.
        rho: perturbation radius (``>= 0``; ``0`` is plain SGD with momentum). MSAM's best
            rho is larger than SAM's, typically 0.3-3.
        backend: ``"auto"`` (fastest available, says once if it falls back), ``"cuda"``,
            ``"triton"``, ``"cpu"`` (fused C++), or ``"reference"`` (per-tensor PyTorch).
        nonfinite: ``"skip"`` (default) skips the whole step, perturbation included, when a
            gradient holds inf/NaN, and counts it in :attr:`skipped_steps`; ``"raise"`` raises
            (this reads a device flag on the host every step).
        master_weights: keep fp32 copies of the true weights of bf16/fp16 parameters.
        adaptive: ASAM-style perturbation ``-c * w**2 * v`` with ``c = rho / || |w| * v ||``
            (per group; the norm stays global). Costs one more state tensor per parameter.
        nesterov, dampening: accepted only to reject them: MSAM is defined for plain momentum.

    Param groups may also carry ``perturb=False``: such a group is never perturbed and stays
    out of the global norm (e.g. all but the normalization layers:
    :func:`msam_fused.variants.perturbation_param_groups`). See docs/variants.md.

    Parameters whose ``grad`` is ``None`` in a step keep their weights and momentum (as in
    ``torch.optim.SGD``) but are re-perturbed with the new coefficient, so every parameter
    keeps holding ``w - c * v``; parameters that never had a gradient are never touched.
    """

    algorithm = MSAM_SGD
    torch_counterpart = "torch.optim.SGD"

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 rho: float = 0.3, *, adaptive: bool = False, nesterov: bool = False,
                 dampening: float = 0.0, backend: str = "auto", nonfinite: str = "skip",
                 master_weights: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, rho=rho,
                        adaptive=adaptive, nesterov=nesterov, dampening=dampening)
        super().__init__(params, defaults, backend=backend, nonfinite=nonfinite,
                         master_weights=master_weights)

    @classmethod
    def check_hyperparameters(cls, where: str, group: dict) -> None:
        for key in ("lr", "weight_decay", "rho"):
            check_hyperparameter(where, key, group[key])
        check_hyperparameter(where, "momentum", group["momentum"], high=1.0)
        if group.get("nesterov", False):
            raise ValueError(f"{where}: nesterov=True is not part of MSAM (the perturbation is "
                             "along the plain momentum); use nesterov=False")
        if group.get("dampening", 0.0):
            raise ValueError(f"{where}: dampening={group['dampening']} is not part of MSAM; use 0")

    def overlap_backward(self, model: Optional[torch.nn.Module] = None, *,
                         scaler: Optional[torch.amp.GradScaler] = None,
                         bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB) -> OverlappedBackward:
        """Run the first pass of each step during backward, as gradients become ready, so that
        after backward only one pass over memory (float32/float64: 4 passes, less than fused
        SGD's 5) is left for :meth:`step`. Same trajectory as the plain step, bit for bit.

        Args:
            model: the module being trained; pass the ``DistributedDataParallel`` module under
                DDP (the pass then runs on the all-reduced gradients, in DDP's communication hook).
            scaler: the ``torch.amp.GradScaler`` scaling the loss, if any; ``scaler.step(opt)``
                and ``scaler.update()`` then work as usual.
            bucket_cap_mb: parameters per pass (like DDP's buckets).

        Between backward and ``step()`` the gradients are consumed (``p.grad`` raises when
        used): no clipping, no ``scaler.unscale_``. ``zero_grad()`` undoes the pass; gradient
        accumulation runs all but the last backward inside ``with handle.paused():``. Returns a
        handle; ``handle.remove()`` goes back to the plain step. See docs/overlap.md.
        """
        return OverlappedBackward(self, model, scaler=scaler, bucket_cap_mb=bucket_cap_mb)
