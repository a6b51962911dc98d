"""Where the Triton tests run: compiled on a CUDA GPU, or on CPU tensors under the interpreter.

Without a GPU the interpreter must be switched on before triton is imported, so CI runs
``test_triton_ops.py`` and ``test_triton_optimizers.py`` in a subprocess with
``TRITON_INTERPRET=1`` (``test_triton_interpreter.py``); in the main pytest process importing
this module skips the test module that imports it.
"""

import pytest
import torch

triton_kernels = pytest.importorskip("msam_fused.triton_kernels", reason="needs triton")

DEVICE = "cuda" if torch.cuda.is_available() and not triton_kernels.ops.INTERPRETED else "cpu"
REASON = triton_kernels.unavailable_reason(DEVICE)
INTERPRETED = triton_kernels.ops.INTERPRETED

if REASON is not None:
    pytest.skip(f"{REASON}; without a GPU these tests run under the interpreter in "
                "tests/test_triton_interpreter.py", allow_module_level=True)
MARKS = [pytest.mark.gpu] if DEVICE == "cuda" else []
