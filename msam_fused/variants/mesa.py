"""MESA, the memory-efficient variant of "Sharpness-Aware Training for Free" (Du, Zhou, Feng,
Tan, Zhou, NeurIPS 2022): a trajectory loss, the KL divergence from an exponential moving
average (EMA) of the model to the model, in place of SAM's second pass."""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from msam_fused.sam import with_copied_state
from msam_fused.validation import check_number
from msam_fused.variants.extra_state import split_state_dict


class MESA(Optimizer):
    r"""MESA around any base optimizer (the paper uses SGD): the base optimizer's step, plus an
    EMA copy of the model, ``v = decay * v + (1 - decay) * w`` after every step (parameters and
    floating-point buffers such as BatchNorm statistics; other buffers are copied), and the
    trajectory loss to add to the training loss::

        out = model(x)
        loss = F.cross_entropy(out, y) + mesa.trajectory_loss(x, out)
        loss.backward(); mesa.step(); mesa.zero_grad()

    ``trajectory_loss = weight * T**2 * mean_i KL(softmax(f_v(x_i) / T) || softmax(f_w(x_i) / T))``
    with the EMA model ``f_v`` evaluated in eval mode without gradient, as in the authors' code
    (``T**2`` is their distillation scaling). It is zero, and the EMA forward is skipped, before
    ``start_step`` optimizer steps have been taken (the paper's ``E_start``, in steps: the EMA
    of the first steps is a poor teacher). The EMA still follows the model from the start.

    Defaults are the authors' ImageNet settings: ``decay = 0.9998``, ``temperature = 5``,
    ``weight`` (their ``lambda``) ``= 0.8``. :meth:`state_dict` holds the base optimizer's state,
    the EMA model and the step count. The wrapper shares ``param_groups`` and ``state`` with the
    base optimizer, so LR schedulers and ``GradScaler.step`` work on it.
    """

    def __init__(self, model: nn.Module, base_optimizer: type, *, decay: float = 0.9998,
                 temperature: float = 5.0, weight: float = 0.8, start_step: int = 0,
                 **base_kwargs: Any):
        check_number("MESA", "decay", decay, high=1.0)
        check_number("MESA", "weight", weight)
        check_number("MESA", "temperature", temperature)
        if temperature == 0:
            raise ValueError("MESA: invalid temperature=0: must be > 0")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"MESA: start_step must be an integer >= 0, got {start_step!r}")
        self.base_optimizer = base_optimizer(model.parameters(), **base_kwargs)
        self.model = model
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.temperature, self.weight = decay, temperature, weight
        self.start_step = start_step
        self.steps_taken = 0
        super().__init__(self.base_optimizer.param_groups, self.base_optimizer.defaults)
        self._share_base()

    def _share_base(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def trajectory_loss(self, inputs: Any, outputs: Tensor) -> Tensor:
        """The trajectory loss of the model's ``outputs`` (logits) on ``inputs``."""
        if self.steps_taken < self.start_step:
            return outputs.new_zeros(())
        t = self.temperature
        with torch.no_grad():
            teacher = F.softmax(self.ema_model(inputs).to(outputs.dtype) / t, dim=-1)
        kl = F.kl_div(F.log_softmax(outputs / t, dim=-1), teacher, reduction="none").sum(-1).mean()
        return self.weight * t * t * kl

    @torch.no_grad()
    def step(self, closure=None) -> Optional[Tensor]:
        """The base optimizer's step, then the EMA update."""
        loss = self.base_optimizer.step(closure)
        ema, live = self.ema_model.state_dict(), self.model.state_dict()
        floats = [k for k, v in ema.items() if v.is_floating_point()]
        torch._foreach_mul_([ema[k] for k in floats], self.decay)
        torch._foreach_add_([ema[k] for k in floats], [live[k].to(ema[k].dtype) for k in floats],
                            alpha=1 - self.decay)
        for k, v in ema.items():
            if not v.is_floating_point():
                v.copy_(live[k])
        self.steps_taken += 1
        return loss

    def state_dict(self) -> dict:
        return {**self.base_optimizer.state_dict(),
                "mesa": {"ema": {k: v.clone() for k, v in self.ema_model.state_dict().items()},
                         "steps_taken": self.steps_taken}}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict, tag = split_state_dict(state_dict, "mesa", "MESA")
        self.ema_model.load_state_dict(tag["ema"])  # checks the keys and shapes first
        self.base_optimizer.load_state_dict(with_copied_state(state_dict))
        self._share_base()
        self.steps_taken = int(tag["steps_taken"])
