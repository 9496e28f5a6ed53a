"""onnxgen.context's format and checker on a small hand-built model: the content hash, the schema
file, and a table of broken manifests, each rejected by the checker with a clear reason while the
model still runs (its original nodes) with the plain model's outputs.

Oracle: the plain model on onnxruntime; the fallback runs the same nodes on the same runtime, so
outputs must match to atol 1e-6.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxgen import context
from onnxgen.context import format as fmt
from onnxgen.context.backends import ort_session

DOCS_SCHEMA = Path(__file__).parents[1] / "docs" / "backend-context.schema.json"


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    """context.load's cache of verified hashes in a folder of the test's own, not ~/.cache."""
    monkeypatch.setenv("ONNXGEN_CACHE", str(tmp_path / "cache"))


def plain_model(seed: int = 0) -> onnx.ModelProto:
    """y = sigmoid(relu(x W1) W2 + x): the MLP (three nodes) is the scope."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["m"], name="mm2"),
             helper.make_node("Add", ["m", "x"], ["s"], name="add"),
             helper.make_node("Sigmoid", ["s"], ["y"], name="sigmoid")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 16])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


FEEDS = {"x": np.random.default_rng(7).standard_normal((3, 16)).astype(np.float32)}


@pytest.fixture
def compiled(tmp_path):
    """A model folder whose scope 'mlp' has an onnxruntime blob in a file and an OpenVINO blob embedded."""
    path = tmp_path / "model.onnx"
    onnx.save(plain_model(), path)
    context.annotate(path, nodes={"mlp": ["mm1", "relu", "mm2"]})
    assert not context.compile(path, "onnxruntime")[0].error
    assert not context.compile(path, "openvino", embed=True)[0].error
    assert context.check(path).ok
    return path


def want():
    return ort_session(plain_model()).run(None, FEEDS)


def edit(path: Path, change) -> None:
    """Apply ``change(doc, folder, model)`` to the raw manifest JSON (no validation on the way);
    a string it returns replaces the whole manifest text."""
    model = onnx.load(path)
    prop = next(p for p in model.metadata_props if p.key == context.MANIFEST_KEY)
    doc = json.loads(prop.value)
    result = change(doc, path.parent, model)
    prop.value = result if isinstance(result, str) else json.dumps(doc)
    onnx.save(model, path)


def ort_blob(doc):
    return next(b for b in doc["scopes"]["mlp"]["blobs"] if b["backend"] == "onnxruntime")


def set_blob(**fields):
    def change(doc, folder, model):
        ort_blob(doc).update(fields)
    return change


def symlink_out(doc, folder, model):
    outside = folder.parent / "outside.bin"
    blob = ort_blob(doc)
    outside.write_bytes((folder / blob["path"]).read_bytes())  # even the right bytes: still refused
    os.symlink(outside, folder / "escape.bin")
    blob["path"] = "escape.bin"


def truncate_file(doc, folder, model):
    file = folder / ort_blob(doc)["path"]
    file.write_bytes(file.read_bytes()[:100])


def flip_byte(doc, folder, model):
    file = folder / ort_blob(doc)["path"]
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def truncate_embedded(doc, folder, model):
    blob = ort_blob(doc)
    blob["data"] = base64.b64encode((folder / blob.pop("path")).read_bytes()[:-1000]).decode()


def change_weight(doc, folder, model):  # the graph changed after compiling: the hash no longer matches
    w1 = model.graph.initializer[0]
    w1.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w1) * 2, "w1"))


def missing_file(doc, folder, model):
    (folder / ort_blob(doc)["path"]).unlink()


# (what is broken, how, what the checker says, whether the whole manifest is refused)
BROKEN = [
    ("wrong scope hash", lambda d, f, m: d["scopes"]["mlp"].update(hash="sha256:" + "0" * 64), "content hash", False),
    ("weights changed", change_weight, "content hash", False),
    ("wrong boundary", lambda d, f, m: d["scopes"]["mlp"].update(outputs=["h"]), "boundary", False),
    ("wrong node count", lambda d, f, m: d["scopes"]["mlp"].update(nodes=2), "3 nodes carry it", False),
    ("missing file", missing_file, "missing", False),
    ("absolute path", set_blob(path="/etc/passwd"), "absolute", False),
    ("path escape with ..", set_blob(path="../model.onnx"), "climbs out", False),
    ("symlink out of the folder", symlink_out, "leads out of the model's folder", False),
    ("unknown backend", set_blob(backend="tvm"), "unknown backend 'tvm'", False),
    ("manifest version mismatch", lambda d, f, m: d.update(version=2), "version 2 is not supported", True),
    ("truncated file", truncate_file, "has 100 bytes", False),
    ("truncated embedded payload", truncate_embedded, "truncated", False),
    ("payload changed", flip_byte, "sha256", False),
    ("wrong sha256", set_blob(sha256="ab" * 32), "sha256", False),
    ("size over the limit", set_blob(size=fmt.MAX_BLOB_BYTES + 1), "over the limit", False),
    ("not JSON", lambda d, f, m: "{'scopes': ", "not JSON", True),
    ("schema: field missing", lambda d, f, m: ort_blob(d).pop("sha256") and None, "schema", True),
    ("schema: path and data both", set_blob(data="AAAA"), "schema", True),
    ("schema: bad scope name", lambda d, f, m: d["scopes"].update({"a b": d["scopes"]["mlp"]}), "schema", True),
]


