"""msam-fused: Momentum-SAM and SAM optimizers with fused kernels.

Reading order: docs/design.md (the invariant, the step contract, the numerics) ->
``reference`` (the contract's literal definition) -> ``momentum_ascent`` / ``msam`` /
``adamw_msam`` / ``sam`` (the optimizers) -> ``backends`` (the typed contract, dispatch) ->
kernels (``fused_ops`` over ``csrc/``, ``triton_kernels``).
"""

from msam_fused.adamw_msam import AdamWMSAM
from msam_fused.backends import BackendUnavailableError, available_backends
from msam_fused.batchnorm import disable_running_stats
from msam_fused.msam import MSAM
from msam_fused.reference import EPS_NORM
from msam_fused.sam import SAM

__all__ = ["MSAM", "AdamWMSAM", "SAM", "disable_running_stats", "available_backends",
           "BackendUnavailableError", "EPS_NORM"]
__version__ = "0.1.0"
