"""Shared pieces of the fused-kernel tests: devices, sample buckets, and the check that the
extension is there (a missing build fails these tests; MSAM_FUSED_SKIP_EXTENSION=1 skips them)."""

import os

import pytest
import torch

from msam_fused import fused_ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def require_extension():
    reason = fused_ops.unavailable_reason("cpu")
    if reason and os.environ.get("MSAM_FUSED_SKIP_EXTENSION") == "1":
        pytest.skip(f"built without the extension (MSAM_FUSED_SKIP_EXTENSION=1): {reason}")
    assert reason is None, reason


# Odd sizes: 0-d, one element, empty, sizes around vector widths (8, 16) and a size that
# spans several CPU segments (32768) and CUDA blocks (16384).
ODD_SHAPES = [(), (1,), (0,), (7,), (17, 3), (33,), (1025,), (70_001,)]


def bucket(shapes, dtype, device, *, seed=0, masters=False, missing=()):
    """A bucket of parameters with gradients (None at the indices in ``missing``), momenta in
    the state dtype, and (optionally) fp32 master copies of the weights."""
    gen = torch.Generator().manual_seed(seed)
    state_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype

    def randn(shape, dt):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dt, device=device)

    params = [randn(s, dtype) for s in shapes]
    grads = [None if i in missing else randn(s, dtype) for i, s in enumerate(shapes)]
    momenta = [randn(s, state_dtype) for s in shapes]
    master_list = [p.float() + 1e-3 * randn(p.shape, torch.float32) for p in params] if masters \
        else [None] * len(params)
    return params, grads, momenta, master_list


def clone(tensors):
    return [None if t is None else t.clone() for t in tensors]


def msam_sgd_hyper(device, lr=0.1, weight_decay=1e-3, momentum=0.9, rho=0.05):
    """MSAM-SGD's ``hyper`` vector (reference.MSAM_SGD_HYPER order)."""
    return torch.tensor([lr, weight_decay, momentum, rho], dtype=torch.float64, device=device)


def adamw_msam_hyper(device, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05, rho=0.05):
    """AdamW-MSAM's ``hyper`` vector (reference.ADAMW_MSAM_HYPER order)."""
    return torch.tensor([lr, beta1, beta2, eps, weight_decay, rho], dtype=torch.float64, device=device)
