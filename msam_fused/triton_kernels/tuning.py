"""Launch configurations: measured once per kernel variant and size on a GPU, fixed elsewhere.

``triton.autotune`` cannot be used: it times a kernel by running it several times on the
real arguments, and these kernels update the parameters and state in place through the
address table, which its ``restore_value`` cannot reach, so tuning would apply the step
several times. Instead each configuration runs on scratch tensors of the same dtypes (see
``ops.py``), and the fastest is kept for the process.

A configuration changes only how many rows a program loads at once (``UNROLL``) and the
warps per program; the numbers computed do not depend on it (see ``kernels.py``), so two
processes that pick differently still agree bit for bit.

``MSAM_TRITON_TUNE=0`` skips the measurement and uses ``DEFAULT``.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple


class Config(NamedTuple):
    unroll: int
    num_warps: int


DEFAULT = Config(unroll=2, num_warps=4)
# Under the interpreter one row per step, so that small test tensors take the unmasked path.
INTERPRETED = Config(unroll=1, num_warps=4)
CANDIDATES = [Config(u, w) for u in (1, 2, 4) for w in (4, 8)]
SCRATCH_LIMIT = 1 << 24  # elements: beyond this the timing per element no longer changes

_chosen: dict = {}


def size_class(numel: int) -> int:
    """Numels within a factor of two share a configuration."""
    return min(max(numel, 1), SCRATCH_LIMIT).bit_length()


def config(key: tuple, interpreted: bool, bench: Callable[[Config], None]) -> Config:
    """The configuration for ``key``; ``bench(cfg)`` runs the kernel once on scratch data."""
    if interpreted:
        return INTERPRETED
    if os.environ.get("MSAM_TRITON_TUNE", "1") == "0":
        return DEFAULT
    if key not in _chosen:
        from triton.testing import do_bench

        _chosen[key] = min(CANDIDATES, key=lambda cfg: do_bench(lambda: bench(cfg)))
    return _chosen[key]
