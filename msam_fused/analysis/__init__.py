"""The MSAM paper's analysis tools (§5-6): cosine similarity between the momentum and the next
gradient, the loss along the momentum vs the gradient and a random direction, and the feature
rank of the penultimate layer. ``bench/analyze.py`` runs them on a short digits training."""

from msam_fused.analysis.cosine import MomentumGradientCosine
from msam_fused.analysis.feature_rank import explained_variance_ratio, feature_rank, penultimate_features
from msam_fused.analysis.sharpness import (gradient_direction, loss_along, momentum_direction,
                                           random_direction, unit)

__all__ = ["MomentumGradientCosine", "explained_variance_ratio", "feature_rank", "gradient_direction",
           "loss_along", "momentum_direction", "penultimate_features", "random_direction", "unit"]
