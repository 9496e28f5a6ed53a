"""Builds onnxgen's onnxruntime custom-op library (C++17) as part of the package build.

The library is not a Python module: onnxruntime loads it with register_custom_ops_library.
It needs onnxruntime's C/C++ API headers, fetched at build time by tools/ort_headers.py (or
pointed to by ONNXGEN_ORT_INCLUDE).  Where they cannot be had, the package still installs
without the library (onnxgen.backends.ort then falls back to the expansion pass) unless
ONNXGEN_REQUIRE_KERNELS=1.  ONNXGEN_SANITIZE=address builds it with AddressSanitizer.
"""

import os
import sys
from glob import glob
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "tools"))


class BuildKernels(build_ext):
    def build_extension(self, ext):
        from ort_headers import headers

        try:
            ext.include_dirs.append(str(headers(HERE / "build")))  # cached across rebuilds
        except Exception as error:  # no apt, no network, bad checksum...
            if os.environ.get("ONNXGEN_REQUIRE_KERNELS") == "1":
                raise
            print(f"warning: onnxgen kernels not built ({error}); the expansion pass will be used", file=sys.stderr)
            return
        super().build_extension(ext)

    def get_ext_filename(self, ext_name):
        # A plain shared library name: it is loaded by onnxruntime, never imported by Python.
        return os.path.join(*ext_name.split(".")) + ".so"

    def get_export_symbols(self, ext):
        return ["RegisterCustomOps"]


flags = ["-std=c++17", "-O3", "-march=x86-64-v3", "-fvisibility=hidden", "-fno-math-errno", "-Wall", "-Wno-unused-function",
         "-Wno-maybe-uninitialized", "-Wno-uninitialized"]  # GCC 12 false positives inside AVX-512 intrinsics
link = []
if os.environ.get("ONNXGEN_SANITIZE") == "address":
    flags = [f for f in flags if f != "-O3"] + ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
    link = ["-fsanitize=address"]

setup(
    ext_modules=[
        Extension(
            "onnxgen.kernels.libonnxgen_kernels",
            sources=sorted(glob("src/onnxgen/kernels/csrc/*.cc")),
            depends=sorted(glob("src/onnxgen/kernels/csrc/*.h")),
            include_dirs=["src/onnxgen/kernels/csrc"],
            language="c++",
            extra_compile_args=flags,
            extra_link_args=link,
        )
    ],
    cmdclass={"build_ext": BuildKernels},
)
