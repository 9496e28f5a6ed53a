"""Pointwise score graphs: PagedAttention's ``score_mod`` (the paged form of FlexAttention).

A score graph maps ``(score float32, batch int32, head int32, q_pos int32, kv_pos int32)`` to
one float32 score, with elementwise (broadcasting) ops only, so it can be evaluated on scalars,
on broadcast tensors (the reference, the function body) or over a vector of kv positions
(the compiled kernel).  This module checks that contract, evaluates a graph in numpy and
inlines it into a function body; ``onnxgen.passes.compile_score_mod`` compiles it for the
kernel.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_NAMES = ("score", "batch", "head", "q_pos", "kv_pos")
INPUT_TYPES = (TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT32, TensorProto.INT32, TensorProto.INT32)

# Elementwise ops (with numpy-style broadcasting) that a score graph may use.  Gather is
# elementwise when it reads a constant 1-D table at computed indices.
POINTWISE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Pow",
    "Floor", "Ceil", "Round", "Sign", "Sigmoid", "Relu", "Softplus", "Erf", "Sin", "Cos", "Mod",
    "Where", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "And", "Or", "Not", "Xor",
    "Min", "Max", "Clip", "Cast", "CastLike", "Constant", "Identity", "Gather", "IsInf", "IsNaN",
})


class ScoreModError(ValueError):
    """A score graph that breaks the contract (arity, types, a non-pointwise op, its shape)."""


def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()


def constant_arrays(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every value of the graph known before it runs: initializers and Constant outputs."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attribute[0]
            if attr.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
                dtype = np.float32 if "float" in attr.name else np.int64
                values[node.output[0]] = np.asarray(helper.get_attribute_value(attr), dtype=dtype)
            else:
                raise ScoreModError(f"Constant {node.name or node.output[0]!r} with attribute {attr.name!r}")
    return values


def check(graph: onnx.GraphProto, where: str = "PagedAttention", opset: int = 25) -> None:
    """Raise ScoreModError, naming ``where`` and the offending op, unless ``graph`` is a valid
    pointwise score graph."""
    def fail(message):
        raise ScoreModError(f"{where}: score_mod {message}")

    if not isinstance(graph, onnx.GraphProto):
        fail(f"must be a graph, got {type(graph).__name__}")
    if len(graph.input) != 5 or len(graph.output) != 1:
        fail(f"must take 5 inputs {INPUT_NAMES} and return 1 score; it takes {len(graph.input)} and returns "
             f"{len(graph.output)}")
    for index, (value, want, name) in enumerate(zip(graph.input, INPUT_TYPES, INPUT_NAMES)):
        got = value.type.tensor_type.elem_type
        if got != want:
            fail(f"input {index} ({name}, {value.name!r}) must be "
                 f"{_type_name(want)}, got {_type_name(got) if got else 'no type'}")
    out_type = graph.output[0].type.tensor_type.elem_type
    if out_type not in (0, TensorProto.FLOAT):
        fail(f"output {graph.output[0].name!r} must be float, got {_type_name(out_type)}")
    for value in list(graph.input) + list(graph.output):
        shape = value.type.tensor_type.shape if value.type.tensor_type.HasField("shape") else None
        if shape is not None and any(d.HasField("dim_value") and d.dim_value != 1 for d in shape.dim):
            fail(f"value {value.name!r} has shape {[d.dim_value or d.dim_param for d in shape.dim]}: the inputs and "
                 "the output of a score graph are scalars (one score per query/key pair)")
    constants = constant_arrays(graph)
    gather_tables = set()
    for node in graph.node:
        label = f"{node.op_type} node {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            fail(f"uses {node.domain}.{node.op_type} ({label}): only standard pointwise ops are allowed")
        if node.op_type not in POINTWISE_OPS:
            fail(f"uses {node.op_type} ({label}), which is not pointwise: a score graph may only use "
                 f"elementwise ops ({', '.join(sorted(POINTWISE_OPS))})")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            fail(f"{label} has a subgraph")
        if node.op_type == "Gather":
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            table = constants.get(node.input[0])
            if table is None or table.ndim != 1 or axis != 0:
                fail(f"{label} must read a constant 1-D table (axis 0) at computed indices; flatten a "
                     "2-D table and index it with row * width + column")
            if node.input[1] in constants:
                fail(f"{label} has constant indices; use a constant instead")
            gather_tables.add(node.input[0])
    for name, array in constants.items():
        used = [n for n in graph.node if name in n.input]
        if array.size != 1 and any(n.op_type != "Gather" or n.input[0] != name for n in used):
            fail(f"constant {name!r} has shape {list(array.shape)}: constants of a score graph are scalars "
                 "(tables are read with Gather)")
    # Types and shapes through onnx's own inference: scalar inputs must give a scalar score.
    inputs = [helper.make_tensor_value_info(v.name, t, []) for v, t in zip(graph.input, INPUT_TYPES)]
    wrapper = helper.make_graph(list(graph.node), "score_mod", inputs,
                                [helper.make_tensor_value_info(graph.output[0].name, 0, None)],
                                initializer=list(graph.initializer))
    model = helper.make_model(wrapper, opset_imports=[helper.make_opsetid("", opset)])
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as error:  # InferenceError: a type mismatch, say
        message = str(error).replace("\n", " ")
        fail(f"does not type-check: {message}")
    out = model.graph.output[0].type.tensor_type
    if out.elem_type not in (0, TensorProto.FLOAT):
        fail(f"computes a {_type_name(out.elem_type)} score; it must be float")
    if out.HasField("shape") and any(not d.HasField("dim_value") or d.dim_value != 1 for d in out.shape.dim):
        dims = [d.dim_value or d.dim_param or "?" for d in out.shape.dim]
        fail(f"output has shape {dims} for scalar inputs; it must be one score per (score, batch, head, q_pos, "
             "kv_pos)")


@functools.lru_cache(maxsize=64)
def _evaluator(serialized: bytes, opset: int):
    from onnx.reference import ReferenceEvaluator

    graph = onnx.GraphProto()
    graph.ParseFromString(serialized)
    return ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def evaluate(graph: onnx.GraphProto, score, batch, head, q_pos, kv_pos, opset: int = 25) -> np.ndarray:
    """Run ``graph`` on broadcastable arrays (onnx's reference evaluator); returns float32 of the
    broadcast shape of all inputs."""
    args = [np.asarray(score, np.float32)] + [np.asarray(x, np.int32) for x in (batch, head, q_pos, kv_pos)]
    shape = np.broadcast_shapes(*(a.shape for a in args))
    feeds = {v.name: a for v, a in zip(graph.input, args)}
    (out,) = _evaluator(graph.SerializeToString(), opset).run(None, feeds)
    return np.broadcast_to(np.asarray(out, np.float32), shape)


def inline(op, graph: onnx.GraphProto, inputs) -> "object":
    """Record ``graph``'s nodes on a function body's tape (``op``), fed by ``inputs`` (five
    ir.Values: score, batch, head, q_pos, kv_pos); returns the score value."""
    import onnx_ir as ir

    values = dict(zip((v.name for v in graph.input), inputs))
    for name, array in ((t.name, numpy_helper.to_array(t)) for t in graph.initializer):
        if name not in values:
            values[name] = op.const(array)
    inner = ir.serde.deserialize_graph(graph)
    for node in inner:
        args = [values[v.name] if v is not None else None for v in node.inputs]
        attributes = {k: ir.Attr(k, a.type, a.value) for k, a in node.attributes.items()}
        outputs = op.tape.op_multi_out(node.op_type, args, attributes, num_outputs=len(node.outputs),
                                       domain=node.domain)
        for value, out in zip(node.outputs, outputs):
            values[value.name] = out
    return values[graph.output[0].name]
