"""Every kernel variant compiles for a real GPU target (sm_90), with no GPU present.

The interpreter accepts code the compiler rejects and cannot show which instructions the
arithmetic becomes, so CI also runs the ops with Triton's launch replaced by a compile-only
warm-up against a stand-in driver that reports an sm_90 CUDA device. Nothing runs; the tests
read the PTX: aligned records load and store 16 bytes at a time (and one misaligned tensor
does not turn that off for the others), and every division and square root is IEEE
round-to-nearest (``div.rn``/``sqrt.rn``), never ``div.full``/``div.approx``/``sqrt.approx``.
"""

import re

import pytest
import torch

triton = pytest.importorskip("triton", reason="needs triton")
from msam_fused import triton_kernels  # noqa: E402
from msam_fused.triton_kernels import ops  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(ops.INTERPRETED, reason="needs the compiler, not the interpreter"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled tests cover this"),
]

VECTOR_LOAD = re.compile(r"ld\.global(\.\w+)*\.v[248]")
APPROXIMATE = re.compile(r"div\.full\.f32|div\.approx|sqrt\.approx")


class _Sm90Driver:
    """What ``JITFunction.run`` asks the active driver for before compiling."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@pytest.fixture
def compiled(monkeypatch):
    """Kernels launched inside the test are compiled, not run; yields
    [(kernel name, its constexpr arguments, compiled kernel)]."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    run = JITFunction.run
    done = []

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        done.append((self.fn.__name__, kwargs, kernel))
        return kernel

    monkeypatch.setattr(JITFunction, "run", compile_only)
    monkeypatch.setattr(driver, "_active", _Sm90Driver())
    yield done


def _ptx(compiled, name, **constexprs):
    """(ALIGNED, PTX) of each launch of kernel ``name`` with the given constexpr values."""
    return [(kwargs.get("ALIGNED"), kernel.asm["ptx"]) for n, kwargs, kernel in compiled
            if n == name and all(kwargs.get(k) == v for k, v in constexprs.items())]


