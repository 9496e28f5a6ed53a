"""onnx's ReferenceEvaluator taught the onnxgen.preview ops: the specification's truth."""

from __future__ import annotations

import onnx
from onnx.reference import ReferenceEvaluator

from ..ops import OPS


def evaluator(model: onnx.ModelProto | str, **kwargs) -> ReferenceEvaluator:
    """A ReferenceEvaluator that runs ``model`` (a ModelProto or a path), our ops included."""
    new_ops = list(kwargs.pop("new_ops", [])) + [op.reference for op in OPS.values()]
    return ReferenceEvaluator(model, new_ops=new_ops, **kwargs)
