"""Every kernel variant compiles for a real GPU target (sm_90), with no GPU present.

The interpreter accepts code the compiler rejects, so CI also runs the ops with Triton's
launch replaced by a compile-only warm-up against a stand-in driver that reports an sm_90
CUDA device. Nothing runs; the test checks that each variant compiles and that the unmasked
rows load and store 16 bytes at a time (the table's alignment hint works).
"""

import re

import pytest
import torch

triton = pytest.importorskip("triton", reason="needs triton")
from msam_fused.triton_kernels import ops  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(ops.INTERPRETED, reason="needs the compiler, not the interpreter"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled tests cover this"),
]


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
    """Kernels launched inside the test are compiled, not run; yields [(name, kernel)]."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    run = JITFunction.run
    done = []

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        done.append((self.fn.__name__, kernel))
        return kernel

    monkeypatch.setenv("MSAM_TRITON_TUNE", "0")
    monkeypatch.setattr(JITFunction, "run", compile_only)
    monkeypatch.setattr(driver, "_active", _Sm90Driver())
    yield done


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_kernel_compiles_for_sm90(compiled, dtype):
    cd = torch.float32

    def zeros(*shapes, dt=dtype):
        return [torch.zeros(s, dtype=dt) for s in shapes]

    params, grads, state = zeros(5000, 3), [torch.zeros(5000, dtype=dtype), None], zeros(5000, 3, dt=cd)
    coef, flag = torch.zeros((), dtype=cd), torch.zeros(1)
    ops.msam_sgd_update_(params, grads, state, [], 0.1, 0.0, 0.9, coef, cd, None, None)
    ops.msam_sgd_update_(params, grads, state, zeros(5000, 3, dt=cd), 0.1, 0.0, 0.9, coef, cd,
                         torch.ones(1), flag)
    ops.adamw_msam_update_(params, grads, state, zeros(5000, 3, dt=cd), zeros((), (), dt=cd), [],
                           0.1, 0.9, 0.99, 1e-8, 0.1, coef, cd, None, flag.bool())
    ops.apply_perturbation_(params, state, [None, torch.zeros(3)], coef, flag)
    ops.remove_perturbation_(params, state, [None, torch.zeros(3)], coef)
    ops.sam_ascent_sum_of_squares(params, zeros(5000, 3), True, cd)
    ops.sam_ascent_(params, zeros(5000, 3), zeros(5000, 3), coef, True, flag)
    ops.sam_restore_(params, zeros(5000, 3))
    ops._perturbation_coef(coef, 0.5, coef, flag)

    names = {name for name, _ in compiled}
    assert names == {"msam_sgd_kernel", "adamw_msam_kernel", "move_kernel",
                     "ascent_sum_of_squares_kernel", "finish_kernel", "perturbation_coef_kernel"}
    for name, kernel in compiled:
        if name in ("finish_kernel", "perturbation_coef_kernel"):
            continue
        ptx = kernel.asm["ptx"]
        assert re.search(r"ld\.global(\.\w+)*\.v[248]", ptx), f"{name}: no vector loads"
