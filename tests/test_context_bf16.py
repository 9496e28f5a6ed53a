"""context.load's onnxruntime steps compute linear layers with bf16 weights as
``onnxgen.backends.ort.session`` does: ``passes.bf16_linear`` rewrites MatMul(X, Cast(W_bf16)) onto
the kernels' dense GroupedMatMul where ``bf16_compute`` says so (default: an AMX CPU).

The model is a small MLP with bf16 weights, y = relu(x W1) W2, each weight widened by a Cast as the
exporter writes it.  Oracle: ``backends.ort.session`` on the same model with the same
``bf16_compute``; both run the same kernels on the same inputs: atol 1e-6.  That the pass ran is
read from the pass itself (a spy counts the GroupedMatMul nodes it made), and from the outputs,
which differ from the fp32 computation (the rewrite rounds each layer's input to bf16).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxgen import context, kernels
from onnxgen.backends import ort as ort_backend
from onnxgen.passes import bf16_linear as bf16_pass

pytestmark = pytest.mark.skipif(kernels.library_path() is None, reason="the bf16 rewrite runs on onnxgen's kernels")

FEEDS = {"x": np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)}


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXGEN_CACHE", str(tmp_path / "cache"))


def bf16_mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def weight(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(ml_dtypes.bfloat16), name)

    float_ = onnx.TensorProto.FLOAT
    nodes = [helper.make_node("Cast", ["w1"], ["w1_f"], to=float_, name="cast1"),
             helper.make_node("Cast", ["w2"], ["w2_f"], to=float_, name="cast2"),
             helper.make_node("MatMul", ["x", "w1_f"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2_f"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "bf16_mlp", [helper.make_tensor_value_info("x", float_, ["n", 64])],
                              [helper.make_tensor_value_info("y", float_, ["n", 32])],
                              [weight("w1", (64, 96)), weight("w2", (96, 32))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])


@pytest.fixture
def rewritten(monkeypatch) -> list[int]:
    """The GroupedMatMul count of each model the bf16 pass returned (a spy on the pass)."""
    counts = []

    def spy(model):
        out = real(model)
        counts.append(sum(n.op_type == "GroupedMatMul" for n in out.graph.node))
        return out

    real = bf16_pass.bf16_linear
    monkeypatch.setattr(bf16_pass, "bf16_linear", spy)
    return counts


def ort_session_output(model, bf16_compute):
    return ort_backend.session(model, bf16_compute=bf16_compute).run(FEEDS)["y"]


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "plain" / "model.onnx"
    path.parent.mkdir()
    onnx.save(bf16_mlp(), path)
    return path


@pytest.fixture
def relu_blob_path(tmp_path):
    """The model with its Relu as a scope with an onnxruntime blob: the loader then runs three steps,
    the two linear layers in onnxruntime steps of their own around the blob."""
    path = tmp_path / "ctx" / "model.onnx"
    path.parent.mkdir()
    onnx.save(bf16_mlp(), path)
    context.annotate(path, nodes={"act": ["relu"]})
    assert not context.compile(path, "onnxruntime")[0].error
    return path


@pytest.mark.parametrize("bf16_compute", [True, False])
def test_told_bf16_compute_is_what_ort_session_does(model_path, rewritten, bf16_compute):
    want = ort_session_output(bf16_mlp(), bf16_compute)
    assert rewritten == ([2] if bf16_compute else [])
    got = context.load(model_path, bf16_compute=bf16_compute).run(None, FEEDS)[0]
    assert rewritten == ([2, 2] if bf16_compute else [])
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_bf16_compute_changes_the_outputs(model_path):
    """The check above can tell the two apart: bf16 compute rounds each layer's input."""
    bf16 = context.load(model_path, bf16_compute=True).run(None, FEEDS)[0]
    fp32 = context.load(model_path, bf16_compute=False).run(None, FEEDS)[0]
    assert np.abs(bf16 - fp32).max() > 1e-3


@pytest.mark.parametrize("bf16_compute", [True, False])
def test_steps_around_a_blob_rewrite_their_own_linear_layers(relu_blob_path, rewritten, bf16_compute):
    """Each weight's Cast runs in the step of its MatMul (not in the first step, where it would hand
    a widened fp32 copy to a later step and keep the MatMul from being rewritten)."""
    want = ort_session_output(bf16_mlp(), bf16_compute)
    rewritten.clear()
    session = context.load(relu_blob_path, ["onnxruntime"], bf16_compute=bf16_compute)
    assert [c.runner for c in session.choices.values()] == ["onnxruntime"]
    assert len(session.steps) == 3, session.plan
    assert rewritten == ([1, 1] if bf16_compute else [])
    np.testing.assert_allclose(session.run(None, FEEDS)[0], want, atol=1e-6, rtol=0)


@pytest.mark.skipif(not kernels.has_amx(), reason="the default turns bf16 compute on only on an AMX CPU")
def test_default_on_amx_runs_the_pass(model_path, relu_blob_path, rewritten):
    want = ort_session_output(bf16_mlp(), None)
    assert rewritten == [2]
    np.testing.assert_allclose(context.load(model_path).run(None, FEEDS)[0], want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(context.load(relu_blob_path, ["onnxruntime"]).run(None, FEEDS)[0], want,
                               atol=1e-6, rtol=0)
    assert rewritten == [2, 2, 1, 1]
    np.testing.assert_allclose(want, ort_session_output(bf16_mlp(), True), atol=0, rtol=0)


def test_default_without_amx_keeps_fp32(model_path, rewritten, monkeypatch):
    monkeypatch.setenv("ONNXGEN_NO_AMX", "1")  # kernels.has_amx() says no, as on a CPU without AMX
    got = context.load(model_path).run(None, FEEDS)[0]
    assert rewritten == []
    np.testing.assert_allclose(got, ort_session_output(bf16_mlp(), False), atol=1e-6, rtol=0)
