"""onnxgen's cache folder (``$ONNXGEN_CACHE``, default ``~/.cache/onnxgen``) and the models built
into it once (the embedded defaults)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXGEN_CACHE", Path.home() / ".cache" / "onnxgen"))


def build_once(recipe: str, build: Callable[[Path], Path]) -> Path:
    """``cache_dir() / recipe``, made when it holds no ``onnxgen.json`` yet by ``build(work)``, which
    returns the finished folder inside the scratch folder ``work``.  The folder is renamed into
    place at the end (atomic: a concurrent build of the same recipe just loses)."""
    target = cache_dir() / recipe
    if (target / "onnxgen.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{recipe}-") as work:
        built = build(Path(work))
        try:
            built.rename(target)
        except OSError:
            if not (target / "onnxgen.json").exists():
                raise
    return target
