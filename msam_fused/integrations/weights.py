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
    and keeps them when training is over."""

    def __init__(self) -> None:
        self.optimizers: list[MomentumAscentOptimizer] = []  # empty: the parameters hold w
        self._shown: Optional[ExitStack] = None
        self._finished: dict[int, PendingPerturbation] = {}

    def stepped(self, optimizers: Iterable[Any]) -> None:
        """An optimizer step ran (or is running): from now on the parameters are perturbed."""
        self.optimizers = perturbing_optimizers(optimizers)

    def show_true(self) -> None:
        if self.optimizers and self._shown is None:
            stack = ExitStack()
            stack.enter_context(true_weights(*self.optimizers))
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
    def finish(self, *, replaced: bool = False) -> None:
        """Training is over: the parameters keep the true weights (those shown now, if they
        are). ``replaced``: the trainer has put other true weights in them (its best checkpoint),
        which stay as they are. Otherwise an optimizer stepped again puts its perturbation back
        first, and :meth:`final_state_dict` is the state that describes the weights now held."""
        if not self.optimizers:
            return
        if not replaced:
            self._finished.update((id(o), PendingPerturbation(o)) for o in self.optimizers)
            self.show_true()
        if self._shown is not None:
            params = [p for optimizer in self.optimizers for g in optimizer.param_groups for p in g["params"]]
            kept = [p.detach().clone() for p in params]
            self.show_perturbed()
            for p, w in zip(params, kept):
                p.copy_(w)
        self.optimizers = []

    def final_state_dict(self, optimizer: Any) -> Optional[dict]:
        """The state dict ``optimizer`` had when :meth:`finish` kept the true weights, while it
        has neither stepped nor loaded another since; else None. Saved with the true weights,
        it resumes the run (its fingerprints say which weights it belongs to)."""
        pending = self._finished.get(id(unwrap_optimizer(optimizer)))
        return pending.state_dict if pending is not None and pending.active else None


class PendingPerturbation:
    """Before ``optimizer``'s next step (if any), put its perturbation back on parameters that
    hold the true weights, by loading the state dict taken now, whose fingerprints tell the
    optimizer which weights are which (docs/integrations.md). Loading another state dict first
    cancels this."""

    def __init__(self, optimizer: MomentumAscentOptimizer) -> None:
        self.state_dict = optimizer.state_dict()
        self._hooks = [optimizer.register_step_pre_hook(self._perturb_again),
                       optimizer.register_load_state_dict_pre_hook(self._cancel)]

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def _cancel(self, *_) -> None:
        while self._hooks:
            self._hooks.pop().remove()

    def _perturb_again(self, optimizer, args, kwargs) -> None:
        self._cancel()
        optimizer.load_state_dict(self.state_dict)
