"""onnxgen-kernels blobs of compiled score programs (``onnxgen.kernels.programs``) in the backend
context: an exported Llama whose PagedAttention nodes carry a score_mod (ALiBi + softcap), and a
stack of FlexAttention layers (softcap + ALiBi + sliding window, grouped heads).

Oracles: the plain model on onnxruntime with onnxgen's kernels, its score_mods compiled and its
FlexAttention rewritten at session creation (``backends.ort_session``): the blob must give the
same outputs (atol 1e-5; the programs are the same, so in practice equal); and, independently of
the compiler, the fully expanded model on stock onnxruntime (function bodies, no kernels: atol
1e-4).  A blob that is tampered with, stale (another compiler, another kernel library, another
scope content or shapes) or that the kernel refuses is not used, with a ContextWarning, and the
outputs are still the plain model's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_context_load import HEADS, prefill_feeds, write_checkpoint

from onnxgen import context, kernels
from onnxgen.context import programs
from onnxgen.context.backends import ort_session
from onnxgen.export.llm import build
from onnxgen.ops.flex_score import INPUT_NAMES, INPUT_TYPES
from onnxgen.ops import score_mods as sm
from onnxgen.passes import compile_score_mod, flex_kernel
from onnxgen.testing import flex_stack_model

FLEX_HEADS, FLEX_KV_HEADS, FLEX_HIDDEN = 4, 2, 32


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXGEN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module", autouse=True)
def library_built():
    if kernels.library_path() is None:
        pytest.fail("the kernel library is not built (pip install -e . builds it)")


def expanded(model, feeds):
    """The whole model as standard ops on stock onnxruntime: no kernels, no compiler."""
    return ort_session(model, library=None).run(None, feeds)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{kind: (folder, feeds, plain outputs)} for "paged" (a 2-layer Llama, ALiBi + softcap on every
    PagedAttention) and "flex" (3 FlexAttention layers, softcap + ALiBi + window)."""
    root = tmp_path_factory.mktemp("kernels")
    out = {}
    write_checkpoint(root / "ckpt", "llama")
    folder = build(root / "ckpt", root / "paged")
    model = onnx.load(folder / "model.onnx")
    for node in model.graph.node:
        if node.op_type == "PagedAttention":
            node.attribute.append(helper.make_attribute("score_mod", sm.compose(sm.alibi(HEADS), sm.softcap(5.0))))
    for f in folder.glob("model.onnx*"):
        f.unlink()
    onnx.save(model, folder / "model.onnx")
    feeds = prefill_feeds(model)
    out["paged"] = (folder, feeds, ort_session(model).run(None, feeds))
    np.testing.assert_allclose(out["paged"][2][0], expanded(model, feeds)[0], atol=1e-4)

    mod = sm.compose(sm.softcap(5.0), sm.alibi(FLEX_HEADS), sm.sliding_window(6))
    model = flex_stack_model(mod, layers=3, hidden=FLEX_HIDDEN, heads=FLEX_HEADS, kv_heads=FLEX_KV_HEADS, scale=0.3)
    (root / "flex").mkdir()
    onnx.save(model, root / "flex" / "model.onnx")
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 11, FLEX_HIDDEN)).astype(np.float32)}
    out["flex"] = (root / "flex", feeds, ort_session(model).run(None, feeds))
    np.testing.assert_allclose(out["flex"][2][0], expanded(model, feeds)[0], atol=1e-4)
    return out


def with_blobs(models, kind, tmp_path, **compile_args):
    """A copy of the model with one scope per attention node and onnxgen-kernels blobs for them."""
    folder, feeds, want = models[kind]
    target = tmp_path / kind
    shutil.copytree(folder, target)
    path = target / "model.onnx"
    scopes = context.annotate(path, backend="onnxgen-kernels")
    assert len(scopes) == (2 if kind == "paged" else 3) and all(s.nodes == 1 for s in scopes.values())
    results = context.compile(path, "onnxgen-kernels", **compile_args)
    assert [r.error for r in results] == [None] * len(scopes)
    return path, feeds, want


