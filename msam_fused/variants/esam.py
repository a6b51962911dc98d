"""ESAM (Du, Yan, Feng, Zhou, Zhen, Goh, Tan, "Efficient Sharpness-aware Minimization for
Improved Training of Neural Networks", ICLR 2022): SAM with Stochastic Weight Perturbation and
Sharpness-sensitive Data Selection."""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from msam_fused.batchnorm import disable_running_stats
from msam_fused.momentum_ascent import perturbs
from msam_fused.sam import SAM
from msam_fused.validation import check_number
from msam_fused.variants.extra_state import split_state_dict

# ``losses(indices)`` returns the per-sample losses (shape [n]) of the batch, or of the samples
# ``indices`` (a device tensor of indices into the batch) when given.
PerSampleLosses = Callable[[Optional[Tensor]], Tensor]


class ESAM(SAM):
    r"""ESAM around any base optimizer. One step on a batch ``B``:

    1. **SWP**: each parameter tensor is drawn for perturbation with probability ``beta``
       (``torch.rand(number of tensors)`` once per step from this optimizer's own generator,
       seeded with ``seed``, in param-group order); only the drawn tensors need a gradient in
       the first backward pass (the others have ``requires_grad`` off during it, which is
       where SWP saves compute). Tensors of ``perturb=False`` groups are never drawn.
    2. First forward/backward at ``w`` on all of ``B``: per-sample losses ``l_i(w)``, gradient
       ``g`` of their mean for the drawn tensors.
    3. Ascent on the drawn tensors only: ``e = (rho / beta) * g / ||g||`` (norm over the drawn
       tensors; the others are not moved), as in the authors' code.
    4. **SDS**: a forward pass without gradient at ``w + e`` gives ``l_i(w + e)``; the
       ``ceil(gamma * |B|)`` samples with the largest ``l_i(w + e) - l_i(w)`` form ``B+``.
    5. Forward/backward at ``w + e`` on ``B+`` (mean loss), back to ``w``, base step with that
       gradient (every tensor gets it).

    ``beta = 1`` turns SWP off, ``gamma = 1`` turns SDS off; both give SAM. Passes 4 and 5 run
    inside :func:`~msam_fused.disable_running_stats` when ``model`` is given to :meth:`step`.
    Paper defaults: ``beta = 0.6`` (ResNet-18; 0.5 for WRN-28-10), ``gamma = 0.5``.

    Use :meth:`step` with a function of the sample indices that runs the forward pass, e.g.::

        def losses(idx=None):
            xb, yb = (x, y) if idx is None else (x[idx], y[idx])
            return F.cross_entropy(model(xb), yb, reduction="none")
        loss = esam.step(losses, model=model)     # the mean loss at w, for logging
    """

    def __init__(self, params, base_optimizer: type, rho: float = 0.05, beta: float = 0.6,
                 gamma: float = 0.5, *, seed: Optional[int] = None, **kwargs: Any):
        check_number("ESAM", "beta", beta, low=0.0, high=1.0, high_inclusive=True)
        check_number("ESAM", "gamma", gamma, low=0.0, high=1.0, high_inclusive=True)
        if beta == 0 or gamma == 0:
            raise ValueError(f"ESAM: beta and gamma must be > 0 (got beta={beta}, gamma={gamma}); "
                             "beta is the fraction of tensors perturbed, gamma of samples kept")
        self.beta = beta
        self.gamma = gamma
        self.generator = torch.Generator()
        self.generator.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed)
        super().__init__(params, base_optimizer, rho=rho, **kwargs)

    def _ascent_radius(self, group: dict) -> float:
        return group["rho"] / self.beta

    def step(self, losses: PerSampleLosses = None, model: Optional[nn.Module] = None) -> Tensor:
        """One ESAM step (all three passes); returns the mean loss at ``w`` (detached).
        ``losses``: see the class docstring. Gradients already in ``.grad`` are discarded."""
        if losses is None:
            raise TypeError("ESAM.step() needs the per-sample loss function: step(losses, model)")
        self.zero_grad(set_to_none=True)
        params = [p for g in self.param_groups for p in g["params"]]
        draws = (torch.rand(len(params), generator=self.generator) < self.beta).tolist()
        # a group with perturb=False is never moved, so it needs no gradient at w either
        drawn = [d and perturbs(g) for d, g in zip(draws, (g for g in self.param_groups
                                                          for _ in g["params"]))]
        with _requires_grad_only(params, drawn):
            before = losses(None)
            if any(drawn):
                before.mean().backward()
        before = before.detach()
        if any(drawn):
            self.first_step(zero_grad=True)
        else:  # nothing drawn: e = 0, SDS sees no sharpness and keeps any gamma-fraction
            self._pending = ([], None)
        with ExitStack() as stack:
            if model is not None:
                stack.enter_context(disable_running_stats(model))
            with torch.no_grad():
                sharpness = losses(None) - before
            keep = math.ceil(self.gamma * sharpness.numel())
            selected = torch.topk(sharpness, keep, sorted=False).indices if keep < sharpness.numel() else None
            losses(selected).mean().backward()
        self._finish_step()
        return before.mean()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "esam": {"generator": self.generator.get_state()}}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict, tag = split_state_dict(state_dict, "esam", "ESAM")
        super().load_state_dict(state_dict)
        self.generator.set_state(tag["generator"])


@contextmanager
def _requires_grad_only(params: list[Tensor], keep: list[bool]) -> Iterator[None]:
    """Inside, only the kept parameters (of those that had it) require a gradient."""
    dropped = [p for p, k in zip(params, keep) if not k and p.requires_grad]
    for p in dropped:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in dropped:
            p.requires_grad_(True)
