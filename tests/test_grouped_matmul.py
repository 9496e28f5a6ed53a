"""GroupedMatMul against a plain numpy gather-matmul, written here independently of the op."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxgen.ops.grouped_matmul import grouped_matmul
from onnxgen.testing import run_expanded_on_ort, run_reference, single_node_model


def oracle(input, weights, group_indices, bias=None):
    x, w, idx = input, weights, group_indices
    m, k = idx.shape
    out = np.zeros((m, k, w.shape[2]), dtype=np.float64)
    for i in range(m):
        for j in range(k):
            g = idx[i, j]
            out[i, j] = x[i].astype(np.float64) @ w[g].astype(np.float64)
            if bias is not None:
                out[i, j] += bias[g]
    return out


def make_inputs(rng, m, k_dim, g, n, k, with_bias, dtype=np.float32):
    return {
        "input": rng.standard_normal((m, k_dim)).astype(dtype),
        "weights": rng.standard_normal((g, k_dim, n)).astype(dtype),
        "group_indices": rng.integers(-g, g, size=(m, k)).astype(np.int64),
        "bias": rng.standard_normal((g, n)).astype(dtype) if with_bias else None,
    }


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 9), k_dim=st.integers(1, 7), g=st.integers(1, 6), n=st.integers(1, 5),
    k=st.integers(0, 3), with_bias=st.booleans(), seed=st.integers(0, 2**31),
)
def test_reference_matches_numpy_gather_matmul(m, k_dim, g, n, k, with_bias, seed):
    inputs = make_inputs(np.random.default_rng(seed), m, k_dim, g, n, k, with_bias)
    got = grouped_matmul(**inputs)
    assert got.shape == (m, k, n)
    np.testing.assert_allclose(got, oracle(**inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float16, 2e-2)])
def test_model_reference_and_expanded_ort(rng, with_bias, dtype, tol):
    inputs = make_inputs(rng, 7, 16, 5, 12, 2, with_bias, dtype)
    model = single_node_model("GroupedMatMul", inputs, ["output"])
    onnx.checker.check_model(model, full_check=True)
    assert [d.dim_value or d.dim_param for d in model.graph.output[0].type.tensor_type.shape.dim] != []
    want = oracle(**inputs)
    for got in (run_reference(model, inputs)[0], run_expanded_on_ort(model, inputs)[0]):
        assert got.dtype == dtype and got.shape == want.shape
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=tol * 4)


def test_rfc_worked_example_with_bias():
    x = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    w = np.array([[[1, 0], [0, 1]], [[0, 1], [1, 0]], [[1, 1], [0, 0]]], np.float32)
    idx = np.array([[0, 1], [2, 0]], np.int64)
    bias = np.array([[0.1, 0.2], [0.3, 0.0], [0.5, 0.5]], np.float32)
    want = [[[1.1, 0.2], [0.3, 1.0]], [[0.5, 0.5], [0.1, 1.2]]]
    np.testing.assert_allclose(grouped_matmul(x, w, idx, bias), want, rtol=1e-6)


def test_static_shape_inference_and_errors():
    inputs = {
        "input": np.zeros((3, 4), np.float32),
        "weights": np.zeros((2, 4, 5), np.float32),
        "group_indices": np.zeros((3, 2), np.int64),
    }
    graph_in = [
        onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [3, 4]),
        onnx.helper.make_tensor_value_info("weights", onnx.TensorProto.FLOAT, [2, 4, 5]),
        onnx.helper.make_tensor_value_info("group_indices", onnx.TensorProto.INT64, [3, 2]),
    ]
    node = onnx.helper.make_node("GroupedMatMul", list(inputs), ["y"], domain="onnxgen.preview")
    model = onnx.helper.make_model(
        onnx.helper.make_graph([node], "g", graph_in, [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]),
        opset_imports=[onnx.helper.make_opsetid("", 25), onnx.helper.make_opsetid("onnxgen.preview", 1)],
    )
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim] == [3, 2, 5]
    model.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 6
    with pytest.raises(onnx.shape_inference.InferenceError, match="K=4 but weights have K=6"):
        onnx.shape_inference.infer_shapes(model, strict_mode=True)


def test_reference_rejects_out_of_range_indices():
    x, w = np.zeros((2, 3), np.float32), np.zeros((4, 3, 2), np.float32)
    with pytest.raises(ValueError, match=r"group_indices must lie in \[-4, 4\)"):
        grouped_matmul(x, w, np.array([[0], [4]], np.int64))
