"""CI's way to the Triton tests without a GPU: run them under the Triton interpreter.

The interpreter is chosen when triton is imported, so it cannot be switched on inside this
pytest process (other tests may already have imported triton, and compiled tests on a GPU
must not be interpreted). This test runs the Triton test files in a fresh pytest with
``TRITON_INTERPRET=1`` and fails with their output if any of them fails. It passes on the
outer ``-m`` expression, so ``pytest -m "not slow"`` skips the slow ones there too.
"""

import os
import subprocess
import sys

import pytest

import msam_fused

pytest.importorskip("triton", reason="the triton backend needs triton")

# The Triton files, and the Triton cases of the tensor hyper-parameter test (``-k triton``
# selects every test of the Triton files by their module names).
FILES = ["test_triton_ops.py", "test_triton_optimizers.py",
         "test_tensor_hyperparameters.py::test_tensor_lr_and_rho_follow_the_float_trajectory"]
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(msam_fused.__file__)))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already interpreted")
def test_triton_suite_passes_under_the_interpreter(request):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           *[os.path.join(HERE, f) for f in FILES], "-k", "triton"]
    markexpr = request.config.getoption("markexpr")
    if markexpr:
        cmd += ["-m", markexpr]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    print(f"interpreted Triton tests: {summary}")
    if proc.returncode == 5:  # the -m expression selected none of them
        pytest.skip(f"no interpreted Triton test matches -m {markexpr!r}")
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-12000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in summary, proc.stdout[-6000:]
