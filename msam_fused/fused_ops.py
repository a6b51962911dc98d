"""The fused C++/CUDA kernels (``csrc/``) as the ``"cpu"`` and ``"cuda"`` backends.

Thin wrappers over ``torch.ops.msam_fused.*`` with the signatures of ``msam_fused.reference``
(see ``msam_fused/backends.py`` for the contract), plus a fake (meta) kernel per op so that
the ops trace under ``torch.compile``. Each call handles one bucket with a constant number of
kernel launches, whatever the number of tensors; ``hyper``, coefficients, ``rho``,
``grad_scale`` and ``found_inf`` are read by the kernels on the device.

Adaptive perturbations (``perturbations=``) are not implemented here and are refused with
:class:`NotImplementedError`, never ignored.
"""

from __future__ import annotations

import types
from typing import Optional, Sequence

import torch
from torch import Tensor

name = "fused"

try:
    from msam_fused import _C  # noqa: F401  (loading it registers torch.ops.msam_fused.*)
except ImportError as err:
    _LOAD_ERROR: Optional[ImportError] = err
else:
    _LOAD_ERROR = None

capabilities = frozenset({"stash"})

BACKEND_FUNCTIONS = ("msam_sgd_partials", "adamw_msam_partials", "segment_count", "sum_segment_partials",
                     "perturbation_coef", "msam_sgd_step_", "adamw_msam_step_", "msam_sgd_overlap_stash_",
                     "msam_sgd_overlap_finish_", "remove_perturbation_", "apply_perturbation_",
                     "sam_ascent_partials", "sam_ascent_", "sam_restore_")

_cuda_reasons: dict = {}


def unavailable_reason(kind: str) -> Optional[str]:
    """Why backend ``kind`` ("cpu" or "cuda") cannot run here, or None if it can."""
    if _LOAD_ERROR is not None:
        return (f"the compiled extension msam_fused._C is not built ({_LOAD_ERROR}); build it with "
                "`pip install --no-build-isolation -e .`")
    if kind == "cpu":
        return None
    if kind != "cuda":
        return f"unknown kind {kind!r}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("msam_fused::perturb_", "CUDA"):
        return ("msam_fused._C was built without its CUDA kernels (no CUDA toolkit was found at "
                "build time, or MSAM_FUSED_SKIP_CUDA_BUILD=1); rebuild with CUDA_HOME set")
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    device = torch.cuda.current_device()
    if device not in _cuda_reasons:
        _cuda_reasons[device] = _probe_cuda(device)
    return _cuda_reasons[device]


def _probe_cuda(device: int) -> Optional[str]:
    """Run the smallest kernel once: it fails if no image was compiled for this GPU."""
    try:
        one = torch.ones((), device=device)
        torch.ops.msam_fused.perturbation_coef(one, one, one, None)
    except RuntimeError as err:
        major, minor = torch.cuda.get_device_capability(device)
        return (f"the CUDA kernels do not run on {torch.cuda.get_device_name(device)} (compute "
                f"capability {major}.{minor}): {err}; rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")
    return None


def backend(kind: str) -> types.SimpleNamespace:
    """This module's functions under the backend name ``kind``, with their capabilities."""
    return types.SimpleNamespace(name=kind, capabilities=capabilities,
                                 **{f: globals()[f] for f in BACKEND_FUNCTIONS})


# --------------------------------------------------------------------------- the contract
def msam_sgd_partials(params, grads, momenta, masters, *, hyper, norm_dtype, grad_scale=None, coef_old=None,
                      perturbations=None) -> Tensor:
    """The read-only pass: per segment, the sum of squares of the new momenta and the
    gradients' non-finite marker, ``[segments, 2]`` float64. ``masters`` and ``coef_old`` are
    not read (they matter only to adaptive perturbations, which these kernels lack)."""
    _refuse_adaptive(perturbations, "msam_sgd_partials")
    return torch.ops.msam_fused.msam_sgd_partials(list(params), list(grads), list(momenta), hyper, norm_dtype,
                                                 grad_scale)


def adamw_msam_partials(params, grads, exp_avgs, exp_avg_sqs, steps, masters, *, hyper, norm_dtype,
                        grad_scale=None, coef_old=None, perturbations=None) -> Tensor:
    """The read-only pass of AdamW-MSAM (reads only ``grads`` and ``exp_avgs``)."""
    _refuse_adaptive(perturbations, "adamw_msam_partials")
    return torch.ops.msam_fused.adamw_msam_partials(list(params), list(grads), list(exp_avgs), hyper, norm_dtype,
                                                   grad_scale)


