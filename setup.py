"""Build script: the Python package plus the fused-kernel extension ``msam_fused._C``.

The extension holds the C++ CPU ops and, when a CUDA toolkit is found, the CUDA ops:

* ``CUDA_HOME`` (or ``CUDA_PATH``) names the toolkit; without it the toolkit is found from the
  ``nvcc`` on ``PATH``, following symlinks and wrapper scripts (``exec /opt/cuda/bin/nvcc "$@"``)
  to the real compiler. torch's own guess takes ``/usr/local`` for ``/usr/local/bin/nvcc``.
* ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (e.g. ``"8.0;9.0"``). Without it: the
  architectures of the visible GPUs, or ``9.0`` when none is visible (enough to check that
  the CUDA code compiles, and quick).
* ``MSAM_FUSED_SKIP_CUDA_BUILD=1`` builds the CPU ops only; ``MSAM_FUSED_SKIP_EXTENSION=1``
  builds nothing (then only the ``reference`` and ``triton`` backends work).
"""

import glob
import os
import re
import shutil

from setuptools import setup

DEFAULT_CUDA_ARCH = "9.0"


def _is_toolkit(home):
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _nvcc_behind(path):
    """The real nvcc that ``path`` runs: itself, or the one a wrapper script execs."""
    path = os.path.realpath(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.startswith(b"#!"):
        return path
    for target in re.findall(rb"(/\S+/bin/nvcc)\b", head):
        target = os.path.realpath(target.decode())
        if os.path.isfile(target) and target != path:
            return _nvcc_behind(target)
    return path


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if _is_toolkit(home):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(_nvcc_behind(nvcc)))
        if _is_toolkit(home):
            return home
    return "/usr/local/cuda" if _is_toolkit("/usr/local/cuda") else None


def default_arch_list():
    import torch

    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return DEFAULT_CUDA_ARCH


def extension_modules():
    if os.environ.get("MSAM_FUSED_SKIP_EXTENSION") == "1":
        return []
    cuda_home = None if os.environ.get("MSAM_FUSED_SKIP_CUDA_BUILD") == "1" else find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list())
    from torch.utils import cpp_extension

    # Files compiled for a wider CPU target come last: the linker keeps the first copy of an
    # inline function, which must be the one any CPU runs (see csrc/cpu/target_region.h).
    wide = ["csrc/cpu/kernels_avx2.cpp", "csrc/cpu/kernels_avx512.cpp"]
    sources = sorted(set(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")) - set(wide)) + wide
    cxx_flags = ["-O3", "-ffp-contract=off", "-Wno-unknown-pragmas"]  # torch adds the C++ standard it needs
    if not cuda_home:
        return [cpp_extension.CppExtension("msam_fused._C", sources, extra_compile_args={"cxx": cxx_flags})]
    cpp_extension.CUDA_HOME = cuda_home
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    print(f"msam_fused: building the CUDA ops with {cuda_home} for "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return [cpp_extension.CUDAExtension(
        "msam_fused._C", sources,
        define_macros=[("MSAM_FUSED_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]})]


def build_ext_class():
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}
    return {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules = extension_modules()  # first: it sets CUDA_HOME before torch's build code loads
setup(ext_modules=ext_modules, cmdclass=build_ext_class())
