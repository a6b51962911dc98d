"""Lists of tensors (e.g. all parameters of a model) seen as one vector, on the device."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from msam_fused import reference


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """The inner product of two lists of tensors, as a 0-d tensor on the first tensor's device:
    float64 when any tensor of ``a`` is float64, else float32 (whatever the storage dtype)."""
    dtype = reference.norm_dtype(t.dtype for t in a)
    device = a[0].device if len(a) else torch.device("cpu")
    total = torch.zeros((), dtype=dtype, device=device)
    for x, y in zip(a, b):
        total = total + (x.to(dtype) * y.to(dtype)).sum().to(device)
    return total


def norm(a: Sequence[Tensor]) -> Tensor:
    """The L2 norm of a list of tensors as one vector (see :func:`dot`)."""
    return torch.sqrt(dot(a, a))
