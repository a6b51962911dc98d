"""SAM with a multi-step and/or sign (L-infinity, FGSM-style) ascent, as in the SAM replication
study that tried a multi-step sign-gradient ascent in place of SAM's single normalized step."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from msam_fused.sam import SAM, _either

ASCENT_NORMS = ("l2", "linf")


class MultiStepSAM(SAM):
    r"""SAM whose ascent takes ``steps`` steps of length ``rho / steps`` each.

    Starting at ``e_0 = 0``, ascent step ``i`` (``i = 1..k``) takes the gradient ``g_i`` at
    ``w + e_{i-1}`` and moves

    * ``norm="l2"``:   ``e_i = e_{i-1} + (rho / k) * g_i / ||g_i||`` (re-normalized every step;
      global norm; ``adaptive`` scales as in :class:`~msam_fused.SAM`, with ``|w|`` taken at
      the current point),
    * ``norm="linf"``: ``e_i = e_{i-1} + (rho / k) * sign(g_i)`` (FGSM / PGD on the
      L-infinity ball of radius ``rho``; with ``k = 1`` this is FGSM, ``e = rho * sign(g)``).

    Each step has length ``rho / k`` in its norm, so ``e_k`` lies in the ball of radius ``rho``
    without projection. The gradient at ``w + e_k`` then drives the base optimizer's step from
    ``w``, exactly as in SAM. A step costs ``k + 1`` forward/backward passes.

    Use ``step(closure)`` (the closure runs the forward/backward at the perturbed point, inside
    ``disable_running_stats(model)``; it is called ``k`` times), or call :meth:`first_step`
    ``k`` times, each after a backward, then :meth:`second_step`.
    """

    def __init__(self, params, base_optimizer: type, rho: float = 0.05, steps: int = 1,
                 norm: str = "l2", adaptive: bool = False, **kwargs: Any):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"MultiStepSAM: steps must be an integer >= 1, got {steps!r}")
        if norm not in ASCENT_NORMS:
            raise ValueError(f"MultiStepSAM: norm must be one of {ASCENT_NORMS}, got {norm!r}")
        if norm == "linf" and adaptive:
            raise ValueError("MultiStepSAM: adaptive=True is defined for the L2 ascent only; use "
                             "norm='l2' or adaptive=False")
        self.steps = steps
        self.norm = norm
        self._ascents_done = 0
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)

    def _ascent_radius(self, group: dict) -> float:
        return group["rho"] / self.steps

    def _ascent_directions(self, buckets, total, found_inf) -> list[tuple]:
        if self.norm == "l2":
            return super()._ascent_directions(buckets, total, found_inf)
        if any(group["adaptive"] for group, *_ in buckets):
            raise ValueError(f"{type(self).__name__}: a param group has adaptive=True, which the "
                             "L-infinity ascent does not define")
        return [(torch._foreach_sign(grads),
                 torch.full((), self._ascent_radius(group), dtype=total.dtype, device=total.device))
                for group, _, _, grads, _ in buckets]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Ascent step ``i`` of ``k``, along the gradients now in ``.grad`` (taken at
        ``w + e_{i-1}``). The first one remembers ``w``; later ones move the parameters in place."""
        where = f"{type(self).__name__}.first_step"
        if self._ascents_done == self.steps:
            raise RuntimeError(f"{where}() was called more than steps={self.steps} times; run the "
                               "last backward and call second_step()")
        if self._ascents_done == 0:
            self._pending = self._ascend(where, True)
        else:
            moved, first_inf = self._pending
            expected = {p for _, params, _ in moved for p in params}
            now, found_inf = self._ascend(where, False)
            if {p for _, params, _ in now for p in params} != expected:
                raise RuntimeError(f"{where}(): ascent step {self._ascents_done + 1} has gradients "
                                   "for other parameters than the first ascent step had")
            self._pending = (moved, _either(first_inf, found_inf))
        self._ascents_done += 1
        if zero_grad:
            self.zero_grad()

    def _finish_step(self) -> Optional[Tensor]:
        if self._ascents_done != self.steps:
            raise RuntimeError(f"{type(self).__name__}.second_step() after {self._ascents_done} of "
                               f"steps={self.steps} ascent steps; call first_step() after each of "
                               "the ascent backward passes")
        self._ascents_done = 0
        return super()._finish_step()

    def step(self, closure=None) -> Optional[Tensor]:
        """``step(closure)`` after the first backward: ``k`` ascent steps, each followed by
        ``closure()`` (forward/backward at the new point, returning the loss), then the base
        step. ``step()`` without a closure finishes a step whose ascent is done."""
        if closure is None:
            return super().step()
        loss = None
        for _ in range(self.steps):
            self.first_step(zero_grad=True)
            with torch.enable_grad():
                loss = closure()
        self._finish_step()
        return loss
