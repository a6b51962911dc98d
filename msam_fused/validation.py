"""Checks on user input. Each raises before anything is modified, naming the problem."""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, NamedTuple

import torch

NONFINITE_POLICIES = ("skip", "raise")


def check_number(where: str, name: str, value: Any, *, low: float = 0.0, high: float | None = None,
                 high_inclusive: bool = False) -> None:
    """``value`` must be a finite real Python number in ``[low, high)`` (or ``[low, high]``)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a Python float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{where}: invalid {name}={value!r}: must be finite")
    if value < low:
        raise ValueError(f"{where}: invalid {name}={value!r}: must be >= {low}")
    if high is not None and (value > high if high_inclusive else value >= high):
        bound = f"<= {high}" if high_inclusive else f"< {high}"
        raise ValueError(f"{where}: invalid {name}={value!r}: must be {bound}")


def check_hyperparameter(where: str, name: str, value: Any, **bounds) -> None:
    """A per-group scalar of the step: a Python number as for :func:`check_number`, or a 0-d
    floating-point tensor (which LR and rho schedules may update in place; its value is read
    on the device only, so it is not range-checked)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(f"{where}: {name} must be a Python float or a 0-d floating-point tensor, "
                            f"got a {value.dtype} tensor of shape {tuple(value.shape)}")
        return
    check_number(where, name, value, **bounds)


def check_flag(where: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be True or False, got {type(value).__name__} {value!r}")


def check_betas(where: str, betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        check_hyperparameter(where, f"betas[{i}]", beta, low=0.0, high=1.0)


def check_nonfinite_policy(where: str, policy: Any) -> None:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"{where}: nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")


def describe_param(group: dict, group_index: int, index: int, param: torch.Tensor) -> str:
    names = group.get("param_names")
    label = f" '{names[index]}'" if names else ""
    return f"parameter {index}{label} of param group {group_index} (shape {tuple(param.shape)})"


class ParamPlace(NamedTuple):
    """Where a parameter is; formatted (``str``) only when a message needs it, so the checks
    of every step cost no string building."""

    group: dict
    group_index: int
    index: int
    param: torch.Tensor

    def __str__(self) -> str:
        return describe_param(self.group, self.group_index, self.index, self.param)


def listed_params(where: str, params: Any) -> list:
    """A group's ``params`` as a list, read once: a tensor, a list, or any iterable (generators
    and ``filter``/``map`` objects included), as ``torch.optim`` takes them; unordered sets are
    refused, as torch refuses them. ``(name, tensor)`` pairs must be all or none, as in torch."""
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, (set, frozenset)):
        raise TypeError(f"{where}: optimizer parameters need to be organized in ordered collections, but the "
                        "ordering of tensors in sets changes between runs; use a list instead")
    params = list(params)
    named = [isinstance(p, tuple) for p in params]
    if any(named) and not all(named):
        raise ValueError(f"{where}: all optimizer params should be with/without names: some are (name, tensor) "
                         "pairs and some are bare tensors")
    return params


def with_plain_params(group: dict) -> dict:
    """torch accepts (name, tensor) pairs; validation wants the tensors and the names apart."""
    params = group["params"]
    if params and isinstance(params[0], tuple):
        return {**group, "params": [t for _, t in params], "param_names": [n for n, _ in params]}
    return group


def check_new_params(where: str, group_index: int, group: dict,
                     known: Iterable[torch.Tensor]) -> None:
    """A param group being added: no duplicates, no complex or non-float parameters."""
    params = group["params"]
    if len(params) == 0:
        raise ValueError(f"{where}: param group {group_index} has an empty parameter list")
    seen = {id(p) for p in known}
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}: param group {group_index} holds a {type(p).__name__} at "
                            f"position {i}; optimizers optimize tensors (pass module.parameters())")
        what = describe_param(group, group_index, i, p)
        if id(p) in seen:
            raise ValueError(f"{where}: {what} is listed more than once in the optimizer")
        seen.add(id(p))
        if p.is_complex():
            raise TypeError(f"{where}: {what} is complex ({p.dtype}); complex parameters are not "
                            "supported (optimize torch.view_as_real(p) instead)")
        if not p.is_floating_point():
            raise TypeError(f"{where}: {what} has dtype {p.dtype}; only floating-point "
                            "parameters can be optimized")


def check_model_holds_params(where: str, model: torch.nn.Module, param_groups: list) -> None:
    """``model`` holds every parameter of the optimizer (what it says about the model is true)."""
    held = {id(p) for p in model.parameters()}
    missing = [describe_param(g, gi, i, p) for gi, g in enumerate(param_groups)
               for i, p in enumerate(g["params"]) if id(p) not in held]
    if missing:
        total = sum(len(g["params"]) for g in param_groups)
        raise ValueError(f"{where}: the model does not hold {len(missing)} of the optimizer's {total} "
                         f"parameters (the first: {missing[0]}); pass the model whose parameters "
                         "the optimizer was built with")


def check_param_for_step(where: str, what: object, p: torch.Tensor, layout: tuple) -> None:
    """The parameter is where it was when the optimizer was built, with a usable gradient."""
    device, dtype = layout
    if p.device != device or p.dtype != dtype:
        raise RuntimeError(
            f"{where}: {what} was {device}/{dtype} when the optimizer was built and is now "
            f"{p.device}/{p.dtype}; move or cast the model before building the optimizer")
    g = p.grad
    if g is None:
        return
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"{where}: {what} has a sparse gradient ({g.layout}); MSAM needs dense "
                           "gradients (e.g. nn.Embedding(sparse=False))")
    if g.is_complex():
        raise RuntimeError(f"{where}: {what} has a complex gradient; complex gradients are not supported")
    if g.dtype != p.dtype or g.device != p.device or g.shape != p.shape:
        raise RuntimeError(f"{where}: {what} has a gradient of {g.device}/{g.dtype} shape "
                           f"{tuple(g.shape)}, which does not match the parameter")
