"""Helpers to build and run one-node models: tests, docs examples and the demo use them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .ops.domain import DOMAIN, DOMAIN_VERSION

DEFAULT_OPSET = 25


def single_node_model(
    op_type: str,
    inputs: Mapping[str, np.ndarray | None],
    outputs: Sequence[str],
    domain: str = DOMAIN,
    opset: int = DEFAULT_OPSET,
    **attributes,
) -> onnx.ModelProto:
    """A model with one node whose graph inputs are typed (rank and dtype) from sample arrays.

    A ``None`` sample leaves that optional input out of the node.  Output types are left to
    shape inference.
    """
    names = [name if array is not None else "" for name, array in inputs.items()]
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node(op_type, names, list(outputs), domain=domain, **attributes)
    graph_inputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), [None] * array.ndim)
        for name, array in inputs.items()
        if array is not None
    ]
    graph_outputs = [helper.make_value_info(name, onnx.TypeProto()) for name in outputs if name]
    graph = helper.make_graph([node], op_type, graph_inputs, graph_outputs)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(domain, DOMAIN_VERSION if domain == DOMAIN else 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model


def feeds(inputs: Mapping[str, np.ndarray | None]) -> dict[str, np.ndarray]:
    return {name: array for name, array in inputs.items() if array is not None}


def run_reference(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray | None]) -> list[np.ndarray]:
    from .backends.reference import evaluator

    return evaluator(model).run(None, feeds(inputs))


def run_expanded_on_ort(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray | None]) -> list[np.ndarray]:
    """Expand ``model`` into standard ops and run it on a stock onnxruntime CPU session.

    onnxruntime's Python API has no numpy type for bfloat16: bf16 inputs are fed as OrtValues
    over their bits, and bf16 outputs are cast to float32 inside the graph (exact) and back.
    """
    from .backends.ort import ort_value
    from .passes import expand

    expanded = expand(model)
    bf16_outputs = cast_bf16_outputs_to_float(expanded)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(expanded.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = {name: ort_value(array) for name, array in feeds(inputs).items()}
    results = [v.numpy() for v in session.run_with_ort_values(None, values)]
    return [r.astype(ml_dtypes.bfloat16) if i in bf16_outputs else r for i, r in enumerate(results)]


def cast_bf16_outputs_to_float(model: onnx.ModelProto) -> set[int]:
    cast = set()
    for i, output in enumerate(model.graph.output):
        if output.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            inner = output.name + "_bf16"
            for node in model.graph.node:
                node.output[:] = [inner if o == output.name else o for o in node.output]
            model.graph.node.append(helper.make_node("Cast", [inner], [output.name], to=TensorProto.FLOAT))
            output.type.tensor_type.elem_type = TensorProto.FLOAT
            cast.add(i)
    return cast


def flex_stack_model(score_mod: onnx.GraphProto | None, *, layers: int = 2, hidden: int = 32, heads: int = 4,
                     kv_heads: int | None = None, seed: int = 0, scale: float = 0.02) -> onnx.ModelProto:
    """A stack of ``layers`` attention layers on ``ai.onnx.preview.FlexAttention``, random weights:
    ``x [B, L, hidden]`` -> per layer ``x + Wo·FlexAttention(q, k, v)`` with ``q/k/v`` projected
    from ``x`` (``MatMul``, ``Reshape [0, 0, H, D]``, ``Transpose``), so shape inference gives the
    heads and head size the kernel rewrite needs.  ``score_mod``: a pointwise score graph
    (``onnxgen.ops.score_mods``), applied through ``score_mods.flex_score_mod``."""
    from onnx import numpy_helper

    from .ops import score_mods

    rng = np.random.default_rng(seed)
    kv_heads = kv_heads or heads
    head = hidden // heads
    mod = score_mods.flex_score_mod(score_mod) if score_mod is not None else None
    nodes, weights = [], []

    def weight(name, *shape):
        weights.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    weights += [numpy_helper.from_array(np.array([0, 0, heads, head], np.int64), "q_shape"),
                numpy_helper.from_array(np.array([0, 0, kv_heads, head], np.int64), "kv_shape"),
                numpy_helper.from_array(np.array([0, 0, hidden], np.int64), "merged_shape")]
    x = "x"
    for i in range(layers):
        p = f"layers.{i}."
        qkv = []
        for t, n_heads in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            w = weight(p + t + "_proj", hidden, n_heads * head)
            nodes += [helper.make_node("MatMul", [x, w], [p + t + "_flat"], name=p + t + "_proj"),
                      helper.make_node("Reshape", [p + t + "_flat", "q_shape" if t == "q" else "kv_shape"],
                                       [p + t + "_heads"], name=p + t + "_reshape"),
                      helper.make_node("Transpose", [p + t + "_heads"], [p + t], perm=[0, 2, 1, 3],
                                       name=p + t + "_transpose")]
            qkv.append(p + t)
        nodes += [helper.make_node("FlexAttention", qkv, [p + "attention"], domain="ai.onnx.preview",
                                   name=p + "attention", **({"score_mod": mod} if mod is not None else {})),
                  helper.make_node("Transpose", [p + "attention"], [p + "attention_t"], perm=[0, 2, 1, 3],
                                   name=p + "attention_transpose"),
                  helper.make_node("Reshape", [p + "attention_t", "merged_shape"], [p + "merged"],
                                   name=p + "merge"),
                  helper.make_node("MatMul", [p + "merged", weight(p + "o_proj", heads * head, hidden)],
                                   [p + "o"], name=p + "o_proj"),
                  helper.make_node("Add", [x, p + "o"], [p + "out"], name=p + "residual")]
        x = p + "out"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    graph = helper.make_graph(nodes, "flex_stack",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "length", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "length", hidden])],
                              weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET),
                                                   helper.make_opsetid("ai.onnx.preview", 1)])
