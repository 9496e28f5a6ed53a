"""bf16_linear: linear layers with bf16 weights -> onnxgen's GroupedMatMul kernel (AMX tiles).

A model exported with ``--dtype bfloat16`` computes each linear layer as
``MatMul(X, Cast(W_bf16, to=FLOAT))``; onnxruntime folds the Cast at load, so the layer runs
as an fp32 GEMM over weights twice the size (MLAS has no bf16 GEMM on x86).  On a CPU with
AMX this pass rewrites such a layer, with ``X`` of rank 2 and ``W`` a 2-D bf16 initializer, into

    Cast(X, bf16) -> GroupedMatMul(x, W[1, K, N], zeros[M, 1]) -> Squeeze(1) -> Cast(FLOAT)

which the kernel library runs on the tile unit: products of bf16 values summed in fp32, the
weights read in their stored width.  It is bf16 *compute*: the activations entering each
linear layer are rounded to bf16 (as OpenVINO's bf16 inference precision does); the layer's
output is rounded to bf16 too, since GroupedMatMul's output has its input's type.

The all-zero group indices are built once per distinct row count (a ``ConstantOfShape`` of the
rows of ``X``; layers reading the same ``X``, or ``X`` of the same symbolic first dimension,
share them).  Nothing else changes.  A session-time rewrite: ``onnxgen.backends.ort.session``
runs it when the CPU has AMX and ``bf16_compute`` is not turned off.
"""

from __future__ import annotations

import warnings

import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ops.domain import DOMAIN


def bf16_linear(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose bf16-weight linear layers run on GroupedMatMul (see the module doc)."""
    bf16_initializers = {t.name for t in model.graph.initializer if t.data_type == TensorProto.BFLOAT16}
    widened = {n.output[0] for n in model.graph.node if n.op_type == "Cast" and n.input[0] in bf16_initializers}
    if not any(n.op_type == "MatMul" and n.input[1] in widened for n in model.graph.node):
        return model  # nothing to do: no shape inference (it costs seconds on large models)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as error:  # a node private to a session-time rewrite may refuse inference
        warnings.warn(f"bf16_linear: shape inference failed ({error}); linear layers stay fp32", stacklevel=2)
        return model
    types = {v.name: v.type.tensor_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1

    def bf16_weight(name: str) -> onnx.TensorProto | None:
        cast = producer.get(name)
        if cast is None or cast.op_type != "Cast" or helper.get_attribute_value(cast.attribute[0]) != TensorProto.FLOAT:
            return None
        weight = initializers.get(cast.input[0])
        if weight is None or weight.data_type != TensorProto.BFLOAT16 or len(weight.dims) != 2:
            return None
        return weight

    def rank2(name: str) -> bool:
        t = types.get(name)
        return t is not None and t.HasField("shape") and len(t.shape.dim) == 2

    nodes, new_initializers, zeros_for, dropped_casts, count = [], [], {}, set(), 0

    def group_indices(x: str) -> str:
        dim = types[x].shape.dim[0]
        key = ("param", dim.dim_param) if dim.dim_param else ("value", dim.dim_value) if dim.dim_value else ("x", x)
        if key not in zeros_for:
            stem = f"bf16_linear/rows_{len(zeros_for)}"
            rows = helper.make_node("Shape", [x], [f"{stem}/rows"], start=0, end=1)
            shape = helper.make_node("Concat", [f"{stem}/rows", "bf16_linear/one"], [f"{stem}/shape"], axis=0)
            zeros = helper.make_node("ConstantOfShape", [f"{stem}/shape"], [f"{stem}/zeros"],
                                     value=helper.make_tensor("", TensorProto.INT64, [1], [0]))
            nodes.extend([rows, shape, zeros])
            zeros_for[key] = f"{stem}/zeros"
        return zeros_for[key]

    for node in graph.node:
        weight = bf16_weight(node.input[1]) if node.op_type == "MatMul" and node.domain == "" else None
        if weight is None or not rank2(node.input[0]):
            nodes.append(node)
            continue
        x, stem = node.input[0], f"bf16_linear/{node.name or node.output[0]}"
        grouped = helper.make_tensor(f"{stem}/weights", TensorProto.BFLOAT16, [1, *weight.dims], weight.raw_data,
                                     raw=True) if weight.HasField("raw_data") else _unsqueezed(weight, f"{stem}/weights")
        new_initializers.append(grouped)
        nodes.extend([
            helper.make_node("Cast", [x], [f"{stem}/x"], to=TensorProto.BFLOAT16),
            helper.make_node("GroupedMatMul", [f"{stem}/x", grouped.name, group_indices(x)], [f"{stem}/y3"],
                             domain=DOMAIN, name=f"{stem}/GroupedMatMul"),
            helper.make_node("Squeeze", [f"{stem}/y3", "bf16_linear/one"], [f"{stem}/y"]),
            helper.make_node("Cast", [f"{stem}/y"], [node.output[0]], to=TensorProto.FLOAT),
        ])
        consumers[node.input[1]] -= 1
        if consumers[node.input[1]] == 0:
            dropped_casts.add(node.input[1])
        count += 1
    if not count:
        return model
    # The Casts that fed only rewritten layers go, and with them their fp32 copies of the weights.
    nodes = [n for n in nodes if not (n.op_type == "Cast" and n.output[0] in dropped_casts)]
    still_read = {name for n in nodes for name in n.input}
    kept = [t for t in graph.initializer if t.name in still_read or t.name in {i.name for i in graph.input}]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_initializers + [numpy_helper.from_array(_one(), "bf16_linear/one")])
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return out


def _one():
    import numpy as np

    return np.array([1], np.int64)


def _unsqueezed(weight: onnx.TensorProto, name: str) -> onnx.TensorProto:
    tensor = onnx.TensorProto()
    tensor.CopyFrom(weight)
    tensor.name = name
    tensor.dims[:] = [1, *weight.dims]
    return tensor
