"""Cosine similarity between the momentum and the next gradient during training (paper §5)."""

from __future__ import annotations

from torch import Tensor
from torch.optim import Optimizer

from msam_fused.tensor_lists import dot, norm

MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")  # SGD/MSAM, AdamW/AdamW-MSAM


class MomentumGradientCosine:
    """Records ``cos(v_t, g_t)`` at every step: the momentum ``v_t`` accumulated from the
    earlier gradients against the gradient ``g_t`` the optimizer is about to step with (the
    "next" gradient, at the perturbed point for MSAM and SAM). The norm and inner product
    run over all parameters that have both.

    Works as a step pre-hook on the optimizer that owns the momentum (the base optimizer of
    SAM-style wrappers); the first step, with no momentum yet, records nothing. Values stay
    on the device until :meth:`history` reads them once.
    """

    def __init__(self, optimizer: Optimizer):
        self.optimizer = getattr(optimizer, "base_optimizer", optimizer)
        self._values: list[Tensor] = []
        self._handle = self.optimizer.register_step_pre_hook(self._record)

    def _record(self, optimizer: Optimizer, args, kwargs) -> None:
        pairs = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                momentum = next((state[k] for k in MOMENTUM_KEYS if k in state), None)
                if p.grad is not None and momentum is not None:
                    pairs.append((momentum, p.grad))
        if pairs:
            v, g = [m for m, _ in pairs], [g for _, g in pairs]
            self._values.append(dot(v, g) / (norm(v) * norm(g)).clamp_min(1e-30))

    def history(self) -> list[float]:
        """The recorded cosines, one per step from the second on."""
        return [float(v) for v in self._values]

    def remove(self) -> None:
        """Stop recording."""
        self._handle.remove()
