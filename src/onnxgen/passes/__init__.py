"""ONNX to ONNX rewrites."""

from .expand import expand
from .fuse_moe import fuse_moe
from .paged import paged

__all__ = ["expand", "fuse_moe", "paged"]
