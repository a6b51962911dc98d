"""Param groups that say which parameters are perturbed, and which adaptively (docs/variants.md).

MSAM, AdamW-MSAM and SAM read two group options: ``perturb`` (default True; False keeps the
group at its true weights and out of the global norm) and ``adaptive`` (ASAM-style scaling of
the perturbation by ``|w|``). Which tensors are "normalization parameters" or "biases" needs
the model, so this helper builds the groups from it.
"""

from __future__ import annotations

from torch import nn

# Affine parameters of these layers are "normalization parameters". _NormBase covers every
# BatchNorm (1d/2d/3d, Sync, Lazy) and InstanceNorm; subclasses of any of these count too.
NORM_LAYERS: tuple = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

PERTURB_CHOICES = ("all", "norm")
ADAPTIVE_CHOICES = ("off", "all", "weights")


def perturbation_param_groups(model: nn.Module, *, perturb: str = "all", adaptive: str = "off",
                              norm_layers: tuple = NORM_LAYERS, **options) -> list[dict]:
    """Param groups of ``model`` (every parameter exactly once, empty groups left out).

    perturb:
        ``"all"``: every parameter is perturbed. ``"norm"``: only the affine parameters, weight
        *and* bias, of normalization layers (``norm_layers``: BatchNorm, InstanceNorm,
        GroupNorm, LayerNorm, RMSNorm) are perturbed, as in SAM-ON (Mueller et al. 2023); all
        others get ``perturb=False`` and stay out of the norm.
    adaptive:
        ``"off"``: plain perturbation. ``"all"``: every perturbed tensor is scaled by ``|w|``,
        biases and normalization parameters included (what ``SAM(adaptive=True)`` does with
        one group, as in the widely used davda54/sam code). ``"weights"``: as the ASAM
        authors' code, only tensors whose name ends in a part containing ``"weight"`` are
        scaled (conv/linear weights and normalization scales); biases, normalization shifts
        and other tensors (e.g. ``cls_token``) are perturbed without scaling.
    options:
        further keys for every group (``lr``, ``weight_decay``, ``rho``, ...).
    """
    if perturb not in PERTURB_CHOICES:
        raise ValueError(f"perturbation_param_groups: perturb must be one of {PERTURB_CHOICES}, "
                         f"got {perturb!r}")
    if adaptive not in ADAPTIVE_CHOICES:
        raise ValueError(f"perturbation_param_groups: adaptive must be one of {ADAPTIVE_CHOICES}, "
                         f"got {adaptive!r}")
    norm_params = {id(p) for m in model.modules() if isinstance(m, norm_layers)
                   for p in m.parameters(recurse=False)}
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        perturbed = perturb == "all" or id(p) in norm_params
        scaled = perturbed and (adaptive == "all"
                                or (adaptive == "weights" and "weight" in name.rsplit(".", 1)[-1]))
        groups.setdefault((perturbed, scaled), []).append(p)
    return [{"params": params, "perturb": perturbed, "adaptive": scaled, **options}
            for (perturbed, scaled), params in groups.items()]
