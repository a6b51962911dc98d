"""Feature rank: the number of principal components that explain 99% of the variance of the
penultimate layer's features (the definition of Andriushchenko et al., "Sharpness-Aware
Minimization Leads to Low-Rank Features", which the MSAM paper follows)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def explained_variance_ratio(features: Tensor) -> Tensor:
    """The fraction of the variance of ``features`` (``[samples, dims]``) along each principal
    component, largest first (PCA: the columns are centered), in float64."""
    if features.dim() != 2:
        raise ValueError(f"features must be [samples, dims], got shape {tuple(features.shape)}")
    centered = features.double() - features.double().mean(dim=0, keepdim=True)
    variance = torch.linalg.svdvals(centered) ** 2
    total = variance.sum()
    return variance / total if total > 0 else variance


def feature_rank(features: Tensor, threshold: float = 0.99) -> int:
    """How many principal components explain ``threshold`` of the variance (0 for constant
    features)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    ratio = explained_variance_ratio(features)
    if ratio.sum() == 0:
        return 0
    reached = torch.cumsum(ratio, 0) >= threshold * (1 - 1e-12)  # rounding of a sum that is exactly there
    return int(torch.nonzero(reached)[0]) + 1


@torch.no_grad()
def penultimate_features(model: nn.Module, inputs: Tensor, layer: Optional[nn.Module] = None,
                         batch_size: int = 1024) -> Tensor:
    """The input of ``layer`` (default: the model's last ``nn.Linear``, the classifier head)
    for ``inputs``, flattened to ``[samples, dims]``, with the model in eval mode (its mode is
    restored afterwards)."""
    if layer is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("penultimate_features: the model has no nn.Linear; pass layer=")
        layer = linears[-1]
    captured = []
    handle = layer.register_forward_pre_hook(lambda _, args: captured.append(args[0].flatten(1)))
    training = model.training
    model.eval()
    try:
        for start in range(0, len(inputs), batch_size):
            model(inputs[start:start + batch_size])
    finally:
        handle.remove()
        model.train(training)
    return torch.cat(captured)
