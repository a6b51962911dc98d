"""Where the CUDA toolkit is, and which GPU architectures to build for (setup.py, CMakeLists.txt).

``python tools/cuda_toolkit.py`` prints the toolkit's root, or nothing when there is none.

The root is ``CUDA_HOME`` (or ``CUDA_PATH``) when that holds a toolkit; otherwise the toolkit
of the ``nvcc`` on ``PATH``, following symlinks and wrapper scripts such as
``exec /usr/local/cuda-13.0/bin/nvcc "$@"`` to the real compiler (torch's own guess takes
``/usr/local`` for ``/usr/local/bin/nvcc``); otherwise ``/usr/local/cuda``.
"""

import os
import re
import shutil

DEFAULT_CUDA_ARCH = "9.0"  # without a visible GPU: enough to check that the CUDA code compiles


def is_toolkit(home):
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def real_nvcc(path):
    """The nvcc that ``path`` runs: itself, or the one a wrapper script execs."""
    path = os.path.realpath(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.startswith(b"#!"):
        return path
    for target in re.findall(rb"(/\S+/bin/nvcc)\b", head):
        target = os.path.realpath(target.decode())
        if os.path.isfile(target) and target != path:
            return real_nvcc(target)
    return path


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if is_toolkit(home):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(real_nvcc(nvcc)))
        if is_toolkit(home):
            return home
    return "/usr/local/cuda" if is_toolkit("/usr/local/cuda") else None


def default_arch_list():
    """The architectures of the visible GPUs, else DEFAULT_CUDA_ARCH."""
    import torch

    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return DEFAULT_CUDA_ARCH


if __name__ == "__main__":
    print(find_cuda_home() or "")
