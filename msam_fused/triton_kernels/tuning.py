"""Launch configurations: fixed unless ``tune`` measured them, and never measured inside a step.

``triton.autotune`` cannot be used: it times a kernel by running it several times on the
real arguments, and these kernels update the parameters and state in place through the
address table, which its ``restore_value`` cannot reach, so tuning would apply the step
several times. Timing inside a step would also synchronize the device (a stall mid-training)
and cannot run at all while a CUDA graph is being captured. So a step only looks its
configuration up: the one that :func:`msam_fused.triton_kernels.tune` chose for the kernel and
the parameters' dtype, when it was called, else ``DEFAULT``.

A configuration changes only how many rows a program loads at once (``UNROLL``) and the
warps per program; the numbers computed do not depend on it (see ``kernels.py``), so two
processes that pick differently still agree bit for bit.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class Config(NamedTuple):
    unroll: int
    num_warps: int


DEFAULT = Config(unroll=2, num_warps=4)
# Under the interpreter one row per step, so that small test tensors take the unmasked path.
INTERPRETED = Config(unroll=1, num_warps=4)
CANDIDATES = [Config(u, w) for u in (1, 2, 4) for w in (4, 8)]
SCRATCH_BYTES = 1 << 28  # all scratch operands of one timed op together: 256 MiB

_chosen: dict = {}  # (kernel name, parameter dtype) -> Config


def config(kernel_name: str, dtype: torch.dtype, interpreted: bool) -> Config:
    """The configuration a launch uses: a lookup, never a measurement."""
    if interpreted:
        return INTERPRETED
    return _chosen.get((kernel_name, dtype), DEFAULT)


def choose(kernel_name: str, dtype: torch.dtype, seconds: Callable[[], float]) -> Config:
    """Time every candidate (``seconds()`` runs the kernel's op on scratch data under the
    configuration now chosen) and keep the fastest."""
    timings = {}
    for cfg in CANDIDATES:
        _chosen[kernel_name, dtype] = cfg
        timings[cfg] = seconds()
    _chosen[kernel_name, dtype] = best = min(timings, key=timings.get)
    return best
