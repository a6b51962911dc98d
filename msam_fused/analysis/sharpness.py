"""Loss along a direction in weight space: the momentum, the gradient, a random direction
(paper §5-6: the loss rises fastest along the gradient, and along the momentum MSAM uses)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from msam_fused.analysis.cosine import MOMENTUM_KEYS
from msam_fused.tensor_lists import norm


def unit(direction: Sequence[Tensor]) -> list[Tensor]:
    """``direction / ||direction||`` (global norm over the list)."""
    length = norm(direction)
    return [d / length.to(d.device, d.dtype) for d in direction]


def momentum_direction(optimizer: Optimizer, params: Sequence[Tensor]) -> list[Tensor]:
    """The optimizer's momentum (first moment for AdamW) of each parameter, zeros where none.
    MSAM's perturbation is along minus this direction."""
    owner = getattr(optimizer, "base_optimizer", optimizer)
    out = []
    for p in params:
        state = owner.state.get(p, {})
        momentum = next((state[k] for k in MOMENTUM_KEYS if k in state), None)
        out.append(torch.zeros_like(p) if momentum is None else momentum.detach().to(p.dtype).clone())
    return out


def gradient_direction(params: Sequence[Tensor], loss_fn: Callable[[], Tensor]) -> list[Tensor]:
    """The gradient of ``loss_fn()`` with respect to ``params`` (zeros where unused); leaves
    ``.grad`` alone."""
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def random_direction(params: Sequence[Tensor], seed: int = 0) -> list[Tensor]:
    """A standard normal direction, reproducible from ``seed`` whatever the device."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]


@torch.no_grad()
def loss_along(params: Sequence[Tensor], direction: Sequence[Tensor], radii: Sequence[float],
               loss_fn: Callable[[], Tensor]) -> list[float]:
    """``loss_fn()`` at ``w + r * d / ||d||`` for each ``r`` in ``radii``, with ``w`` what
    ``params`` hold now; ``params`` are put back bit for bit afterwards."""
    d = unit(direction)
    saved = [p.detach().clone() for p in params]
    losses = []
    try:
        for r in radii:
            for p, w, di in zip(params, saved, d):
                p.copy_(w + r * di)
            losses.append(float(loss_fn()))
    finally:
        for p, w in zip(params, saved):
            p.copy_(w)
    return losses
