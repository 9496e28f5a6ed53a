"""ONNX to ONNX rewrites."""

from .expand import expand
from .paged import paged

__all__ = ["expand", "paged"]
