"""One name per optimizer of the paper's comparisons, and the training step each one needs, so a
training script wires them all with one flag (see docs/variants.md for the flag mapping)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from msam_fused.adamw_msam import AdamWMSAM
from msam_fused.batchnorm import disable_running_stats
from msam_fused.msam import MSAM
from msam_fused.sam import SAM
from msam_fused.variants.esam import ESAM
from msam_fused.variants.looksam import LookSAM
from msam_fused.variants.mesa import MESA
from msam_fused.variants.multistep_sam import MultiStepSAM
from msam_fused.variants.param_groups import perturbation_param_groups

OPTIMIZERS = ("sgd", "adamw", "msam", "adamw-msam", "sam", "looksam", "esam", "mesa")
# optimizers that perturb the weights, and so read ``perturb``/``adaptive``
PERTURBING = ("msam", "adamw-msam", "sam", "looksam", "esam")
BASES = ("sgd", "adamw")


def build(name: str, model: nn.Module, *, lr: float, momentum: float = 0.9,
          weight_decay: float = 0.0, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
          rho: Optional[float] = None, base: str = "sgd", perturb: str = "all",
          adaptive: str = "off", ascent_steps: int = 1, ascent_norm: str = "l2",
          looksam_k: int = 5, looksam_alpha: float = 0.7, esam_beta: float = 0.6,
          esam_gamma: float = 0.5, seed: Optional[int] = None, mesa_decay: float = 0.9998,
          mesa_temperature: float = 5.0, mesa_weight: float = 0.8, mesa_start_step: int = 0,
          backend: str = "auto") -> Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) for ``model``'s parameters.

    ``rho`` defaults to the optimizer's own default (MSAM 0.3, AdamW-MSAM 1.0, SAM family 0.05).
    ``base`` is the base optimizer of sam/looksam/esam/mesa (SGD with ``momentum``, or AdamW
    with ``betas``/``eps``), all with ``weight_decay``. ``perturb``/``adaptive``: see
    :func:`perturbation_param_groups`. ``ascent_steps``/``ascent_norm`` ("l2" or "linf") make
    "sam" a :class:`MultiStepSAM`. The others are the variants' own hyper-parameters.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if name not in PERTURBING and (perturb, adaptive) != ("all", "off"):
        raise ValueError(f"{name} does not perturb the weights: perturb/adaptive apply to "
                         f"{', '.join(PERTURBING)}")
    if name != "sam" and (ascent_steps, ascent_norm) != (1, "l2"):
        raise ValueError("ascent_steps/ascent_norm apply to 'sam' only")
    if base not in BASES:
        raise ValueError(f"unknown base optimizer {base!r}; choose one of {', '.join(BASES)}")
    sgd_args = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    adamw_args = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    base_cls, base_args = (torch.optim.SGD, sgd_args) if base == "sgd" else (torch.optim.AdamW, adamw_args)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), **sgd_args)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **adamw_args)
    if name == "mesa":
        return MESA(model, base_cls, decay=mesa_decay, temperature=mesa_temperature,
                    weight=mesa_weight, start_step=mesa_start_step, **base_args)
    groups = perturbation_param_groups(model, perturb=perturb, adaptive=adaptive)
    radius = {} if rho is None else {"rho": rho}
    if name == "msam":
        return MSAM(groups, **sgd_args, **radius, backend=backend)
    if name == "adamw-msam":
        return AdamWMSAM(groups, **adamw_args, **radius, backend=backend)
    common = dict(**radius, backend=backend, **base_args)
    if name == "looksam":
        return LookSAM(groups, base_cls, k=looksam_k, alpha=looksam_alpha, **common)
    if name == "esam":
        return ESAM(groups, base_cls, beta=esam_beta, gamma=esam_gamma, seed=seed, **common)
    if (ascent_steps, ascent_norm) == (1, "l2"):
        return SAM(groups, base_cls, **common)
    return MultiStepSAM(groups, base_cls, steps=ascent_steps, norm=ascent_norm, **common)


def train_step(model: nn.Module, optimizer: Optimizer, inputs: Tensor, targets: Tensor,
               loss_fn: Callable = F.cross_entropy) -> Tensor:
    """One training step of ``model`` on a batch with any optimizer :func:`build` makes (or any
    plain ``torch.optim`` optimizer); returns the loss of the first forward pass (detached).

    SAM-family optimizers get their extra passes with BatchNorm statistics frozen; ESAM needs
    ``loss_fn(outputs, targets, reduction="none")``; MESA adds its trajectory loss.
    """
    if isinstance(optimizer, ESAM):
        def losses(index: Optional[Tensor]) -> Tensor:
            x, y = (inputs, targets) if index is None else (inputs[index], targets[index])
            return loss_fn(model(x), y, reduction="none")

        loss = optimizer.step(losses, model=model)
        optimizer.zero_grad()
        return loss
    outputs = model(inputs)
    loss = loss_fn(outputs, targets)
    objective = loss + optimizer.trajectory_loss(inputs, outputs) if isinstance(optimizer, MESA) else loss
    objective.backward()
    if isinstance(optimizer, SAM):
        def closure() -> Tensor:
            with disable_running_stats(model):
                perturbed_loss = loss_fn(model(inputs), targets)
                perturbed_loss.backward()
            return perturbed_loss

        optimizer.step(closure)
    else:
        optimizer.step()
    optimizer.zero_grad()
    return loss.detach()
