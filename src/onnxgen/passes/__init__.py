"""ONNX to ONNX rewrites."""

from .expand import expand
from .fuse_attention import fuse_attention
from .fuse_moe import fuse_moe
from .paged import paged

__all__ = ["expand", "fuse_attention", "fuse_moe", "paged"]
