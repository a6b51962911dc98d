"""Build script: the Python package plus the fused-kernel extension ``msam_fused._C``.

The extension holds the C++ CPU ops and, when a CUDA toolkit is found, the CUDA ops:

* ``CUDA_HOME`` (or ``CUDA_PATH``) names the toolkit; without it the toolkit is found from the
  ``nvcc`` on ``PATH``, following symlinks and wrapper scripts (see tools/cuda_toolkit.py).
* ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (e.g. ``"8.0;9.0"``). Without it: the
  architectures of the visible GPUs, or ``9.0`` when none is visible (enough to check that
  the CUDA code compiles, and quick).
* ``MSAM_FUSED_SKIP_CUDA_BUILD=1`` builds the CPU ops only; ``MSAM_FUSED_SKIP_EXTENSION=1``
  builds nothing (then only the ``reference`` and ``triton`` backends work).
"""

import glob
import os
import platform
import shutil
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
from cuda_toolkit import default_arch_list, find_cuda_home  # noqa: E402

# The CPU kernels built once more per x86-64 capability, each with its own flags (as ATen does);
# the library picks one at run time (csrc/cpu/ops.cpp).
CPU_CAPABILITY_SOURCES = {
    "csrc/cpu/kernels_avx2.cpp": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "csrc/cpu/kernels_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                                    "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def extension_modules():
    if os.environ.get("MSAM_FUSED_SKIP_EXTENSION") == "1":
        return []
    cuda_home = None if os.environ.get("MSAM_FUSED_SKIP_CUDA_BUILD") == "1" else find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list())
    from torch.utils import cpp_extension

    sources = sorted(set(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")) - set(CPU_CAPABILITY_SOURCES))
    # torch adds the C++ standard; -g0 drops the debug info Python's own flags ask for (a third of
    # the compile time, and most of the library's size)
    flags = {"cxx": ["-O3", "-g0", "-ffp-contract=off", "-Wno-unknown-pragmas"]}
    # at::parallel_for is OpenMP code in ATen's headers: without -fopenmp it runs on one thread.
    # The library then shares the libgomp that torch loaded.
    openmp = ["-fopenmp"] if platform.system() == "Linux" else []
    flags["cxx"] += openmp
    if not cuda_home:
        return [cpp_extension.CppExtension("msam_fused._C", sources, extra_compile_args=flags,
                                           extra_link_args=openmp)]
    cpp_extension.CUDA_HOME = cuda_home
    print(f"msam_fused: building the CUDA ops with {cuda_home} for "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    return [cpp_extension.CUDAExtension("msam_fused._C", sources, define_macros=[("MSAM_FUSED_WITH_CUDA", None)],
                                        extra_compile_args={**flags, "nvcc": ["-O3"]}, extra_link_args=openmp)]


def build_ext_class():
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}

    class BuildWithCpuCapabilities(BuildExtension):
        """Compiles each CPU_CAPABILITY_SOURCES file with its own flags, then links its object
        after all others: the linker keeps the first copy of an inline function, and that
        must be the one any CPU can run."""

        def build_extension(self, ext):
            x86 = platform.machine().lower() in ("x86_64", "amd64") and os.name != "nt"
            objects = []
            for source, isa_flags in CPU_CAPABILITY_SOURCES.items():
                objects += self.compiler.compile(
                    [source], output_dir=self.build_temp, macros=ext.define_macros,
                    include_dirs=ext.include_dirs, depends=ext.depends,
                    extra_postargs={"cxx": ext.extra_compile_args["cxx"] + (isa_flags if x86 else [])})
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    return {"build_ext": BuildWithCpuCapabilities.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules = extension_modules()  # first: it sets CUDA_HOME before torch's build code loads
setup(ext_modules=ext_modules, cmdclass=build_ext_class())
