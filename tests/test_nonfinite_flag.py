"""The device-side check that decides whether a step is skipped: the non-finite markers of every
backend's read-only pass, folded by ``sum_segment_partials``. Exact for every dtype, on every
device, whatever the magnitudes (huge finite values must not count as inf)."""

import pytest
import torch

import msam_fused
from fused_cases import DEVICES

INF, NAN = float("inf"), float("nan")
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def backends_on(device):
    found = msam_fused.available_backends(device)
    names = [name for name in ("reference", "cpu", "cuda", "triton") if found[name] is None]
    return [msam_fused.backends.resolve(name, torch.device(device)) for name in names]


def flag(backend, grads):
    """What SAM's check of its second gradients computes (one dtype per call, as buckets are)."""
    norm_dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    partials = backend.sam_ascent_partials(grads, grads, adaptive=False, norm_dtype=norm_dtype)
    return bool(backend.sum_segment_partials(partials, norm_dtype)[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [INF, -INF, NAN])
def test_any_inf_or_nan_anywhere_is_found(device, dtype, bad):
    for backend in backends_on(device):
        for where in [0, 6, 1030]:  # first, middle, last entry of a tensor that is no block multiple
            grads = [torch.ones(3, dtype=dtype, device=device), torch.ones(1031, dtype=dtype, device=device)]
            grads[1][where] = bad
            assert flag(backend, grads), (backend.name, where)
        assert flag(backend, [torch.tensor(bad, dtype=dtype, device=device)]), backend.name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_gradients_pass_whatever_their_size(device, dtype):
    info = torch.finfo(dtype)
    grads = [torch.tensor([info.max, info.min, info.tiny], dtype=dtype, device=device),
             torch.empty(0, dtype=dtype, device=device), torch.tensor(0.0, dtype=dtype, device=device)]
    for backend in backends_on(device):
        assert not flag(backend, grads), backend.name


def test_sam_skips_a_step_whose_second_gradient_is_not_finite():
    p = torch.ones(4, requires_grad=True)
    sam = msam_fused.SAM([p], torch.optim.SGD, lr=0.1, backend="cpu")
    p.grad = torch.ones(4)
    sam.first_step(zero_grad=True)
    p.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    sam.second_step(zero_grad=True)
    assert torch.equal(p.detach(), torch.ones(4)) and sam.skipped_steps == 1


def test_a_sum_of_squares_beyond_float32_is_inf_not_an_error():
    """Finite float32 momenta whose squares overflow float32: the norm is inf and the new
    coefficient 0 on the fused backend as on the reference, and the step is not skipped."""
    results = {}
    for backend in ("reference", "cpu"):
        p = torch.zeros(3, requires_grad=True)
        opt = msam_fused.MSAM([p], lr=0.0, momentum=0.0, rho=1.0, backend=backend)
        p.grad = torch.full((3,), 1e30)
        opt.step()
        results[backend] = (p.detach().clone(), opt.state[p]["perturbation_coef"].clone(), opt.skipped_steps)
    assert torch.equal(results["cpu"][0], results["reference"][0])
    assert float(results["cpu"][1]) == float(results["reference"][1]) == 0.0
    assert results["cpu"][2] == results["reference"][2] == 0
