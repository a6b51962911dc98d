"""The optimizers the benchmarks compare, built by name, and one training step for each kind.

Names: ``sgd``, ``nag`` (SGD with Nesterov momentum), ``adamw``, ``sam`` / ``sam-nag`` /
``sam-adamw`` (msam_fused.SAM around that base), ``msam``, ``msam-overlap`` (MSAM with its first
pass run during backward, ``MSAM.overlap_backward``: see :func:`overlap_backward`),
``adamw-msam``, and the paper's
baselines ``looksam``, ``esam``, ``mesa`` (from ``msam_fused.variants``). The msam_fused
optimizers take ``backend``; torch's own (and SAM's base) take ``torch_impl``: ``default``
(torch decides), ``for-loop``, ``foreach`` or ``fused``. ``variant`` options (adaptive or
normalization-only perturbation, multi-step or sign ascent, the baselines' own settings) are
the keywords of :func:`msam_fused.variants.build` and make it build the optimizer.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

import msam_fused
from msam_fused import variants
from msam_fused.distributed import ASCENTS, DEFAULT_ASCENT, sam_step

VARIANT_BASELINES = ("looksam", "esam", "mesa")
OPTIMIZERS = ("sgd", "nag", "adamw", "sam", "sam-nag", "sam-adamw", "msam", "msam-overlap",
              "adamw-msam") + VARIANT_BASELINES
#: optimizers whose step is ``variants.train_step`` (no GradScaler, clipping or DDP there)
VARIANT_STEP_TYPES = (variants.LookSAM, variants.ESAM, variants.MESA, variants.MultiStepSAM)
TORCH_IMPLS = ("default", "for-loop", "foreach", "fused")
_IMPL_KWARGS = {"default": {}, "for-loop": {"foreach": False}, "foreach": {"foreach": True},
                "fused": {"fused": True}}


@dataclass
class Hyper:
    """Hyper-parameters shared by all optimizers of a comparison (each uses what applies)."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    sam_rho: float = 0.05
    msam_rho: float = 0.3


def base_of(name: str) -> str:
    """The plain optimizer a name is compared against (Table 1's denominator)."""
    return "adamw" if name in ("adamw", "sam-adamw", "adamw-msam") else "sgd"


def uses_msam_fused(name: str) -> bool:
    return name.startswith("sam") or "msam" in name or name in VARIANT_BASELINES


def build_optimizer(name: str, model: nn.Module, hp: Hyper, *, backend: str = "auto",
                    torch_impl: str = "default", variant: Optional[dict] = None,
                    seed: Optional[int] = None) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if torch_impl not in _IMPL_KWARGS:
        raise ValueError(f"unknown torch implementation {torch_impl!r}; choose one of "
                         f"{', '.join(TORCH_IMPLS)}")
    if variant or name in VARIANT_BASELINES:
        return _build_variant(name, model, hp, backend, dict(variant or {}), seed)
    params = model.parameters()
    impl = _IMPL_KWARGS[torch_impl]
    if name in ("msam", "msam-overlap"):
        return msam_fused.MSAM(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                               rho=hp.msam_rho, backend=backend)
    if name == "adamw-msam":
        return msam_fused.AdamWMSAM(params, lr=hp.lr, betas=hp.betas, eps=hp.eps,
                                    weight_decay=hp.weight_decay, rho=hp.msam_rho, backend=backend)
    base = name[len("sam-"):] if name.startswith("sam-") else ("sgd" if name == "sam" else name)
    if base == "adamw":
        cls, kwargs = torch.optim.AdamW, dict(lr=hp.lr, betas=hp.betas, eps=hp.eps,
                                               weight_decay=hp.weight_decay, **impl)
    else:
        cls, kwargs = torch.optim.SGD, dict(lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                                             nesterov=base == "nag", **impl)
    if name.startswith("sam"):
        return msam_fused.SAM(params, cls, rho=hp.sam_rho, backend=backend, **kwargs)
    return cls(params, **kwargs)


def _build_variant(name, model, hp: Hyper, backend, options: dict, seed):
    """Through ``msam_fused.variants.build``; ``sam-adamw`` is its ``sam`` on the AdamW base."""
    if name in ("nag", "sam-nag"):
        raise ValueError(f"{name}: the variant options (perturb, adaptive, ascent, base, ...) "
                         "apply to sam, sam-adamw, msam, adamw-msam, looksam, esam and mesa")
    if name == "sam-adamw":
        name, options["base"] = "sam", "adamw"
    if name in variants.PERTURBING:
        options["rho"] = hp.msam_rho if name.endswith("msam") else hp.sam_rho
    return variants.build(name, model, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                          betas=hp.betas, eps=hp.eps, seed=seed, backend=backend, **options)


