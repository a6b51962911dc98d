"""The optimizers the benchmarks compare, built by name, and one training step for each kind.

Names: ``sgd``, ``nag`` (SGD with Nesterov momentum), ``adamw``, ``sam`` / ``sam-nag`` /
``sam-adamw`` (msam_fused.SAM around that base), ``msam``, ``adamw-msam``. The msam_fused
optimizers take ``backend``; torch's own (and SAM's base) take ``torch_impl``: ``default``
(torch decides), ``for-loop``, ``foreach`` or ``fused``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

import msam_fused

OPTIMIZERS = ("sgd", "nag", "adamw", "sam", "sam-nag", "sam-adamw", "msam", "adamw-msam")
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
    return name.startswith("sam") or name.endswith("msam")


def build_optimizer(name: str, params, hp: Hyper, *, backend: str = "auto",
                    torch_impl: str = "default") -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if torch_impl not in _IMPL_KWARGS:
        raise ValueError(f"unknown torch implementation {torch_impl!r}; choose one of "
                         f"{', '.join(TORCH_IMPLS)}")
    impl = _IMPL_KWARGS[torch_impl]
    if name == "msam":
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


def optimizer_backend(opt) -> str:
    """What runs the step: the msam_fused backend, or torch's implementation."""
    if isinstance(opt, (msam_fused.SAM, msam_fused.MSAM, msam_fused.AdamWMSAM)):
        return str(opt.backend)
    group = opt.param_groups[0]
    return "fused" if group.get("fused") else ("foreach" if group.get("foreach") else "for-loop")


def no_sync_of(model: nn.Module):
    """SAM's ascent pass under DDP: skip the gradient all-reduce (a per-rank ascent).

    Both the forward and the backward must run inside ``no_sync()``: DDP decides in the
    forward whether the backward will all-reduce, so wrapping only the backward still
    synchronises. Outside DDP this is a no-op.
    """
    return model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) else nullcontext()


def synced_ascent(model: nn.Module):
    """SAM's ascent pass with DDP's usual all-reduce: every rank ascends along the global g1."""
    return nullcontext()


#: ``--sam-ascent``: SAM's first pass per rank ("local", the default: no extra all-reduce, as
#: in SAM's m-sharpness) or on the all-reduced gradient ("global").
SAM_ASCENTS = {"local": no_sync_of, "global": synced_ascent}


@dataclass
class StepConfig:
    """How a training step runs, apart from model and optimizer."""

    loss_fn: Callable = nn.functional.cross_entropy
    autocast: Callable = nullcontext      # () -> context manager for the forward passes
    scaler: Optional[torch.amp.GradScaler] = None
    clip_grad: float = 0.0                 # max gradient norm; 0 = no clipping
    channels_last: bool = False
    #: (model) -> context for SAM's first forward and backward; the seam where a distributed
    #: helper (global or local ascent) plugs in.
    ascent_context: Callable = field(default=no_sync_of)


def train_step(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, cfg: StepConfig):
    """One optimizer step on (x, y); returns the detached loss and logits of the first pass.

    SAM takes two forward/backward passes (the second inside ``disable_running_stats`` so
    BatchNorm statistics come from the first only); every other optimizer takes one.
    Gradients are clipped on the gradient the step uses (SAM's second one).
    """
    if cfg.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    if isinstance(opt, msam_fused.SAM):
        with cfg.ascent_context(model):
            loss, logits = _forward_backward(model, x, y, cfg)
        opt.first_step(zero_grad=True)
        with msam_fused.disable_running_stats(model):
            _forward_backward(model, x, y, cfg)
    else:
        loss, logits = _forward_backward(model, x, y, cfg)
    if cfg.clip_grad:
        if cfg.scaler is not None:
            cfg.scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    if cfg.scaler is not None:
        cfg.scaler.step(opt)
        cfg.scaler.update()
    else:
        opt.step()  # SAM: finishes the step begun by first_step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), logits.detach()


def _forward_backward(model, x, y, cfg: StepConfig):
    with cfg.autocast():
        logits = model(x)
        loss = cfg.loss_fn(logits, y)
    (cfg.scaler.scale(loss) if cfg.scaler is not None else loss).backward()
    return loss, logits