def _run_every_op(dtype):
    cd = torch.float64 if dtype == torch.float64 else torch.float32

    def zeros(*shapes, dt=dtype):
        return [torch.zeros(s, dtype=dt) for s in shapes]

    params, grads, state = zeros(5000, 3), [torch.zeros(5000, dtype=dtype), None], zeros(5000, 3, dt=cd)
    sgd = torch.tensor([0.1, 0.0, 0.9, 0.5], dtype=torch.float64)
    adamw = torch.tensor([0.1, 0.9, 0.999, 1e-8, 0.1, 0.5], dtype=torch.float64)
    coef, flag, scale = torch.zeros((), dtype=cd), torch.zeros(1), torch.ones(1)
    triton_kernels.msam_sgd_partials(params, grads, state, [None, None], hyper=sgd, norm_dtype=cd,
                                     grad_scale=scale)
    triton_kernels.adamw_msam_partials(params, grads, state, state, [None, None], [None, None],
                                       hyper=adamw, norm_dtype=cd, grad_scale=scale)
    masters = zeros(5000, 3, dt=torch.float32) if dtype != cd else [None, None]
    triton_kernels.msam_sgd_step_(params, grads, state, masters, hyper=sgd, coef_old=coef,
                                  coef_new=coef, grad_scale=scale, found_inf=flag)
    triton_kernels.adamw_msam_step_(params, grads, state, zeros(5000, 3, dt=cd),
                                    zeros((), (), dt=torch.float32), masters, hyper=adamw,
                                    coef_old=coef, coef_new=coef, grad_scale=scale,
                                    found_inf=flag.bool())
    triton_kernels.apply_perturbation_(params, state, [None, torch.zeros(3)], coef=coef)
    triton_kernels.remove_perturbation_(params, state, [None, torch.zeros(3)], coef=coef)
    triton_kernels.sam_ascent_partials(params, zeros(5000, 3), adaptive=True, norm_dtype=cd)
    triton_kernels.sam_ascent_(params, zeros(5000, 3), zeros(5000, 3), scale=coef, adaptive=True,
                               found_inf=flag)
    triton_kernels.sam_restore_(params, zeros(5000, 3))
    if dtype == cd:  # the stash keeps the old momentum in the gradient: same dtype only
        stashes = zeros(5000, 3)
        triton_kernels.msam_sgd_overlap_stash_(params, stashes, state, hyper=sgd, norm_dtype=cd,
                                               grad_scale=scale)
        triton_kernels.msam_sgd_overlap_finish_(params, [stashes[0], None], state, hyper=sgd,
                                                coef_old=coef, coef_new=coef, found_inf=flag)
    ops.sum_segment_partials(torch.zeros(3, 2, dtype=torch.float64), cd)
    ops.perturbation_coef(coef, torch.tensor(0.5, dtype=torch.float64), coef, flag)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_every_kernel_compiles_for_sm90_with_vector_loads(compiled, dtype):
    _run_every_op(dtype)
    names = {name for name, _, _ in compiled}
    stash = {"msam_sgd_overlap_stash_kernel", "msam_sgd_overlap_finish_kernel"}
    assert names == {"msam_sgd_partials_kernel", "adamw_msam_partials_kernel",
                     "sam_ascent_partials_kernel", "msam_sgd_step_kernel", "adamw_msam_step_kernel",
                     "advance_steps_kernel", "move_kernel", "sum_segment_partials_kernel",
                     "perturbation_coef_kernel"} | (set() if dtype == torch.bfloat16 else stash)
    for name, kwargs, kernel in compiled:
        if kwargs.get("ALIGNED"):
            assert VECTOR_LOAD.search(kernel.asm["ptx"]), f"{name}: no vector loads"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_divisions_and_square_roots_are_ieee(compiled, dtype):
    """The compiled ``/`` and ``tl.sqrt`` of float32 are approximate; the C++ kernels' are
    not. AdamW's update divides and takes a root, the gradient is divided by GradScaler's
    scale, and the coefficient divides rho by the norm: all must round to nearest."""
    _run_every_op(dtype)
    for name, _, kernel in compiled:
        found = APPROXIMATE.findall(kernel.asm["ptx"])
        assert not found, f"{name}: approximate arithmetic {sorted(set(found))}"
    width = "f64" if dtype == torch.float64 else "f32"
    with_grads = _ptx(compiled, "adamw_msam_step_kernel", HAS_GRAD=True)
    assert with_grads
    for _, ptx in with_grads:
        assert f"div.rn.{width}" in ptx and f"sqrt.rn.{width}" in ptx
    for _, ptx in _ptx(compiled, "perturbation_coef_kernel"):
        assert "div.rn.f64" in ptx and "sqrt.rn.f64" in ptx


def test_one_misaligned_tensor_keeps_vector_loads_for_the_others(compiled):
    """Gradients as views at odd offsets (as in DDP bucket buffers) cost only their own
    tensor the vector loads: the bucket runs as an aligned and an unaligned launch."""
    flat = torch.zeros(20000)
    params = [torch.zeros(5000), torch.zeros(4000)]
    grads = [flat[:5000], flat[5001:9001]]  # the second starts 4 bytes past a 16-byte boundary
    momenta = [torch.zeros(5000), torch.zeros(4000)]
    sgd = torch.tensor([0.1, 0.0, 0.9, 0.5], dtype=torch.float64)
    coef = torch.zeros(())
    triton_kernels.msam_sgd_step_(params, grads, momenta, [None, None], hyper=sgd,
                                  coef_old=coef, coef_new=coef)
    launches = _ptx(compiled, "msam_sgd_step_kernel")
    assert sorted(aligned for aligned, _ in launches) == [False, True]
    for aligned, ptx in launches:
        assert bool(VECTOR_LOAD.search(ptx)) == aligned
