"""onnxgen.context.import_epcontext: an onnxruntime EPContext model plus its source model, turned
into this format (the source graph kept, each EPContext payload a blob of backend
``onnxruntime-ep:<source>``).

The EPContext models here are built by hand: the onnxruntime installed (1.32, CPU and Azure
providers) has no execution provider that writes EPContext nodes (its CPU EP compiles nothing:
ModelCompiler and ``ep.context_enable`` give the model back without one).  Each is built as
onnxruntime's OpenVINO EP writes it: per partition one ``com.microsoft.EPContext`` node (opset
com.microsoft 1) named ``OpenVINOExecutionProvider_OpenVINO-EP-subgraph_<i>_0``, reading the
partition's inputs and making its outputs, with the attributes of onnxruntime's EPContext schema
(``main_context=1``, ``embed_mode``, ``ep_cache_context`` = the payload or a file name relative
to the model, ``ep_sdk_version`` = OpenVINO's version, ``source="OpenVINOExecutionProvider"``,
``partition_name``); the payload is what OVEP stores, OpenVINO's ``export_model`` of the
partition compiled for the CPU; the partition's nodes and the weights only they read are removed,
the other nodes kept, in a topological order.

Oracle: the source model on onnxruntime (onnxgen's kernels); the imported model's EP blobs cannot
be used here, so it runs its original nodes, the same graph on the same runtime: atol 1e-6.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import onnx
import openvino
import pytest
from onnx import helper
from test_context_format import FEEDS, plain_model
from test_context_load import assert_outputs_equal, prefill_feeds, write_checkpoint

from onnxgen import context
from onnxgen.cli import main
from onnxgen.context.backends import BACKENDS, ort_session
from onnxgen.context.format import boundary, node_inputs
from onnxgen.context.partition import submodel, value_types
from onnxgen.context.tools import convex_groups
from onnxgen.export.llm import build

OVEP = "OpenVINOExecutionProvider"
BACKEND = "onnxruntime-ep:" + OVEP


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXGEN_CACHE", str(tmp_path / "cache"))


def openvino_payload(sub: onnx.ModelProto) -> bytes:
    stream = io.BytesIO()
    BACKENDS["openvino"].compile_from_graph(sub).export_model(stream)
    return stream.getvalue()


def topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    maker = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    done, order = set(), []

    def visit(i):
        if i in done:
            return
        done.add(i)
        for name in node_inputs(nodes[i]):
            if name in maker:
                visit(maker[name])
        order.append(nodes[i])

    for i in range(len(nodes)):
        visit(i)
    return order


def make_epcontext(source_path: Path, partitions: list[list[int]], out_path: Path, *, embed_mode: int = 1,
                   shared: bool = False) -> list[bytes]:
    """An EPContext model of ``source_path`` as onnxruntime's OpenVINO EP writes one (see the module
    docstring), a partition per list of node positions; ``shared``: every partition after the
    first shares the first one's context (``main_context=0``, no payload), as QNN writes them.
    Returns the payloads."""
    model = onnx.load(source_path)
    types = value_types(model)
    nodes = list(model.graph.node)  # alive: the ids below are those of these wrappers
    gone, payloads, ep_nodes = set(), [], []
    for i, positions in enumerate(partitions):
        group = [nodes[p] for p in positions]
        inputs, outputs, _ = boundary(model, group)
        payload = openvino_payload(submodel(model, group, inputs, outputs, types, source_path.parent))
        payloads.append(payload)
        name = f"{OVEP}_OpenVINO-EP-subgraph_{i + 1}_0"
        attrs = dict(main_context=1, embed_mode=embed_mode, ep_sdk_version=openvino.get_version(), source=OVEP,
                     partition_name=name)
        if shared and i > 0:
            attrs["main_context"] = 0
        elif embed_mode == 1:
            attrs["ep_cache_context"] = payload
        else:
            file = f"{out_path.stem}_{name}.blob"
            (out_path.parent / file).write_bytes(payload)
            attrs["ep_cache_context"] = file
        ep_nodes.append(helper.make_node("EPContext", inputs, outputs, name=name, domain="com.microsoft", **attrs))
        gone.update(id(n) for n in group)
    kept = [n for n in nodes if id(n) not in gone] + ep_nodes
    del model.graph.node[:]
    model.graph.node.extend(topological(kept))
    read = {name for n in model.graph.node for name in node_inputs(n)}
    weights = [t for t in model.graph.initializer if t.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(weights)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, out_path)
    return payloads


def openvino_groups(path: Path) -> list[list[int]]:
    """Node positions of the groups OVEP would take (those ``annotate --auto openvino`` scopes)."""
    model = onnx.load(path, load_external_data=False)
    nodes = list(model.graph.node)  # alive: the ids below are those of these wrappers
    position = {id(n): i for i, n in enumerate(nodes)}
    groups = convex_groups(model, BACKENDS["openvino"].supports)
    return [[position[id(n)] for n in g] for g in groups if len(g) >= 2 and boundary(model, g)[1]]


# --------------------------------------------------------------------------- a small model, one partition


@pytest.fixture
def mlp(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(plain_model(), source)
    return source, [[0, 1, 2]]  # MatMul, Relu, MatMul: what OVEP would take


@pytest.mark.parametrize("embed_mode", [1, 0])
def test_imported_model_runs_the_source_graph_and_keeps_the_payload(mlp, tmp_path, embed_mode):
    source, partitions = mlp
    epctx = tmp_path / "model_ctx.onnx"
    payload = make_epcontext(source, partitions, epctx, embed_mode=embed_mode)[0]
    out = tmp_path / "imported" / "model.onnx"
    results = context.import_epcontext(source, epctx, out)
    assert [(r.scope, r.nodes, r.backend, r.backend_version) for r in results] == \
        [(f"{OVEP}_OpenVINO-EP-subgraph_1_0", 3, BACKEND, openvino.get_version())]

    manifest = context.read_manifest(onnx.load(out))
    scope = manifest.scopes[results[0].scope]
    assert (scope.inputs, scope.outputs, scope.nodes) == (["x"], ["m"], 3)
    assert [n.name for n in onnx.load(out).graph.node if context.SCOPE_KEY in {p.key for p in n.metadata_props}] == \
        ["mm1", "relu", "mm2"]
    blob = scope.blobs[0]
    assert (blob.format, blob.size, blob.sha256) == ("onnxruntime.epcontext", len(payload),
                                                     hashlib.sha256(payload).hexdigest())
    assert (out.parent / blob.path).read_bytes() == payload
    assert blob.options["source"] == OVEP and blob.options["embed_mode"] == embed_mode
    assert blob.options["inputs"] == ["x"] and blob.options["outputs"] == ["m"]

    report = context.check(out)
    assert report.ok, report.problems()  # a valid file ...
    assert f"has no {OVEP}" in report.blobs[0].usable_here  # ... whose blob this machine lacks
    table = context.inspect(out)
    assert BACKEND in table and "onnxruntime.epcontext" in table and f"has no {OVEP}" in table

    with pytest.warns(context.ContextWarning, match=f"has no {OVEP}"):
        session = context.load(out)
    assert session.choices[results[0].scope].runner == "original"
    want = ort_session(onnx.load(source)).run(None, FEEDS)
    np.testing.assert_allclose(session.run(None, FEEDS)[0], want[0], atol=1e-6)
    np.testing.assert_allclose(ort_session(onnx.load(out)).run(None, FEEDS)[0], want[0], atol=1e-6)  # stock ORT

    context.strip(out, source.parent / "stripped.onnx")
    assert onnx.load(source.parent / "stripped.onnx").SerializeToString() == onnx.load(source).SerializeToString()


def test_an_embedded_import_and_the_cli(mlp, tmp_path, capsys):
    source, partitions = mlp
    epctx = tmp_path / "model_ctx.onnx"
    make_epcontext(source, partitions, epctx)
    out = tmp_path / "cli" / "model.onnx"
    assert main(["context", "import-epcontext", str(source), str(epctx), str(out), "--embed"]) == 0
    assert "scope OpenVINOExecutionProvider_OpenVINO-EP-subgraph_1_0 (3 source nodes)" in capsys.readouterr().out
    blob = next(iter(context.read_manifest(onnx.load(out)).scopes.values())).blobs[0]
    assert blob.data and blob.path is None and not (tmp_path / "cli" / "model.context").exists()
    assert main(["context", "inspect", str(out)]) == 0
    assert BACKEND in capsys.readouterr().out
    assert main(["context", "import-epcontext", str(source), str(source), str(out)]) == 2  # no EPContext node


@pytest.mark.filterwarnings("ignore:Specified provider")  # onnxruntime's own, about the pretended provider
def test_with_the_provider_present_the_node_is_rebuilt_and_a_refusal_falls_back(mlp, tmp_path, monkeypatch):
    """This onnxruntime has no OpenVINO EP: pretend it has, so the loader takes the blob, rebuilds
    the EPContext node and asks onnxruntime for a session on that provider; it refuses, and the
    scope runs its original nodes, with a warning (never silently)."""
    import onnxruntime

    source, partitions = mlp
    epctx = tmp_path / "model_ctx.onnx"
    make_epcontext(source, partitions, epctx)
    out = tmp_path / "imported" / "model.onnx"
    context.import_epcontext(source, epctx, out)
    real = onnxruntime.get_available_providers
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: real() + [OVEP])
    assert context.check(out).blobs[0].ok  # now usable here, as far as onnxgen can tell
    with pytest.warns(context.ContextWarning, match=f"{BACKEND} blob not used"):
        session = context.load(out, ["onnxruntime-ep"])
    choice = next(iter(session.choices.values()))
    assert choice.runner == "original" and choice.skipped[0].startswith(BACKEND)
    # the rebuilt node passed onnxruntime's EPContext schema; no provider took it, and the CPU may not
    assert "fallback to CPU EP has been explicitly disabled" in choice.skipped[0]
    np.testing.assert_allclose(session.run(None, FEEDS)[0], ort_session(onnx.load(source)).run(None, FEEDS)[0],
                               atol=1e-6)


def _escape(epctx, folder):
    model = onnx.load(epctx)
    node = next(n for n in model.graph.node if n.op_type == "EPContext")
    for a in node.attribute:
        if a.name == "embed_mode":
            a.i = 0
        if a.name == "ep_cache_context":
            a.s = b"../model.onnx"
    onnx.save(model, epctx)


def _rename_output(epctx, folder):
    model = onnx.load(epctx)
    node = next(n for n in model.graph.node if n.op_type == "EPContext")
    node.output[0] = "m_renamed"
    next(n for n in model.graph.node if "m" in n.input).input[0] = "m_renamed"
    onnx.save(model, epctx)


def _drop_input(epctx, folder):  # a node that reads less than the partition needs
    model = onnx.load(epctx)
    node = next(n for n in model.graph.node if n.op_type == "EPContext")
    node.input[0] = ""
    onnx.save(model, epctx)


def _no_source(epctx, folder):
    model = onnx.load(epctx)
    node = next(n for n in model.graph.node if n.op_type == "EPContext")
    keep = [a for a in node.attribute if a.name != "source"]
    del node.attribute[:]
    node.attribute.extend(keep)
    onnx.save(model, epctx)


@pytest.mark.parametrize("change, message", [
    (_escape, "climbs out"),
    (_rename_output, "made by no node of the source model"),
    (_drop_input, "read 'x', which is not among the node's inputs"),
    (_no_source, "no 'source' attribute"),
], ids=["context file out of the folder", "another model", "inputs do not match", "no source"])
def test_what_cannot_be_matched_or_is_unsafe_is_refused(mlp, tmp_path, change, message):
    source, partitions = mlp
    epctx = tmp_path / "model_ctx.onnx"
    make_epcontext(source, partitions, epctx)
    change(epctx, tmp_path)
    out = tmp_path / "imported" / "model.onnx"
    with pytest.raises(context.ContextError, match=message):
        context.import_epcontext(source, epctx, out)
    assert not out.exists()


# --------------------------------------------------------------------------- an exported decoder, many partitions


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("epcontext")
    write_checkpoint(root / "ckpt", "llama")
    folder = build(root / "ckpt", root / "llama")
    model = onnx.load(folder / "model.onnx")
    feeds = prefill_feeds(model)
    return folder / "model.onnx", feeds, ort_session(model).run(None, feeds)


def test_a_decoder_with_several_partitions_in_context_files(llama, tmp_path):
    source, feeds, want = llama
    groups = openvino_groups(source)
    assert len(groups) >= 3
    epctx = tmp_path / "ctx" / "model_ctx.onnx"
    epctx.parent.mkdir()
    payloads = make_epcontext(source, groups, epctx, embed_mode=0)
    out = tmp_path / "imported" / "model.onnx"  # another folder: the weights are copied along
    results = context.import_epcontext(source, epctx, out)
    name = f"{OVEP}_OpenVINO-EP-subgraph_{{}}_0".format
    assert {r.scope: r.nodes for r in results} == {name(i + 1): len(g) for i, g in enumerate(groups)}
    assert context.check(out).ok
    manifest = context.read_manifest(onnx.load(out, load_external_data=False))
    assert {n: s.blobs[0].sha256 for n, s in manifest.scopes.items()} == \
        {name(i + 1): hashlib.sha256(p).hexdigest() for i, p in enumerate(payloads)}
    assert context.inspect(out).count(BACKEND) == len(groups)
    with pytest.warns(context.ContextWarning):
        session = context.load(out)
    assert {c.runner for c in session.choices.values()} == {"original"}
    assert_outputs_equal(session.run(None, feeds), want)
    context.strip(out, tmp_path / "imported" / "plain.onnx")
    plain, original = onnx.load(tmp_path / "imported" / "plain.onnx"), onnx.load(source)
    assert plain.graph.node == original.graph.node
    assert [onnx.numpy_helper.to_array(t).tobytes() for t in plain.graph.initializer] == \
        [onnx.numpy_helper.to_array(t).tobytes() for t in original.graph.initializer]


def test_imported_blobs_join_a_context_with_other_backends(llama, tmp_path):
    """Import into a model annotated and compiled for OpenVINO from the same groups: each scope then
    has two blobs; with the EP missing the loader takes the OpenVINO blob, one file, two backends."""
    source, feeds, want = llama
    folder = tmp_path / "model"
    folder.mkdir()
    for f in source.parent.iterdir():
        if f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    path = folder / "model.onnx"
    scopes = context.annotate(path, backend="openvino")
    assert not any(r.error for r in context.compile(path, "openvino"))
    epctx = tmp_path / "model_ctx.onnx"
    make_epcontext(path, openvino_groups(path), epctx, embed_mode=1, shared=True)
    results = context.import_epcontext(path, epctx, path)
    assert all(r.reused_scope for r in results) and {r.scope for r in results} == set(scopes)
    manifest = context.read_manifest(onnx.load(path, load_external_data=False))
    for s in manifest.scopes.values():
        assert [b.backend for b in s.blobs] == ["openvino", BACKEND]
    ep_blobs = [s.blobs[1] for s in manifest.scopes.values()]
    assert len({b.path for b in ep_blobs}) == 1  # one shared context, written once
    assert [b.options["main_context"] for b in ep_blobs] == [1] + [0] * (len(ep_blobs) - 1)
    assert context.check(path).ok
    with pytest.warns(context.ContextWarning, match=f"has no {OVEP}"):
        session = context.load(path, ["onnxruntime-ep", "openvino"])
    assert {c.runner for c in session.choices.values()} == {"openvino"}
    assert_outputs_equal(session.run(None, feeds), want, 1e-5, 1e-4)
