"""Finding our optimizers behind trainers' wrappers and moving parameters to the true weights."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterable, Iterator, Optional

import torch
from torch.optim import Optimizer

from msam_fused.momentum_ascent import MomentumAscentOptimizer


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside trainers' wrappers (``AcceleratedOptimizer``, ``LightningOptimizer``,
    anything else that keeps it in ``.optimizer``); ``optimizer`` itself when it wraps nothing."""
    inner = getattr(optimizer, "optimizer", None)
    while isinstance(inner, Optimizer) and inner is not optimizer:
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    return optimizer


def perturbing_optimizers(optimizers: Iterable[Any]) -> list[MomentumAscentOptimizer]:
    """The MSAM-family optimizers among ``optimizers`` (unwrapped): those whose parameters hold
    perturbed weights between steps. SAM is not among them: between its steps (after
    ``second_step()``) the parameters hold the true weights."""
    found = []
    for optimizer in optimizers:
        inner = unwrap_optimizer(optimizer)
        if isinstance(inner, MomentumAscentOptimizer) and all(inner is not f for f in found):
            found.append(inner)
    return found


@contextmanager
def true_weights(*optimizers: Any) -> Iterator[None]:
    """Inside, the parameters of every MSAM/AdamW-MSAM optimizer given (wrapped or not) hold the
    true weights; on exit the perturbed ones come back bit for bit. Other optimizers (SAM, any
    ``torch.optim`` one) are accepted and left alone, so callers need not know which they have.

    For EMA/SWA: ``with true_weights(opt): ema.update(model)`` (timm's ``ModelEmaV3``), or
    ``swa_model.update_parameters(model)`` (``torch.optim.swa_utils.AveragedModel``).
    """
    with ExitStack() as stack:
        for optimizer in perturbing_optimizers(optimizers):
            stack.enter_context(optimizer.unperturbed())
        yield


class TrueWeightsSwitch:
    """The state a trainer callback keeps: since an optimizer step of this run the parameters
    hold perturbed weights; the callback shows the true ones for a while (evaluation, saving)
    or keeps them for good (training is over)."""

    def __init__(self) -> None:
        self.optimizers: list[MomentumAscentOptimizer] = []  # empty: the parameters hold w
        self._shown: Optional[ExitStack] = None

    @property
    def perturbed(self) -> bool:
        return bool(self.optimizers) and self._shown is None

    def stepped(self, optimizers: Iterable[Any]) -> None:
        """An optimizer step ran (or is running): from now on the parameters are perturbed."""
        self.optimizers = perturbing_optimizers(optimizers)

    def show_true(self) -> None:
        if self.optimizers and self._shown is None:
            stack = ExitStack()
            for optimizer in self.optimizers:
                stack.enter_context(optimizer.unperturbed())
            self._shown = stack

    def show_perturbed(self) -> None:
        if self._shown is not None:
            stack, self._shown = self._shown, None
            stack.close()

    @contextmanager
    def true(self) -> Iterator[None]:
        """The true weights inside; on exit, what was there before."""
        was_shown = self._shown is not None
        self.show_true()
        try:
            yield
        finally:
            if not was_shown:
                self.show_perturbed()

    @torch.no_grad()
    def keep_true(self) -> None:
        """Training is over: the true weights stay in the parameters. An optimizer stepped again
        re-applies its perturbation first (docs/integrations.md)."""
        if not self.optimizers:
            return
        for optimizer in self.optimizers:
            perturb_again_before_next_step(optimizer)
        self.show_true()
        params = [p for optimizer in self.optimizers for g in optimizer.param_groups for p in g["params"]]
        weights = [p.detach().clone() for p in params]
        self.show_perturbed()
        for p, w in zip(params, weights):
            p.copy_(w)
        self.optimizers = []

    def forget(self) -> None:
        """The parameters were replaced by true weights from elsewhere (a checkpoint loaded)."""
        self.show_perturbed()
        self.optimizers = []


def perturb_again_before_next_step(optimizer: MomentumAscentOptimizer) -> None:
    """Before ``optimizer``'s next step (if any), put its perturbation back on parameters that
    will hold the true weights: by loading the state dict taken now, whose fingerprints tell the
    optimizer which weights are which (docs/integrations.md). Loading another state dict first
    cancels this."""
    saved = optimizer.state_dict()
    hooks = []

    def cancel(*_) -> None:
        while hooks:
            hooks.pop().remove()

    def perturb_again(opt, args, kwargs) -> None:
        cancel()
        opt.load_state_dict(saved)

    hooks.append(optimizer.register_step_pre_hook(perturb_again))
    hooks.append(optimizer.register_load_state_dict_pre_hook(cancel))