def msam_sgd_step_(params, grads, momenta, masters, *, hyper, coef_old, coef_new, grad_scale=None,
                   found_inf=None, perturbations=None) -> None:
    _refuse_adaptive(perturbations, "msam_sgd_step_")
    _by_master_presence(masters, lambda pick, ms: torch.ops.msam_fused.msam_sgd_step_(
        pick(params), pick(grads), pick(momenta), ms, hyper, coef_old, coef_new, grad_scale, found_inf))


def adamw_msam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, masters, *, hyper, coef_old, coef_new,
                     grad_scale=None, found_inf=None, perturbations=None) -> None:
    _refuse_adaptive(perturbations, "adamw_msam_step_")
    _by_master_presence(masters, lambda pick, ms: torch.ops.msam_fused.adamw_msam_step_(
        pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(steps), ms, hyper, coef_old,
        coef_new, grad_scale, found_inf))


def segment_count(numel: int, device: torch.device) -> int:
    """How many rows of partial sums the read-only passes return for a tensor (one per segment)."""
    length = _segment_length(torch.device(device).type)
    return (numel + length - 1) // length


def sum_segment_partials(partials: Tensor, norm_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return torch.ops.msam_fused.sum_segment_partials(partials, norm_dtype)


def perturbation_coef(sum_of_squares: Tensor, rho, coef_old: Tensor,
                      found_inf: Optional[Tensor] = None) -> Tensor:
    """``rho`` is a 0-d tensor on ``sum_of_squares``' device, or a float."""
    if not isinstance(rho, Tensor):
        rho = torch.tensor(float(rho), dtype=torch.float64, device=sum_of_squares.device)
    return torch.ops.msam_fused.perturbation_coef(sum_of_squares, rho, coef_old, found_inf)


def msam_sgd_overlap_stash_(params, grads, momenta, *, hyper, norm_dtype, grad_scale=None) -> Tensor:
    return torch.ops.msam_fused.msam_sgd_overlap_stash_(list(params), list(grads), list(momenta), hyper,
                                                       norm_dtype, grad_scale)


def msam_sgd_overlap_finish_(params, stashes, momenta, *, hyper, coef_old, coef_new, found_inf=None) -> None:
    torch.ops.msam_fused.msam_sgd_overlap_finish_(list(params), list(stashes), list(momenta), hyper, coef_old,
                                                  coef_new, found_inf)


def apply_perturbation_(params, directions, masters, *, coef) -> None:
    _by_master_presence(masters, lambda pick, ms: torch.ops.msam_fused.perturb_(
        pick(params), pick(directions), ms, coef, -1.0))


def remove_perturbation_(params, directions, masters, *, coef) -> None:
    # With a master copy the true weights are the master itself (alpha 0), else p + c * x.
    _by_master_presence(masters, lambda pick, ms: torch.ops.msam_fused.perturb_(
        pick(params), pick(directions), ms, coef, 0.0 if ms else 1.0))


def sam_ascent_partials(params, grads, *, adaptive, norm_dtype) -> Tensor:
    return torch.ops.msam_fused.sam_ascent_partials(list(params), list(grads), adaptive, norm_dtype)


def sam_ascent_(params, grads, outs, *, scale, adaptive, found_inf=None) -> None:
    torch.ops.msam_fused.sam_ascent_(list(params), list(grads), list(outs), scale, adaptive, found_inf)


def sam_restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    torch._foreach_copy_(list(params), list(backups))


def _refuse_adaptive(perturbations, op: str) -> None:
    if perturbations is not None:
        raise NotImplementedError(
            f"msam_fused: the fused kernels ({op}) do not implement adaptive perturbations "
            "(capability 'adaptive'); use backend='reference' for adaptive groups")


def _by_master_presence(masters, call) -> None:
    """``call(pick, masters)`` once for the tensors with a master copy and once for those
    without (normally the bucket is all one or the other)."""
    present = [i for i, m in enumerate(masters) if m is not None]
    if len(present) in (0, len(masters)):
        call(list, [m for m in masters if m is not None])
        return
    absent = [i for i, m in enumerate(masters) if m is None]
    call(lambda xs: [xs[i] for i in present], [masters[i] for i in present])
    call(lambda xs: [xs[i] for i in absent], [])


_segment_lengths: dict = {}


def _segment_length(device_type: str) -> int:
    """Elements per segment of the kernels for a device type (a constant of the build)."""
    if device_type not in _segment_lengths:
        _segment_lengths[device_type] = torch.ops.msam_fused.segment_length(torch.device(device_type))
    return _segment_lengths[device_type]


# ------------------------------------------------------------------------- fake kernels
def _check_lists(op: str, params, hyper=None, **lists) -> None:
    """The checks of the C++ ops that shapes alone decide (fake tensors have no data)."""
    torch._check(len(params) > 0, lambda: f"msam_fused.{op}: params is empty")
    device = params[0].device
    torch._check(hyper is None or hyper.device == device,
                 lambda: f"msam_fused.{op}: hyper is on {hyper.device} but params[0] is on {device}")
    for list_name, tensors in {"params": params, **lists}.items():
        torch._check(len(tensors) in (0, len(params)) if list_name == "masters"
                     else len(tensors) == len(params),
                     lambda: f"msam_fused.{op}: {list_name} has {len(tensors)} tensors but params has "
                             f"{len(params)}")
        for i, t in enumerate(tensors):
            torch._check(t is None or t.device == device,
                         lambda: f"msam_fused.{op}: {list_name}[{i}] is on {t.device} but params[0] is "
                                 f"on {device}; all tensors of one call must be on one device")


def _fake_partials(params):
    segments = sum(segment_count(p.numel(), p.device) for p in params)
    return params[0].new_empty((segments, 2), dtype=torch.float64)


if _LOAD_ERROR is None:
    @torch.library.register_fake("msam_fused::msam_sgd_partials")
    def _(params, grads, momenta, hyper, norm_dtype, grad_scale=None):
        _check_lists("msam_sgd_partials", params, hyper, grads=grads, momenta=momenta)
        return _fake_partials(params)

    @torch.library.register_fake("msam_fused::adamw_msam_partials")
    def _(params, grads, exp_avgs, hyper, norm_dtype, grad_scale=None):
        _check_lists("adamw_msam_partials", params, hyper, grads=grads, exp_avgs=exp_avgs)
        return _fake_partials(params)

    @torch.library.register_fake("msam_fused::sum_segment_partials")
    def _(partials, norm_dtype):
        return partials.new_empty((), dtype=norm_dtype), partials.new_empty((), dtype=torch.bool)

    @torch.library.register_fake("msam_fused::perturbation_coef")
    def _(sum_of_squares, rho, coef_old, found_inf=None):
        torch._check(coef_old.numel() == 1, lambda: "msam_fused.perturbation_coef: coef_old must "
                                                    "hold one element")
        return coef_old.new_empty(())

    @torch.library.register_fake("msam_fused::msam_sgd_step_")
    def _(params, grads, momenta, masters, hyper, coef_old, coef_new, grad_scale=None, found_inf=None):
        _check_lists("msam_sgd_step_", params, hyper, grads=grads, momenta=momenta, masters=masters)

    @torch.library.register_fake("msam_fused::adamw_msam_step_")
    def _(params, grads, exp_avgs, exp_avg_sqs, steps, masters, hyper, coef_old, coef_new, grad_scale=None,
          found_inf=None):
        _check_lists("adamw_msam_step_", params, hyper, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                     steps=steps, masters=masters)

    @torch.library.register_fake("msam_fused::msam_sgd_overlap_stash_")
    def _(params, grads, momenta, hyper, norm_dtype, grad_scale=None):
        _check_lists("msam_sgd_overlap_stash_", params, hyper, grads=grads, momenta=momenta)
        return _fake_partials(params)

    @torch.library.register_fake("msam_fused::msam_sgd_overlap_finish_")
    def _(params, stashes, momenta, hyper, coef_old, coef_new, found_inf=None):
        _check_lists("msam_sgd_overlap_finish_", params, hyper, stashes=stashes, momenta=momenta)

    @torch.library.register_fake("msam_fused::perturb_")
    def _(params, directions, masters, coef, alpha):
        _check_lists("perturb_", params, directions=directions, masters=masters)

    @torch.library.register_fake("msam_fused::sam_ascent_partials")
    def _(params, grads, adaptive, norm_dtype):
        _check_lists("sam_ascent_partials", params, grads=grads)
        return _fake_partials(params)

    @torch.library.register_fake("msam_fused::sam_ascent_")
    def _(params, grads, outs, scale, adaptive, found_inf=None):
        _check_lists("sam_ascent_", params, grads=grads, outs=outs)
