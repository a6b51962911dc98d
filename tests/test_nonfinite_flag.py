"""The device-side check that decides whether a step is skipped: exact for every dtype, on
every device, whatever the magnitudes."""

import pytest
import torch

from fused_cases import DEVICES
from msam_fused.nonfinite import nonfinite_flag

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [INF, -INF, NAN])
def test_any_inf_or_nan_anywhere_is_found(device, dtype, bad):
    for where in [0, 6, 1030]:  # first, middle, last entry of a tensor that is no block multiple
        grads = [torch.ones(3, dtype=dtype, device=device), torch.ones(1031, dtype=dtype, device=device)]
        grads[1][where] = bad
        assert bool(nonfinite_flag(grads, torch.device(device)))
    assert bool(nonfinite_flag([torch.tensor(bad, dtype=dtype, device=device)], torch.device(device)))


@pytest.mark.parametrize("device", DEVICES)
def test_finite_gradients_pass_whatever_their_size(device):
    grads = [torch.tensor([torch.finfo(dt).max, torch.finfo(dt).min], dtype=dt, device=device)
             for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)]
    grads += [torch.empty(0, device=device), torch.tensor(0.0, device=device)]
    assert not bool(nonfinite_flag(grads, torch.device(device)))


def test_an_empty_list_is_finite():
    assert not bool(nonfinite_flag([], torch.device("cpu")))
