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
