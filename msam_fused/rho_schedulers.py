"""rho schedules, in the style of ``torch.optim.lr_scheduler``: objects that set
``param_groups[i]["rho"]`` step by step, for MSAM, AdamWMSAM, SAM and its variants.

Each scheduler scales every group's initial rho (remembered as ``group["initial_rho"]``, like
torch's ``initial_lr``) by a factor of the step count ``t``. Construction applies ``t = 0``;
call :meth:`RhoScheduler.step` once after each ``optimizer.step()`` (or once per epoch: ``t``
counts whatever the calls count)::

    opt = msam_fused.AdamWMSAM(model.parameters(), lr=1e-3, weight_decay=0.1, rho=1.0)
    rho_sched = msam_fused.rho_schedulers.ZeroDuringWarmup(opt, warmup_steps=8 * steps_per_epoch)
    for x, y in loader:
        ...; opt.step(); lr_sched.step(); rho_sched.step()

During ``optimizer.step()`` number ``t`` (from 0) the groups hold ``initial_rho * factor(t)``.
For MSAM that is the radius of the perturbation applied at the end of step ``t``.

A group whose ``rho`` is a 0-d tensor keeps that tensor: it is filled in place (as torch's
LR schedulers fill a tensor ``lr``), so a step that reads it on the device, or a captured
CUDA graph of it, follows the schedule.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from msam_fused.validation import check_number


class RhoScheduler:
    """Base class: subclasses define :meth:`factor`."""

    def __init__(self, optimizer: Optimizer, last_step: int = -1):
        where = type(self).__name__
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{where}: expected an optimizer, got {type(optimizer).__name__}")
        for i, group in enumerate(optimizer.param_groups):
            if "rho" not in group:
                raise ValueError(f"{where}: param group {i} has no 'rho'; rho schedules drive "
                                 "MSAM, AdamWMSAM, SAM and the msam_fused variants")
            if last_step == -1:
                rho = group["rho"]
                group.setdefault("initial_rho", float(rho) if isinstance(rho, Tensor) else rho)
            elif "initial_rho" not in group:
                raise ValueError(f"{where}: last_step={last_step} resumes a schedule, but param "
                                 f"group {i} has no 'initial_rho'")
        self.optimizer = optimizer
        self.base_rhos = [group["initial_rho"] for group in optimizer.param_groups]
        self.last_step = last_step
        self.step()

    def factor(self, step: int) -> float:
        """The multiplier of the initial rho at step ``step`` (>= 0)."""
        raise NotImplementedError

    def step(self) -> None:
        """Advance one step and set every group's rho."""
        self.last_step += 1
        f = self.factor(self.last_step)
        for group, base in zip(self.optimizer.param_groups, self.base_rhos):
            if isinstance(group["rho"], Tensor):
                group["rho"].fill_(base * f)
            else:
                group["rho"] = base * f

    def get_last_rho(self) -> list[float]:
        """The rho of each group as last set."""
        return [group["rho"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)


def _check_steps(where: str, name: str, value: Any, *, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}: {name} must be an integer >= {low}, got {value!r}")


class ConstantRho(RhoScheduler):
    """rho stays at its initial value (the default recipe)."""

    def factor(self, step: int) -> float:
        return 1.0


class StepRho(RhoScheduler):
    """A jump: ``before`` times the initial rho for steps ``< milestone``, ``after`` times it
    from ``milestone`` on."""

    def __init__(self, optimizer: Optimizer, milestone: int, before: float = 0.0,
                 after: float = 1.0, last_step: int = -1):
        _check_steps(type(self).__name__, "milestone", milestone, low=0)
        check_number(type(self).__name__, "before", before)
        check_number(type(self).__name__, "after", after)
        self.milestone, self.before, self.after = milestone, before, after
        super().__init__(optimizer, last_step)

    def factor(self, step: int) -> float:
        return self.before if step < self.milestone else self.after


class ZeroDuringWarmup(StepRho):
    """rho = 0 during the first ``warmup_steps`` steps (the LR warm-up), then the initial rho:
    the paper's ViT recipe (8 warm-up epochs with rho = 0)."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, last_step: int = -1):
        super().__init__(optimizer, milestone=warmup_steps, before=0.0, after=1.0,
                         last_step=last_step)


class _Interpolation(RhoScheduler):
    """From ``start_factor`` at step 0 to ``end_factor`` at step ``steps`` along
    ``shape(progress)`` (0 to 1), then constant."""

    def __init__(self, optimizer: Optimizer, steps: int, start_factor: float, end_factor: float,
                 last_step: int, steps_name: str):
        where = type(self).__name__
        _check_steps(where, steps_name, steps)
        check_number(where, "start_factor", start_factor)
        check_number(where, "end_factor", end_factor)
        self.steps, self.start_factor, self.end_factor = steps, start_factor, end_factor
        super().__init__(optimizer, last_step)

    @staticmethod
    def shape(progress: float) -> float:
        raise NotImplementedError

    def factor(self, step: int) -> float:
        progress = min(step, self.steps) / self.steps
        return self.start_factor + (self.end_factor - self.start_factor) * self.shape(progress)


class LinearRampRho(_Interpolation):
    """rho goes linearly from ``start_factor`` times its initial value at step 0 to
    ``end_factor`` times it at step ``ramp_steps``, and stays there."""

    def __init__(self, optimizer: Optimizer, ramp_steps: int, start_factor: float = 0.0,
                 end_factor: float = 1.0, last_step: int = -1):
        super().__init__(optimizer, ramp_steps, start_factor, end_factor, last_step, "ramp_steps")

    @staticmethod
    def shape(progress: float) -> float:
        return progress


class CosineRho(_Interpolation):
    """rho follows half a cosine from ``start_factor`` times its initial value at step 0 to
    ``end_factor`` times it at step ``total_steps`` (as ``CosineAnnealingLR``), then stays.
    ``start_factor=0, end_factor=1`` makes it rise instead."""

    def __init__(self, optimizer: Optimizer, total_steps: int, start_factor: float = 1.0,
                 end_factor: float = 0.0, last_step: int = -1):
        super().__init__(optimizer, total_steps, start_factor, end_factor, last_step, "total_steps")

    @staticmethod
    def shape(progress: float) -> float:
        return (1 - math.cos(math.pi * progress)) / 2


SCHEDULES = {"constant": ConstantRho, "step": StepRho, "warmup_zero": ZeroDuringWarmup,
             "linear": LinearRampRho, "cosine": CosineRho}
