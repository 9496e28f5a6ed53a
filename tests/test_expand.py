"""The expand pass: FlexAttention through onnx's context-dependent body, nested and mixed graphs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxgen.passes import expand
from onnxgen.testing import run_expanded_on_ort

SCORE = helper.make_tensor_value_info("s", TensorProto.FLOAT, None)
OUT = helper.make_tensor_value_info("o", TensorProto.FLOAT, None)


def flex_model(score_mod, q_heads=4, kv_heads=2, dtype=TensorProto.FLOAT, **attrs):
    names = ("Q", "K", "V")
    node = helper.make_node("FlexAttention", list(names), ["Y"], domain="ai.onnx.preview", score_mod=score_mod, **attrs)
    heads = (q_heads, kv_heads, kv_heads)
    graph = helper.make_graph(
        [node], "flex",
        [helper.make_tensor_value_info(n, dtype, [2, h, None, 8]) for n, h in zip(names, heads)],
        [helper.make_tensor_value_info("Y", dtype, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25), helper.make_opsetid("ai.onnx.preview", 1)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def softcap_mod(cap=3.0):
    c = helper.make_tensor("c", TensorProto.FLOAT, [], [cap])
    nodes = [helper.make_node("Div", ["s", "c"], ["t"]), helper.make_node("Tanh", ["t"], ["u"]),
             helper.make_node("Mul", ["u", "c"], ["o"])]
    return helper.make_graph(nodes, "softcap", [SCORE], [OUT], initializer=[c])


def causal_mod():
    """A mask written over the whole score tensor: its index tensors come from Shape/Range."""
    z, one, ninf = (helper.make_tensor(n, TensorProto.INT64 if n != "ninf" else TensorProto.FLOAT, [], [v])
                    for n, v in (("z", 0), ("one", 1), ("ninf", -np.inf)))
    nodes = [
        helper.make_node("Shape", ["s"], ["shape"]),
        helper.make_node("Gather", ["shape", "i2"], ["L"], axis=0),
        helper.make_node("Gather", ["shape", "i3"], ["S"], axis=0),
        helper.make_node("Range", ["z", "L", "one"], ["q"]),
        helper.make_node("Range", ["z", "S", "one"], ["kv"]),
        helper.make_node("Unsqueeze", ["q", "ax1"], ["qc"]),
        helper.make_node("LessOrEqual", ["kv", "qc"], ["keep"]),
        helper.make_node("Where", ["keep", "s", "ninf"], ["o"]),
    ]
    inits = [z, one, ninf, helper.make_tensor("i2", TensorProto.INT64, [], [2]),
             helper.make_tensor("i3", TensorProto.INT64, [], [3]), helper.make_tensor("ax1", TensorProto.INT64, [1], [1])]
    return helper.make_graph(nodes, "causal", [SCORE], [OUT], initializer=inits)


@pytest.mark.parametrize("score_mod", [softcap_mod, causal_mod], ids=["softcap", "causal"])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_flex_attention_expanded_matches_onnx_reference(rng, score_mod, q_heads, kv_heads):
    model = flex_model(score_mod(), q_heads, kv_heads)
    feeds = {"Q": rng.standard_normal((2, q_heads, 5, 8)).astype(np.float32),
             "K": rng.standard_normal((2, kv_heads, 7, 8)).astype(np.float32),
             "V": rng.standard_normal((2, kv_heads, 7, 8)).astype(np.float32)}
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    with pytest.raises(Exception, match="FlexAttention"):
        ort.InferenceSession(model.SerializeToString())  # the reason the pass exists
    got = run_expanded_on_ort(model, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_flex_attention_fp16_and_scale(rng):
    model = flex_model(softcap_mod(), 2, 2, TensorProto.FLOAT16, scale=0.25)
    feeds = {n: rng.standard_normal((2, 2, 6, 8)).astype(np.float16) for n in "QKV"}
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    got = run_expanded_on_ort(model, feeds)[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=5e-3, atol=5e-3)


def test_ops_inside_a_subgraph_are_expanded(rng):
    """A GroupedMatMul in an If branch is expanded too."""
    then_node = helper.make_node("GroupedMatMul", ["x", "w", "idx"], ["y_then"], domain="onnxgen.preview")
    then_graph = helper.make_graph([then_node], "then", [], [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)])
    else_graph = helper.make_graph([helper.make_node("Identity", ["z"], ["y_else"])], "else", [],
                                   [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 4, 5]),
         helper.make_tensor_value_info("idx", TensorProto.INT64, [3, 1]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 1, 5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25), helper.make_opsetid("onnxgen.preview", 1)])
    x, w = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((2, 4, 5)).astype(np.float32)
    idx = np.array([[1], [0], [1]], np.int64)
    feeds = {"cond": np.array(True), "x": x, "w": w, "idx": idx, "z": np.zeros((3, 1, 5), np.float32)}
    expanded = expand(model)
    assert not any(n.domain == "onnxgen.preview" for g in [expanded.graph] for n in g.node)
    got = run_expanded_on_ort(model, feeds)[0]
    np.testing.assert_allclose(got[:, 0], np.einsum("mk,mkn->mn", x, w[idx[:, 0]]), rtol=1e-5, atol=1e-5)


def test_old_opset_is_refused():
    model = flex_model(softcap_mod())
    model.opset_import[0].version = 21
    with pytest.raises(ValueError, match="opset 21"):
        expand(model)
