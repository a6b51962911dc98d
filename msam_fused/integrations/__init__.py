"""Trainer integrations: the true weights where a trainer evaluates, saves and averages.

MSAM and AdamW-MSAM keep the *perturbed* weights ``w - c*x`` in the parameters between steps
(docs/design.md). A trainer that evaluates, checkpoints or averages the parameters as they are
would see the perturbed model. The modules here put the true weights where they belong:

* :mod:`msam_fused.integrations.lightning`: ``TrueWeightsCallback`` for Lightning's ``Trainer``;
* :mod:`msam_fused.integrations.huggingface`: ``TrueWeightsCallback`` for the HF ``Trainer``;
* :mod:`msam_fused.integrations.timm`: ``msam``, ``adamwmsam`` and ``sam`` in timm's optimizer
  factory (registered on import);
* :func:`true_weights` (here): the context for anything else, e.g. EMA/SWA updates.

Each trainer module imports its library; this package imports none. See docs/integrations.md.
"""

from msam_fused.integrations.weights import true_weights, unwrap_optimizer

__all__ = ["true_weights", "unwrap_optimizer"]