@pytest.mark.parametrize("what, change, message, whole", BROKEN, ids=[b[0] for b in BROKEN])
def test_the_checker_rejects_broken_manifests_and_the_model_still_runs(compiled, what, change, message, whole):
    edit(compiled, change)
    report = context.check(compiled)
    assert not report.ok
    assert any(message in p for p in report.problems()), report.problems()
    with pytest.warns(context.ContextWarning):
        session = context.load(compiled, ["onnxruntime"])
    assert all(c.runner == "original" for c in session.choices.values())
    plain = ort_session(onnx.load(compiled)).run(None, FEEDS)  # the file as it now is, context ignored
    np.testing.assert_allclose(session.run(None, FEEDS)[0], plain[0], atol=1e-6)
    if whole:
        with pytest.raises(context.ContextError, match="backend context refused"):
            context.load(compiled, strict=True)


def test_a_blob_of_another_backend_version_or_cpu_is_not_used(compiled):
    edit(compiled, set_blob(backend_version="0.0.1"))
    report = context.check(compiled)
    assert report.ok  # nothing wrong with the file ...
    status = next(b for b in report.blobs if b.blob.backend == "onnxruntime")
    assert "made by onnxruntime 0.0.1" in status.usable_here  # ... but this machine cannot use that blob
    with pytest.warns(context.ContextWarning, match="made by onnxruntime 0.0.1"):
        session = context.load(compiled, ["onnxruntime", "openvino"])
    assert session.choices["mlp"].runner == "openvino"  # the next valid blob
    np.testing.assert_allclose(session.run(None, FEEDS)[0], want()[0], atol=1e-5, rtol=1e-4)
    edit(compiled, set_blob(backend_version=__import__("onnxruntime").__version__,
                            hardware={"device": "cpu", "isa": ["made_up_isa"]}))
    with pytest.warns(context.ContextWarning, match="made_up_isa"):
        session = context.load(compiled, ["onnxruntime"])
    assert session.choices["mlp"].runner == "original"


def test_valid_blobs_are_used_and_equal_the_plain_model(compiled):
    for backend, atol in (("onnxruntime", 1e-6), ("openvino", 1e-5)):
        session = context.load(compiled, [backend])
        assert session.choices["mlp"].runner == backend
        assert session.plan == [f"scope mlp: {backend} (3 nodes)", "onnxruntime: 2 original nodes"]
        np.testing.assert_allclose(session.run(None, FEEDS)[0], want()[0], atol=atol, rtol=1e-4)


def test_manifest_contents(compiled):
    manifest = context.read_manifest(onnx.load(compiled))
    scope = manifest.scopes["mlp"]
    assert (scope.inputs, scope.outputs, scope.nodes) == (["x"], ["m"], 3)
    by_backend = {b.backend: b for b in scope.blobs}
    assert by_backend["onnxruntime"].path == "model.context/mlp.onnxruntime.ort"
    assert by_backend["openvino"].data and by_backend["openvino"].path is None
    assert by_backend["openvino"].options["config"] == {"INFERENCE_PRECISION_HINT": "f32"}
    for blob in scope.blobs:
        assert blob.hardware["device"] == "cpu" and set(blob.hardware["isa"]) <= fmt.cpu_flags()


def test_content_hash_covers_what_the_scope_computes():
    model = plain_model()
    nodes = list(model.graph.node)[:3]
    base = context.content_hash(model, nodes)
    renamed = plain_model()
    renamed.graph.node[0].name = "another_name"
    fmt.set_scope(renamed.graph.node[0], "mlp")  # names and marks are not content
    assert context.content_hash(renamed, list(renamed.graph.node)[:3]) == base
    assert context.content_hash(plain_model(seed=1), list(plain_model(seed=1).graph.node)[:3]) != base
    other_opset = plain_model()
    other_opset.opset_import[0].version = 20
    assert context.content_hash(other_opset, list(other_opset.graph.node)[:3]) != base
    rewired = plain_model()
    rewired.graph.node[1].op_type = "Sigmoid"
    assert context.content_hash(rewired, list(rewired.graph.node)[:3]) != base
    with_attr = plain_model()
    with_attr.graph.node[1].attribute.append(helper.make_attribute("alpha", 0.5))
    assert context.content_hash(with_attr, list(with_attr.graph.node)[:3]) != base


def test_non_convex_scopes_are_refused(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(plain_model(), path)
    with pytest.raises(ValueError, match="not convex"):  # mm1 -> relu -> mm2 -> add: relu left out
        context.annotate(path, nodes={"bad": ["mm1", "add"]})


def test_native_code_blobs_are_refused_without_the_opt_in(compiled):
    edit(compiled, set_blob(native_code=True))
    with pytest.warns(context.ContextWarning, match="native code"):
        session = context.load(compiled, ["onnxruntime"])
    assert session.choices["mlp"].runner == "original"


def test_the_schema_in_docs_is_the_one_the_checker_uses():
    assert json.loads(DOCS_SCHEMA.read_text()) == fmt.SCHEMA


def test_safe_blob_path(tmp_path):
    (tmp_path / "sub").mkdir()
    assert fmt.safe_blob_path(tmp_path, "sub/a.bin") == (tmp_path / "sub" / "a.bin").resolve()
    for bad in ("/abs", "../x", "sub/../../x", "C:/x", "sub\\..\\x", ""):
        with pytest.raises(context.ContextError):
            fmt.safe_blob_path(tmp_path, bad)
    os.symlink("/", tmp_path / "root")
    with pytest.raises(context.ContextError, match="leads out"):
        fmt.safe_blob_path(tmp_path, "root/etc/passwd")