def overlap_backward(name: str, opt, model: nn.Module, cfg: "StepConfig") -> None:
    """For ``msam-overlap``: run MSAM's first pass during backward, on ``model`` as trained
    (the DDP module under torchrun), with the step's GradScaler. Nothing for other names.
    Gradient clipping is impossible then (the gradients are consumed during backward)."""
    if name != "msam-overlap":
        return
    if cfg.clip_grad:
        raise ValueError("msam-overlap consumes the gradients during backward, so they cannot be "
                         "clipped; drop --clip-grad or use msam")
    opt.overlap_backward(model, scaler=cfg.scaler)


def optimizer_backend(opt) -> str:
    """What runs the step: the msam_fused backend, or torch's implementation."""
    if isinstance(opt, variants.MESA):
        return optimizer_backend(opt.base_optimizer)
    if isinstance(opt, (msam_fused.SAM, msam_fused.MSAM, msam_fused.AdamWMSAM)):
        return str(opt.backend)
    group = opt.param_groups[0]
    return "fused" if group.get("fused") else ("foreach" if group.get("foreach") else "for-loop")


@dataclass
class StepConfig:
    """How a training step runs, apart from model and optimizer."""

    loss_fn: Callable = nn.functional.cross_entropy
    autocast: Callable = nullcontext      # () -> context manager for the forward passes
    scaler: Optional[torch.amp.GradScaler] = None
    clip_grad: float = 0.0                 # max gradient norm; 0 = no clipping
    channels_last: bool = False
    #: SAM under DDP: "local" (each rank ascends along its own gradient; the first forward and
    #: backward run under no_sync) or "global" (along the all-reduced one).
    sam_ascent: str = DEFAULT_ASCENT


def train_step(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, cfg: StepConfig,
               distributed_model: Optional[nn.Module] = None):
    """One optimizer step on (x, y); returns the detached loss and logits of the first pass.

    SAM takes its two passes through :func:`msam_fused.distributed.sam_step` (the second with
    BatchNorm statistics frozen; under DDP the ascent local or global, see ``cfg.sam_ascent``);
    ``distributed_model`` is the DDP module when ``model`` is a compiled wrapper of it. Every
    other optimizer takes one pass. Gradients are clipped on the gradient the step uses.
    """
    if cfg.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    if isinstance(opt, VARIANT_STEP_TYPES):
        return _variant_step(model, opt, x, y, cfg)
    if isinstance(opt, msam_fused.SAM):
        first_logits = []

        def compute_loss():
            with cfg.autocast():
                logits = model(x)
                loss = cfg.loss_fn(logits, y)
            first_logits.append(logits.detach())
            return loss

        loss = sam_step(distributed_model or model, opt, compute_loss, ascent=cfg.sam_ascent,
                        scaler=cfg.scaler, max_grad_norm=cfg.clip_grad or None)
        return loss, first_logits[0]
    loss, logits = forward_backward(model, x, y, cfg)
    optimizer_step(model, opt, cfg)
    return loss.detach(), logits.detach()


def optimizer_step(model: nn.Module, opt, cfg: StepConfig) -> None:
    """What follows the backward of a one-pass optimizer: clipping, the (scaled) step, zero_grad."""
    if cfg.clip_grad:
        if cfg.scaler is not None:
            cfg.scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    if cfg.scaler is not None:
        cfg.scaler.step(opt)
        cfg.scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


def _variant_step(model, opt, x, y, cfg: StepConfig):
    """LookSAM, ESAM, MESA and multi-step SAM take their own passes (``variants.train_step``);
    the logits of the first full-batch forward are caught in the loss function."""
    full_batch_logits = []

    def loss_fn(logits, targets, **kwargs):
        if not full_batch_logits and len(logits) == len(y):
            full_batch_logits.append(logits.detach())
        return cfg.loss_fn(logits, targets, **kwargs)

    with cfg.autocast():
        loss = variants.train_step(model, opt, x, y, loss_fn=loss_fn)
    return loss, full_batch_logits[0]


def forward_backward(model, x, y, cfg: StepConfig):
    with cfg.autocast():
        logits = model(x)
        loss = cfg.loss_fn(logits, y)
    (cfg.scaler.scale(loss) if cfg.scaler is not None else loss).backward()
    return loss, logits
