"""Weightless OpenVINO blobs (``openvino.compiled_model.weightless``): the compiled scope without the
weights the model keeps in its external-data file, which OpenVINO reads from that file at import.

The model: x -> relu(x W1 + b) W2 + x -> sigmoid, W1 and W2 (64 KiB each) in ``model.onnx.data``, b
small and embedded in the graph.  Oracle: the plain model on onnxruntime, atol 1e-5 with a blob (f32
inference on OpenVINO), 1e-6 where the scope falls back to its original nodes.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxgen import context
from onnxgen.context.backends import ort_session

WEIGHTLESS, FULL = "openvino.compiled_model.weightless", "openvino.compiled_model"
FEEDS = {"x": np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)}
WEIGHT_BYTES = 2 * 64 * 256 * 4


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXGEN_CACHE", str(tmp_path / "cache"))


def mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 256)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((256, 64)).astype(np.float32) / 16, "w2")
    b = numpy_helper.from_array(rng.standard_normal(256).astype(np.float32)[:8].repeat(32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["m"], name="mm2"),
             helper.make_node("Add", ["m", "x"], ["s"], name="add"),
             helper.make_node("Sigmoid", ["s"], ["y"], name="sigmoid")]
    float_ = onnx.TensorProto.FLOAT
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", float_, ["n", 64])],
                              [helper.make_tensor_value_info("y", float_, ["n", 64])], [w1, w2, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def save(model: onnx.ModelProto, path, external: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:  # the two matrices in the data file, b (1 KiB) in the graph
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=1025)
    else:
        onnx.save(model, path)


def annotated(tmp_path, external: bool = True):
    path = tmp_path / "m" / "model.onnx"
    save(mlp(), path, external)
    context.annotate(path, nodes={"mlp": ["mm1", "bias", "relu", "mm2"]})
    return path


def openvino_blob(path):
    [blob] = [b for b in context.read_manifest(onnx.load(path, load_external_data=False)).scopes["mlp"].blobs
              if b.backend == "openvino"]
    return blob


def want():
    return ort_session(mlp()).run(None, FEEDS)[0]


def load_strictly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", context.ContextWarning)
        return context.load(path, ["openvino"])


def test_the_default_blob_leaves_the_weights_in_the_data_file(tmp_path):
    path = annotated(tmp_path)
    [full] = context.compile(path, "openvino", format=FULL)
    [weightless] = context.compile(path, "openvino")
    assert not full.error and not weightless.error
    assert full.size > WEIGHT_BYTES > full.size - weightless.size > 0.95 * WEIGHT_BYTES, (full.size, weightless.size)
    blob = openvino_blob(path)  # the weightless blob replaced the full one, and its file went
    assert blob.format == WEIGHTLESS and blob.options["weights"]["path"] == "model.onnx.data"
    assert sorted(p.name for p in (path.parent / "model.context").iterdir()) == ["mlp.openvino.weightless"]
    assert context.check(path).ok
    session = load_strictly(path)
    assert session.choices["mlp"].runner == "openvino"
    np.testing.assert_allclose(session.run(None, FEEDS)[0], want(), atol=1e-5)


def test_a_full_blob_still_loads(tmp_path):
    path = annotated(tmp_path)
    context.compile(path, "openvino", format=FULL, embed=True)
    assert openvino_blob(path).format == FULL
    np.testing.assert_allclose(load_strictly(path).run(None, FEEDS)[0], want(), atol=1e-5)


def test_weights_inside_the_graph_get_a_full_blob(tmp_path):
    path = annotated(tmp_path, external=False)
    assert not context.compile(path, "openvino")[0].error
    assert openvino_blob(path).format == FULL
    np.testing.assert_allclose(load_strictly(path).run(None, FEEDS)[0], want(), atol=1e-5)
    [forced] = context.compile(path, "openvino", format=WEIGHTLESS)
    assert "external-data file" in forced.error


def test_compiled_into_another_folder_the_blob_reads_that_folders_weights(tmp_path):
    path = annotated(tmp_path)
    out = tmp_path / "elsewhere" / "model.onnx"
    assert not context.compile(path, "openvino", out)[0].error
    assert (out.parent / "model.onnx.data").is_file() and openvino_blob(out).format == WEIGHTLESS
    np.testing.assert_allclose(load_strictly(out).run(None, FEEDS)[0], want(), atol=1e-5)


def resave_reordered(path):
    """The same weights, saved again in another order: other offsets in the data file."""
    model = onnx.load(path)
    reordered = list(reversed(model.graph.initializer))
    del model.graph.initializer[:]
    model.graph.initializer.extend(reordered)
    (path.parent / "model.onnx.data").unlink()
    save(model, path)


def point_elsewhere(path):
    """The manifest's weights path (not covered by the blob's sha256) edited to another file."""
    (path.parent / "other.data").write_bytes((path.parent / "model.onnx.data").read_bytes())
    edit_weights(path, "other.data")


def point_outside(path):
    (path.parent.parent / "outside.data").write_bytes((path.parent / "model.onnx.data").read_bytes())
    edit_weights(path, "../outside.data")


def edit_weights(path, where):
    model = onnx.load(path, load_external_data=False)
    prop = next(p for p in model.metadata_props if p.key == context.MANIFEST_KEY)
    doc = json.loads(prop.value)
    next(b for b in doc["scopes"]["mlp"]["blobs"] if b["backend"] == "openvino")["options"]["weights"]["path"] = where
    prop.value = json.dumps(doc)
    onnx.save(model, path)


def change_a_weight(path):
    data = bytearray((path.parent / "model.onnx.data").read_bytes())
    data[100] ^= 0x40
    (path.parent / "model.onnx.data").write_bytes(bytes(data))


@pytest.mark.parametrize("change, reason", [
    (resave_reordered, "no longer lie in 'model.onnx.data' where the weightless blob expects them"),
    (point_elsewhere, "no longer lie in 'other.data'"),
    (point_outside, "climbs out with '..'"),
    (change_a_weight, "content hash is"),
])
def test_weights_the_blob_cannot_trust_send_the_scope_to_its_original_nodes(tmp_path, change, reason):
    path = annotated(tmp_path)
    context.compile(path, "openvino")
    changed = change(path) or path
    if change is point_outside:  # a fault of the file itself: the checker says so too
        assert not context.check(changed).ok and "climbs out" in " ".join(context.check(changed).problems())
    with pytest.warns(context.ContextWarning, match=reason.replace("(", r"\(").replace(".", r"\.")):
        session = context.load(changed, ["openvino"])
    assert session.choices["mlp"].runner == "original"
    plain = ort_session(onnx.load(changed)).run(None, FEEDS)[0]  # the model as it now is (a weight may differ)
    np.testing.assert_allclose(session.run(None, FEEDS)[0], plain, atol=1e-6)