def load_quietly(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", context.ContextWarning)  # every blob valid: nothing falls back
        return context.load(path, **kwargs)


def assert_equal(got, want, atol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=atol, rtol=0)


def no_compiler(monkeypatch):
    """Make every way into the score compiler and the FlexAttention rewrite raise."""
    def refuse(*_, **__):
        raise AssertionError("the compiler ran although the blob was valid")

    for module, name in ((compile_score_mod, "compile_graph"), (compile_score_mod, "kernel_program"),
                         (compile_score_mod, "compile_score_mods"), (flex_kernel, "kernel_program"),
                         (flex_kernel, "flex_to_kernel"), (flex_kernel, "plan_rewrite")):
        monkeypatch.setattr(module, name, refuse)


def blob_of(path, scope):
    return context.read_manifest(onnx.load(path, load_external_data=False)).scopes[scope].blobs[0]


@pytest.mark.parametrize("kind", ["paged", "flex"])
def test_programs_blob_equals_the_plain_model_without_compiling(models, kind, tmp_path, monkeypatch):
    path, feeds, want = with_blobs(models, kind, tmp_path)
    for scope in context.read_manifest(onnx.load(path, load_external_data=False)).scopes:
        blob = blob_of(path, scope)
        assert blob.format == programs.FORMAT and not blob.native_code and blob.size < 4096
        doc = json.loads((path.parent / blob.path).read_bytes())
        assert doc["compiler"] == programs.compiler_id() and doc["scope_hash"].startswith("sha256:")
        assert [n["op_type"] for n in doc["nodes"]] == ["PagedAttention" if kind == "paged" else "FlexAttention"]
    assert context.check(path).ok
    no_compiler(monkeypatch)
    with pytest.raises(AssertionError, match="the compiler ran"):  # the patch bites: without the blob
        context.load(path, backends=[])
    session = load_quietly(path)  # no allow_native_code: the blob is data
    assert {c.runner for c in session.choices.values()} == {"onnxgen-kernels"}
    assert len(session.steps) == 1 and len(session.steps[0].inlined) == len(session.choices), session.plan
    assert_equal(session.run(None, feeds), want)
    assert_equal(session.run(None, feeds), want)  # a second run on the same session
    monkeypatch.undo()
    np.testing.assert_allclose(session.run(None, feeds)[0], expanded(onnx.load(path), feeds)[0], atol=1e-4)


def test_flex_programs_beside_an_onnxruntime_blob(models, tmp_path):
    """Programs run in the onnxruntime pieces between the scopes that other backends run."""
    folder, feeds, want = models["flex"]
    shutil.copytree(folder, tmp_path / "flex")
    path = tmp_path / "flex" / "model.onnx"
    context.annotate(path, nodes={"attention_0": ["layers.0.attention"], "attention_2": ["layers.2.attention"],
                                  "projections_1": ["layers.1.q_proj", "layers.1.k_proj", "layers.1.v_proj"]})
    assert [r.error for r in context.compile(path, "onnxgen-kernels", scopes=["attention_0", "attention_2"])] == [None] * 2
    assert [r.error for r in context.compile(path, "onnxruntime", scopes=["projections_1"])] == [None]
    session = load_quietly(path)
    assert [s.scope for s in session.steps] == [None, "projections_1", None], session.plan
    assert session.steps[0].inlined == ["attention_0"] and session.steps[2].inlined == ["attention_2"]
    assert_equal(session.run(None, feeds), want)


def rewrite_payload(path, scope, change):
    """Apply ``change(doc)`` to a programs blob and record its new sha256 and size in the manifest
    (a blob made by someone else, consistently: the manifest cannot tell)."""
    model = onnx.load(path, load_external_data=False)
    manifest = context.read_manifest(model)
    blob = manifest.scopes[scope].blobs[0]
    file = path.parent / blob.path
    doc = json.loads(file.read_bytes())
    change(doc)
    payload = json.dumps(doc).encode()
    file.write_bytes(payload)
    blob.sha256, blob.size = hashlib.sha256(payload).hexdigest(), len(payload)
    context.format.write_manifest(model, manifest)
    onnx.save(model, path)


def set_in(doc, key, value):
    doc[key] = value


def set_program(index, value):
    def change(doc):
        doc["nodes"][0]["program"][index] = value
    return change


def set_plan(key, value):
    def change(doc):
        doc["nodes"][0]["plan"][key] = value
    return change


CASES = [  # (kind, how the blob is made wrong, the warning)
    ("paged", "tampered", "sha256"),
    ("paged", lambda d: set_in(d, "compiler", "score_program/1 sha256:0123456789abcdef"), "another score compiler"),
    ("paged", lambda d: set_in(d, "kernels_sha256", "0" * 64), "another build of onnxgen's kernel library"),
    ("paged", lambda d: set_in(d, "scope_hash", "sha256:" + "0" * 64), "made for scope content"),
    ("paged", lambda d: set_in(d, "version", 2), "payload version"),
    ("paged", set_program(3, 10**6), "refused when the session was made"),  # the kernel's own check
    ("paged", lambda d: d["nodes"][0].update(program=["x"]), "not a list of integers"),
    ("flex", set_plan("num_heads", FLEX_HEADS * 2), "the model's shapes give"),
    ("flex", set_program(4 + 5 * 0, 999), "refused when the session was made"),  # an unknown opcode
    ("flex", lambda d: d["nodes"][0].update(outputs=["elsewhere"]), "the blob lists"),
]


@pytest.mark.parametrize("kind,change,warning", CASES, ids=[f"{k}-{w[:24]}" for k, _, w in CASES])
def test_wrong_programs_are_refused_and_the_graph_runs(models, kind, change, warning, tmp_path):
    path, feeds, want = with_blobs(models, kind, tmp_path)
    scope = next(iter(context.read_manifest(onnx.load(path, load_external_data=False)).scopes))
    if change == "tampered":
        file = path.parent / blob_of(path, scope).path
        payload = file.read_bytes()
        assert b'"index":0' in payload
        file.write_bytes(payload.replace(b'"index":0', b'"index":1'))  # same size, another meaning
    else:
        rewrite_payload(path, scope, change)
    with pytest.warns(context.ContextWarning, match=warning):
        session = context.load(path)
    assert session.choices[scope].runner == "original"
    assert any(warning.split()[0] in s for s in session.choices[scope].skipped)
    others = [c.runner for name, c in session.choices.items() if name != scope]
    assert others == ["onnxgen-kernels"] * len(others) or "session" in warning  # one session: all fall back
    assert_equal(session.run(None, feeds), want)


def test_stale_options_are_reported_before_reading(models, tmp_path):
    """``check``/``inspect`` and the loader see a blob made for another library from its options."""
    path, feeds, want = with_blobs(models, "paged", tmp_path)
    model = onnx.load(path, load_external_data=False)
    manifest = context.read_manifest(model)
    for scope in manifest.scopes.values():
        scope.blobs[0].options["kernels_sha256"] = "f" * 64
    context.format.write_manifest(model, manifest)
    onnx.save(model, path)
    report = context.check(path)
    assert report.ok and all("another build" in b.usable_here for b in report.blobs)
    with pytest.warns(context.ContextWarning, match="another build"):
        session = context.load(path)
    assert {c.runner for c in session.choices.values()} == {"original"}
    assert_equal(session.run(None, feeds), want)


def test_a_changed_score_mod_makes_the_scope_stale(models, tmp_path):
    path, feeds, _ = with_blobs(models, "paged", tmp_path)
    model = onnx.load(path)
    node = next(n for n in model.graph.node if n.op_type == "PagedAttention")
    attr = next(a for a in node.attribute if a.name == "score_mod")
    attr.g.CopyFrom(sm.compose(sm.alibi(HEADS), sm.softcap(3.0)))
    onnx.save(model, path)
    with pytest.warns(context.ContextWarning, match="content hash"):
        session = context.load(path)
    assert sorted(c.runner for c in session.choices.values()) == ["onnxgen-kernels", "original"]
    assert_equal(session.run(None, feeds), ort_session(onnx.load(path)).run(None, feeds))


def test_library_and_programs_blobs_side_by_side(models, tmp_path):
    """The library (native code) is still made on request; without the opt-in the programs are used."""
    path, feeds, want = with_blobs(models, "paged", tmp_path)
    assert [r.error for r in context.compile(path, "onnxgen-kernels", format=programs.LIBRARY_FORMAT)] == [None] * 2
    manifest = context.read_manifest(onnx.load(path, load_external_data=False))
    for scope in manifest.scopes.values():
        assert [(b.format, b.native_code) for b in scope.blobs] == [(programs.FORMAT, False),
                                                                   (programs.LIBRARY_FORMAT, True)]
    session = load_quietly(path)
    assert {c.runner for c in session.choices.values()} == {"onnxgen-kernels"}
    assert all(s.inlined for s in session.steps)
    assert_equal(session.run(None, feeds), want)
    with pytest.raises(ValueError, match="makes"):
        context.compile(path, "onnxgen-kernels", format="ort")


def test_a_score_mod_without_bytecode_gets_no_blob_and_runs_expanded(models, tmp_path):
    """Round has no opcode: no programs blob for that scope, and the graph path expands the node."""
    rounded = helper.make_graph(
        [helper.make_node("Round", ["score"], ["r"]), helper.make_node("Add", ["score", "r"], [sm.OUTPUT])],
        "rounded", [helper.make_tensor_value_info(n, t, []) for n, t in zip(INPUT_NAMES, INPUT_TYPES)],
        [helper.make_tensor_value_info(sm.OUTPUT, TensorProto.FLOAT, [])])
    folder, feeds, _ = models["paged"]
    shutil.copytree(folder, tmp_path / "paged")
    path = tmp_path / "paged" / "model.onnx"
    model = onnx.load(path)
    node = [n for n in model.graph.node if n.op_type == "PagedAttention"][1]
    next(a for a in node.attribute if a.name == "score_mod").g.CopyFrom(rounded)
    onnx.save(model, path)
    context.annotate(path, op_types=["PagedAttention"])
    with pytest.warns(UserWarning, match="Round"):
        results = context.compile(path, "onnxgen-kernels")
    assert results[0].error is None and "nothing for a programs blob" in results[1].error
    with pytest.warns(UserWarning, match="Round"):  # the fallback compiles the other scope's graph: warns again
        session = context.load(path)
    assert [c.runner for c in session.choices.values()] == ["onnxgen-kernels", "original"]
    assert_equal(session.run(None, feeds), expanded(onnx.load(path), feeds), atol=1e-4)
