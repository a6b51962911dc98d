#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install torch and msam-fused into it.
#
# - A python3 that already imports torch (the GPU machines ship their own) gives a venv with
#   --system-site-packages, so that torch is reused, never replaced.
# - Otherwise the CUDA build of torch is installed from pip (it compiles our CUDA code even
#   on a machine without a GPU).
# - The package is installed editable with --no-build-isolation, so the extension is built
#   against the torch it will run with.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "setup: reusing the torch of $("$PYTHON" -c 'import sys; print(sys.executable)')"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  pip_install $TORCH_SPEC
fi
"$PY" -c "import setuptools, wheel" >/dev/null 2>&1 || pip_install "setuptools>=64" wheel
# The test extra brings the trainer libraries (lightning, transformers, timm) the integration
# tests run with (docs/integrations.md).
echo "setup: building and installing msam-fused with its test dependencies"
pip_install --no-build-isolation -e ".[test]"
"$PY" -c "import msam_fused, torch; print('setup: msam_fused', msam_fused.__version__, 'torch', torch.__version__)"
