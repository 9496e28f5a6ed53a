"""Small helpers for declaring schemas: formal parameters, attributes, type-inference utilities.

onnx's Python bindings register a schema (``onnx.defs.register_schema``) and accept a Python
type-and-shape inference function; an exception raised there surfaces from both
``onnx.checker.check_model(full_check=True)`` and ``onnx.shape_inference.infer_shapes``.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import defs
from onnx.shape_inference import InferenceError

Schema = defs.OpSchema
FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def param(name: str, type_str: str, doc: str, optional: bool = False) -> Schema.FormalParameter:
    option = Schema.FormalParameterOption.Optional if optional else Schema.FormalParameterOption.Single
    return Schema.FormalParameter(name, type_str, doc, param_option=option)


def attr(name: str, default: int | float | str | None, doc: str, attr_type=None) -> Schema.Attribute:
    """An attribute with a default (or required when ``default`` is None and no type is given)."""
    if default is None:
        return Schema.Attribute(name, attr_type or Schema.AttrType.INT, doc, required=attr_type is None)
    return Schema.Attribute(name, onnx.helper.make_attribute(name, default), doc)


def graph_attr(name: str, doc: str) -> Schema.Attribute:
    return Schema.Attribute(name, Schema.AttrType.GRAPH, doc, required=False)


def register(schema: Schema, infer: Callable) -> None:
    """Register ``schema`` once; a schema already known under that name, domain and version wins."""
    if defs.has(schema.name, schema.since_version, schema.domain):
        existing = defs.get_schema(schema.name, schema.since_version, schema.domain)
        if existing.since_version == schema.since_version:
            return
    schema.set_type_and_shape_inference_function(infer)
    defs.register_schema(schema)


# ---- inference-context helpers -------------------------------------------------------------

class Inference:
    """Read-only view of an inference context with the checks every op needs."""

    def __init__(self, ctx, op: str):
        self.ctx, self.op = ctx, op

    def fail(self, message: str):
        raise InferenceError(f"[onnxgen] {self.op}: {message}")

    def has(self, index: int) -> bool:
        return index < self.ctx.get_num_inputs() and self.ctx.has_input(index)

    def elem_type(self, index: int) -> int:
        t = self.ctx.get_input_type(index)
        return t.tensor_type.elem_type if t is not None else 0

    def dims(self, index: int) -> list[int | str | None] | None:
        """Input dims: an int when static, a str for a symbol, None when unknown; None if no rank."""
        t = self.ctx.get_input_type(index)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        out = []
        for d in t.tensor_type.shape.dim:
            out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        return out

    def rank(self, index: int, expected: int, name: str) -> list | None:
        dims = self.dims(index)
        if dims is not None and len(dims) != expected:
            self.fail(f"input {name!r} must have rank {expected}, got shape {dims}")
        return dims

    def attr(self, name: str, default=None):
        a = self.ctx.get_attribute(name)
        if a is None:
            return default
        return onnx.helper.get_attribute_value(a)

    def set_output(self, index: int, elem_type: int, dims: list | None) -> None:
        if index >= self.ctx.get_num_outputs() or not self.ctx.has_output(index):
            return
        t = onnx.helper.make_tensor_type_proto(elem_type, None)
        if dims is not None:
            t = onnx.helper.make_tensor_type_proto(elem_type, [d if d is not None else None for d in dims])
        self.ctx.set_output_type(index, t)


def static(d) -> bool:
    return isinstance(d, int) and d > 0
