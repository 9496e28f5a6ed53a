"""onnxgen's CPU kernels: a C++ onnxruntime custom-op library built with the package.

It registers ``onnxgen.preview.PagedAttention``, ``MoE`` and ``GroupedMatMul`` for the CPU
execution provider.  Plain onnxruntime can use it::

    options = onnxruntime.SessionOptions()
    options.register_custom_ops_library(onnxgen.kernels.library_path())
"""

from __future__ import annotations

import os
from pathlib import Path

LIBRARY_NAME = "libonnxgen_kernels.so"


def library_path() -> str | None:
    """Path of the built kernel library, or None when the build had to skip it.

    ``ONNXGEN_KERNELS_LIBRARY`` points at another build (an AddressSanitizer one, say).
    """
    override = os.environ.get("ONNXGEN_KERNELS_LIBRARY")
    if override:
        return override if Path(override).exists() else None
    path = Path(__file__).with_name(LIBRARY_NAME)
    return str(path) if path.exists() else None


def has_amx() -> bool:
    """Whether the CPU has AMX tiles with bf16 (the kernels then run bf16 GEMMs on them).

    ``ONNXGEN_NO_AMX=1`` says no, as it turns the library's AMX path off.
    """
    if os.environ.get("ONNXGEN_NO_AMX", "0") not in ("", "0") or os.environ.get("ONNXGEN_NO_AVX512", "0") not in ("", "0"):
        return False
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return {"amx_tile", "amx_bf16", "avx512f"} <= set(flags.split())
