"""The CUDA step kernels compiled for sm_90 without a GPU (csrc/tests/step_kernels_ptx.cu, with
the flags torch's extension build uses): what they load and store, the arithmetic they use,
and their registers. See the launch-shape comment of csrc/cuda/step_kernels.cuh and
docs/kernels.md for why these matter."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "tests" / "step_kernels_ptx.cu"
sys.path.insert(0, str(ROOT / "tools"))
from cuda_toolkit import find_cuda_home  # noqa: E402

pytestmark = pytest.mark.slow

# The kernels step_kernels_ptx.cu instantiates, by a part of their mangled names.
SGD_PARTIALS_F32 = "msam_sgd_kernelILNS_4PassE0EfE"
SGD_STEP_F32 = "msam_sgd_kernelILNS_4PassE1EfE"
SGD_STEP_BF16 = "msam_sgd_kernelILNS_4PassE1EN3c108BFloat16E"
ADAMW_STEP_F32 = "adamw_msam_kernelILNS_4PassE1EfE"
ADAMW_STEP_BF16 = "adamw_msam_kernelILNS_4PassE1EN3c108BFloat16E"
STEP_KERNELS = [SGD_PARTIALS_F32, SGD_STEP_F32, SGD_STEP_BF16, ADAMW_STEP_F32, ADAMW_STEP_BF16]


def nvcc_command(*args):
    home = find_cuda_home()
    if not home:
        pytest.skip("no CUDA toolkit found (tools/cuda_toolkit.py: CUDA_HOME, CUDA_PATH or nvcc on PATH)")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    return [os.path.join(home, "bin", "nvcc"), "-std=c++17", "-arch=sm_90", "-O3", *COMMON_NVCC_FLAGS,
            *(f"-I{p}" for p in include_paths()), str(SOURCE), *args]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """Kernel name -> its PTX body."""
    out = tmp_path_factory.mktemp("ptx") / "step_kernels.ptx"
    subprocess.run(nvcc_command("-ptx", "-o", str(out)), check=True, capture_output=True, text=True, timeout=900)
    pieces = re.split(r"\.entry\s+(\S+)\(", out.read_text())
    return {name: text.split("\n}\n")[0] for name, text in zip(pieces[1::2], pieces[2::2])}


def body(kernels, part):
    [name] = [n for n in kernels if part in n]
    return kernels[name]


def count(text, pattern):
    return len(re.findall(pattern, text))


def test_step_kernels_load_and_store_128_bits(kernels):
    # float32 MSAM-SGD step: params, momenta, masters coherent (read and written), gradients
    # through the read-only path; every write a 128-bit store.
    sgd = body(kernels, SGD_STEP_F32)
    assert count(sgd, r"ld\.global\.v4\.u32") >= 3 and count(sgd, r"ld\.global\.nc\.v4\.u32") >= 1
    assert count(sgd, r"st\.global\.v4\.u32") >= 3
    # bfloat16: a pack of 8 is one 128-bit word of params/gradients, two of float32 state
    bf16 = body(kernels, SGD_STEP_BF16)
    assert count(bf16, r"ld\.global\.nc\.v4\.u32") >= 1 and count(bf16, r"st\.global\.v4\.u32") >= 4
    for adamw in (body(kernels, ADAMW_STEP_F32), body(kernels, ADAMW_STEP_BF16)):
        assert count(adamw, r"ld\.global\.nc\.v4\.u32") >= 1  # the gradients
        assert count(adamw, r"ld\.global\.v4\.u32") >= 4 and count(adamw, r"st\.global\.v4\.u32") >= 4
    partials = body(kernels, SGD_PARTIALS_F32)
    assert count(partials, r"ld\.global\.nc\.v4\.u32") >= 1 and count(partials, r"st\.global\.v4") == 0


@pytest.mark.parametrize("kernel", STEP_KERNELS)
def test_step_kernels_use_ieee_division_and_sqrt(kernels, kernel):
    text = body(kernels, kernel)
    assert count(text, r"\b(div|sqrt|rcp|rsqrt)\.(approx|full)") == 0
    assert count(text, r"div\.rn\.f32") > 0 or kernel == SGD_PARTIALS_F32


def test_step_kernels_do_not_spill(tmp_path):
    """Registers per thread decide how many 512-thread blocks an SM holds; spills would put
    the packs in local memory."""
    result = subprocess.run(nvcc_command("-cubin", "--resource-usage", "-o", str(tmp_path / "k.cubin")),
                            check=True, capture_output=True, text=True, timeout=900)
    usage = re.findall(r"Function properties for (\S+)\n\s*\d+ bytes stack frame, (\d+) bytes spill stores.*\n"
                       r".*Used (\d+) registers", result.stdout + result.stderr)
    by_kernel = {name: (int(spills), int(registers)) for name, spills, registers in usage}
    for part in STEP_KERNELS:
        [(spills, registers)] = [v for n, v in by_kernel.items() if part in n]
        assert spills == 0 and registers <= 128, (part, spills, registers)
