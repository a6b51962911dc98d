"""LookSAM (Liu, Mai, Chen, Hsieh, You, "Towards Efficient and Scalable Sharpness-Aware
Minimization", CVPR 2022, Algorithm 2): SAM's extra pass only every k-th step."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from msam_fused.reference import EPS_NORM
from msam_fused.sam import SAM
from msam_fused.tensor_lists import dot, norm
from msam_fused.validation import check_number
from msam_fused.variants.extra_state import split_state_dict

GV_KEY = "looksam_orthogonal_grad"


class LookSAM(SAM):
    r"""LookSAM around any base optimizer. With ``g`` the gradient at ``w``:

    * every ``k``-th step (steps ``0, k, 2k, ...``), as SAM: ``g_s`` is the gradient at
      ``w + rho * g / ||g||``, and its component orthogonal to ``g`` is kept::

          g_v = g_s - (<g, g_s> / ||g||**2) * g

    * on the other steps, no second pass: ``g_s = g + alpha * (||g|| / ||g_v||) * g_v``;

    and the base optimizer steps with ``g_s``. Norms and the inner product are global (over
    all param groups), as in the paper's algorithm; a parameter that has no ``g_v`` yet (it
    got no gradient at the last refresh) takes ``g`` alone. ``g_v`` and the step count are
    part of :meth:`state_dict`, so a resumed run continues exactly.

    Use ``step(closure)`` after the first backward (the closure, the forward/backward at the
    perturbed point inside ``disable_running_stats``, runs only on refresh steps), or check
    :attr:`refresh_due`: if true call :meth:`first_step`, backward, :meth:`second_step`; else
    just :meth:`second_step` (or ``step()``).

    Args: ``rho`` (paper: 0.05 ... 1, 1 for ViTs), ``k`` (paper: 5), ``alpha`` (paper: 0.7),
    the rest as for :class:`~msam_fused.SAM` (``adaptive`` is not part of LookSAM).
    """

    def __init__(self, params, base_optimizer: type, rho: float = 0.05, k: int = 5,
                 alpha: float = 0.7, **kwargs: Any):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"LookSAM: k must be an integer >= 1, got {k!r}")
        check_number("LookSAM", "alpha", alpha)
        if kwargs.get("adaptive", False):
            raise ValueError("LookSAM: adaptive=True is not part of LookSAM")
        self.k = k
        self.alpha = alpha
        self._steps_taken = 0
        self._first_grads: dict[Tensor, Tensor] = {}
        super().__init__(params, base_optimizer, rho=rho, **kwargs)

    @property
    def refresh_due(self) -> bool:
        """Whether this step computes SAM's gradient (and needs the second pass)."""
        return self._steps_taken % self.k == 0

    def first_step(self, zero_grad: bool = False) -> None:
        """On a refresh step: remember ``g`` and move to ``w + rho * g / ||g||``."""
        if not self.refresh_due:
            raise RuntimeError(f"LookSAM.first_step(): step {self._steps_taken} is not a refresh "
                               f"step (every k={self.k}-th is); call second_step() or step()")
        self._first_grads = {p: p.grad.detach().clone() for p in self._params_with_grad()}
        super().first_step(zero_grad)

    def second_step(self, zero_grad: bool = False) -> None:
        """Finish a refresh step (after :meth:`first_step` and the second backward), or take a
        whole reuse step."""
        self.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None) -> Optional[Tensor]:
        if self._pending is None and (closure is None or not self.refresh_due):
            self._finish_step()  # a reuse step needs no second pass: the closure is not run
            return None
        return super().step(closure)

    @torch.no_grad()
    def _finish_step(self) -> None:
        if self._pending is None:
            if self.refresh_due:
                raise RuntimeError(f"LookSAM: step {self._steps_taken} is a refresh step; call "
                                   "first_step() and the second backward first, or step(closure)")
            self._reuse_orthogonal_component()
            self._descend("LookSAM.step", None)
        else:
            candidates = self._orthogonal_components()
            self._first_grads = {}
            found_inf = super()._finish_step()
            for p, g_v in candidates.items():
                self.state[p][GV_KEY] = _unless(found_inf, self.state[p].get(GV_KEY), g_v)
        self._steps_taken += 1

    def _params_with_grad(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _orthogonal_components(self) -> dict[Tensor, Tensor]:
        """``g_v = g_s - (<g, g_s> / ||g||**2) g`` per parameter, from the remembered ``g`` and
        the ``g_s`` now in ``.grad``."""
        params = [p for p in self._params_with_grad() if p in self._first_grads]
        g = [self._first_grads[p] for p in params]
        g_s = [p.grad for p in params]
        coef = dot(g, g_s) / (dot(g, g) + EPS_NORM)
        return {p: gsi - coef.to(gi.device, gi.dtype) * gi for p, gi, gsi in zip(params, g, g_s)}

    def _reuse_orthogonal_component(self) -> None:
        """``.grad = g + alpha * ||g|| / ||g_v|| * g_v``."""
        params = self._params_with_grad()
        g = [p.grad for p in params]
        g_v = [self.state[p].get(GV_KEY) for p in params]
        known = [(gi, gvi) for gi, gvi in zip(g, g_v) if gvi is not None]
        if not known:
            return
        scale = self.alpha * norm(g) / (norm([v for _, v in known]) + EPS_NORM)
        for gi, gvi in known:
            gi.add_(scale.to(gi.device, gi.dtype) * gvi)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "looksam": {"steps_taken": self._steps_taken}}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict, tag = split_state_dict(state_dict, "looksam", "LookSAM")
        super().load_state_dict(state_dict)
        self._steps_taken = int(tag["steps_taken"])


def _unless(skip: Optional[Tensor], old: Optional[Tensor], new: Tensor) -> Tensor:
    """``new``, or on a skipped step (decided on the device) ``old`` (zeros if there is none)."""
    if skip is None:
        return new
    return torch.where(skip.to(new.device) != 0, torch.zeros_like(new) if old is None else old, new)
