"""ONNX to ONNX rewrites."""

from .expand import expand

__all__ = ["expand"]
