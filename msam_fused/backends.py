"""Backend dispatch: which implementation runs the step for the tensors of one device.

A backend is a module (or object) that satisfies :class:`Backend`: the functions of the step
contract (docs/design.md), with the keyword signatures of ``msam_fused.reference``, which is
their literal definition. The optimizers call them once per bucket (one param group on one
device in one dtype), never once per tensor, so a fused backend's launches per step do not
grow with the number of tensors. Optional parts are named in ``capabilities``:

* ``"stash"``: ``msam_sgd_overlap_stash_`` / ``msam_sgd_overlap_finish_``, the cheaper
  overlapped MSAM-SGD step (msam_fused/overlap.py);
* ``"adaptive"``: the ``perturbations=`` / ``coef_old=`` arguments of the passes (ASAM-style
  groups).

Asking for a backend by name either gives that backend or raises
:class:`BackendUnavailableError` saying what is missing; only ``"auto"`` falls back, and it
says so once.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

STASH = "stash"
ADAPTIVE = "adaptive"
CAPABILITIES = frozenset({STASH, ADAPTIVE})


class Backend(Protocol):
    """The step contract every backend implements (docs/design.md, "The backend contract")."""

    name: str
    capabilities: frozenset

    def segment_count(self, numel: int, device: torch.device) -> int: ...

    def msam_sgd_partials(self, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]],
                          momenta: Sequence[Tensor], masters: Sequence[Optional[Tensor]], *,
                          hyper: Tensor, norm_dtype: torch.dtype, grad_scale: Optional[Tensor] = None,
                          coef_old: Optional[Tensor] = None,
                          perturbations: Optional[Sequence[Tensor]] = None) -> Tensor: ...

    def adamw_msam_partials(self, params, grads, exp_avgs, exp_avg_sqs, steps, masters, *,
                            hyper: Tensor, norm_dtype: torch.dtype, grad_scale: Optional[Tensor] = None,
                            coef_old: Optional[Tensor] = None, perturbations=None) -> Tensor: ...

    def sum_segment_partials(self, partials: Tensor, norm_dtype: torch.dtype) -> tuple[Tensor, Tensor]: ...

    def perturbation_coef(self, sum_of_squares: Tensor, rho: Tensor | float, coef_old: Tensor,
                          found_inf: Optional[Tensor] = None) -> Tensor: ...

    def msam_sgd_step_(self, params, grads, momenta, masters, *, hyper: Tensor, coef_old: Tensor,
                       coef_new: Tensor, grad_scale: Optional[Tensor] = None,
                       found_inf: Optional[Tensor] = None, perturbations=None) -> None: ...

    def adamw_msam_step_(self, params, grads, exp_avgs, exp_avg_sqs, steps, masters, *, hyper: Tensor,
                         coef_old: Tensor, coef_new: Tensor, grad_scale: Optional[Tensor] = None,
                         found_inf: Optional[Tensor] = None, perturbations=None) -> None: ...

    def apply_perturbation_(self, params, directions, masters, *, coef: Tensor) -> None: ...

    def remove_perturbation_(self, params, directions, masters, *, coef: Tensor) -> None: ...

    def sam_ascent_partials(self, params, grads, *, adaptive: bool, norm_dtype: torch.dtype) -> Tensor: ...

    def sam_ascent_(self, params, grads, outs, *, scale: Tensor, adaptive: bool,
                    found_inf: Optional[Tensor] = None) -> None: ...

    def sam_restore_(self, params, backups) -> None: ...


BACKEND_NAMES = ("auto", "cuda", "triton", "cpu", "reference")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""


def _load_reference(device: torch.device):
    from msam_fused import reference

    return reference


def _load_cpu(device: torch.device):
    if device.type != "cpu":
        raise BackendUnavailableError(
            f"backend 'cpu' runs the fused C++ kernels on CPU tensors, but the parameters are on {device}")
    return _compiled_backend("cpu")


def _load_cuda(device: torch.device):
    if device.type != "cuda":
        raise BackendUnavailableError(
            f"backend 'cuda' needs parameters on a CUDA device, but they are on {device}")
    if not torch.cuda.is_available():
        raise BackendUnavailableError("backend 'cuda' needs a CUDA GPU, and torch sees none")
    return _compiled_backend("cuda")


def _compiled_backend(kind: str):
    try:
        module = importlib.import_module("msam_fused.fused_ops")
    except ImportError as err:
        raise BackendUnavailableError(
            f"backend '{kind}' needs the compiled extension msam_fused._C, which is not available "
            f"({err}); build it with `pip install --no-build-isolation -e .`") from err
    reason = module.unavailable_reason(kind)
    if reason:
        raise BackendUnavailableError(f"backend '{kind}': {reason}")
    return module.backend(kind)  # the same functions for both kinds, named for the one asked for


def _load_triton(device: torch.device):
    try:
        module = importlib.import_module("msam_fused.triton_kernels")
    except ImportError as err:
        raise BackendUnavailableError(
            f"backend 'triton' needs the triton package and msam_fused.triton_kernels ({err})") from err
    reason = module.unavailable_reason(device)
    if reason:
        raise BackendUnavailableError(f"backend 'triton': {reason}")
    return module


_LOADERS: dict[str, Callable[[torch.device], Backend]] = {
    "reference": _load_reference,
    "cpu": _load_cpu,
    "cuda": _load_cuda,
    "triton": _load_triton,
}

# The order "auto" tries, fastest first, per device type (cuda before triton: see bench/results).
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_fallbacks_reported: set = set()


def resolve(requested: str, device: torch.device) -> Backend:
    """The backend module that runs tensors on ``device`` for the name the user asked for."""
    if requested not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {requested!r}; choose one of {', '.join(BACKEND_NAMES)}")
    device = torch.device(device)
    if requested != "auto":
        return _LOADERS[requested](device)
    order = AUTO_ORDER.get(device.type, ("reference",))
    reasons = []
    for name in order:
        try:
            backend = _LOADERS[name](device)
        except BackendUnavailableError as err:
            reasons.append(str(err))
            continue
        if reasons and (device.type, name) not in _fallbacks_reported:
            _fallbacks_reported.add((device.type, name))
            warnings.warn(
                f"msam_fused: backend='auto' uses '{name}' for {device.type} tensors because "
                + "; ".join(reasons), stacklevel=4)
        return backend
    raise BackendUnavailableError("; ".join(reasons))  # unreachable: reference always loads


def with_capability(backend: Backend, capability: str, requested: str, what: str) -> Backend:
    """``backend`` if it has ``capability``; otherwise the reference backend when the user
    asked for "auto" (said once), else :class:`BackendUnavailableError` naming what is missing."""
    if capability in backend.capabilities:
        return backend
    if requested != "auto":
        raise BackendUnavailableError(
            f"{what}: backend '{backend.name}' does not implement this (no {capability!r} capability); "
            "use backend='reference', or 'auto' to fall back to it")
    if (capability, backend.name) not in _fallbacks_reported:
        _fallbacks_reported.add((capability, backend.name))
        warnings.warn(f"msam_fused: {what} runs on the 'reference' backend: backend "
                      f"'{backend.name}' does not implement it (no {capability!r} capability)", stacklevel=4)
    return _load_reference(None)


class PerDeviceBackends:
    """Mixin for the optimizers: the backend is resolved once per device that holds parameters
    (``self._backends``, filled by :meth:`_backend_on`; ``self.backend_request`` is the name
    the user asked for)."""

    _backends: dict
    backend_request: str

    def _backend_on(self, device: torch.device):
        if device not in self._backends:
            self._backends[device] = resolve(self.backend_request, device)
        return self._backends[device]

    @property
    def backend(self) -> str | dict:
        """The backend that runs the step: its name, or a name per device."""
        names = {str(d): b.name for d, b in self._backends.items()}
        return next(iter(names.values())) if len(set(names.values())) == 1 else names


def available_backends(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """Each backend name mapped to ``None`` if it can run on ``device``, else why it cannot."""
    out = {}
    for name, load in _LOADERS.items():
        try:
            load(torch.device(device))
            out[name] = None
        except BackendUnavailableError as err:
            out[name] = str(err)
    return out
