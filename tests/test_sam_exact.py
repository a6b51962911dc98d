"""SAM is exact: in float64, 50 steps of ``msam_fused.SAM`` equal the plain two-pass loop
(tests/sam_plain_loop.py) to 1e-12, on every CPU backend, for SGD and AdamW bases (plain,
foreach and fused implementations), adaptive and normalization-layer-only perturbation, both
ways of returning to ``w``, steps skipped for non-finite gradients and GradScaler skips.
The Triton backend runs the same comparison in tests/test_triton_optimizers.py."""

import pytest
import torch

import msam_fused
from sam_plain_loop import compare_with_plain_loop

BACKENDS = ["reference", "cpu"]
BASES = {
    "sgd-momentum-wd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "sgd-nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "sgd-fused": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1, foreach=False)),
    "adamw-fused": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1, fused=True)),
}
# float64 AdamW amplifies rounding where gradients are tiny (docs/design.md, "Numerics"); the
# stream's gradients are of order one, where two float64 AdamW loops agree to ~1e-13.
BOUND = 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("restore", ["swap", "copy"])
def test_equals_the_plain_loop(backend, base, restore):
    cls, kwargs = BASES[base]
    assert compare_with_plain_loop(backend, cls, kwargs, restore=restore) <= BOUND


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd-momentum-wd", "adamw-fused"])
def test_adaptive_equals_the_plain_loop(backend, base):
    cls, kwargs = BASES[base]
    assert compare_with_plain_loop(backend, cls, kwargs, adaptive=True) <= BOUND


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd-momentum-wd", "sgd-fused", "adamw-fused"])
def test_grad_scaler_skips_equal_the_plain_loop(backend, base):
    cls, kwargs = BASES[base]
    assert compare_with_plain_loop(backend, cls, kwargs, scaler=True) <= BOUND


def test_swap_trades_storage_with_the_backup_and_back():
    p = torch.randn(5, dtype=torch.float64, requires_grad=True)
    sam = msam_fused.SAM([p], torch.optim.SGD, lr=0.1, backend="cpu")
    p.grad = torch.randn(5, dtype=torch.float64)
    w = p.detach().clone()
    storage_at_w = p.data_ptr()
    sam.first_step(zero_grad=True)
    assert p.data_ptr() != storage_at_w  # w + e went to the spare buffer, which p took
    p.grad = torch.randn(5, dtype=torch.float64)
    g2 = p.grad.clone()
    sam.second_step()
    assert p.data_ptr() == storage_at_w  # back to w by trading storage again, not a copy
    assert torch.equal(p.detach(), w.add(g2, alpha=-0.1))  # what SGD does from w


def test_views_are_copied_back_and_stay_views():
    flat = torch.randn(12, dtype=torch.float64)
    a, b = (torch.nn.Parameter(t) for t in flat.split(6))  # views into one buffer
    sam = msam_fused.SAM([a, b], torch.optim.SGD, lr=0.0, backend="cpu")
    w = flat.clone()
    for p in (a, b):
        p.grad = torch.randn(6, dtype=torch.float64)
    sam.first_step(zero_grad=True)
    for p in (a, b):
        p.grad = torch.zeros(6, dtype=torch.float64)
    sam.second_step()
    assert torch.equal(flat, w)  # exactly back, in the shared buffer
    assert a.data_ptr() == flat.data_ptr() and b.data_ptr() == flat.data_ptr() + 6 * 8


def test_unknown_restore_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown restore 'move'"):
        msam_fused.SAM([torch.zeros(2, requires_grad=True)], torch.optim.SGD, lr=0.1, restore="move")
