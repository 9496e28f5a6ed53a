"""onnxgen.context end to end on exported decoder models (tiny random Llama and Mixtral, written
with numpy: no torch): annotate, compile per backend, load, run.

Oracle: the plain model (the exporter's output, untouched) on onnxruntime with onnxgen's kernels,
one session.  Tolerances: blobs of onnxruntime and the original-node fallback run the same
kernels on the same graph pieces, so atol 1e-6; OpenVINO computes in float32 (its precision hint
is recorded in the blob) with its own kernels: atol 1e-5, rtol 1e-4.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import onnx
import pytest
from safetensors.numpy import save_file

from onnxgen import context
from onnxgen.context.backends import ort_session
from onnxgen.context.format import boundary, scope_nodes
from onnxgen.export.llm import build

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS, LAYERS, EXPERTS = 48, 80, 97, 4, 2, 2, 4


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    """context.load's cache of verified hashes in a folder of the test's own, not ~/.cache."""
    monkeypatch.setenv("ONNXGEN_CACHE", str(tmp_path / "cache"))


def write_checkpoint(folder, family: str, seed: int = 0) -> None:
    """A random-weight Llama or Mixtral checkpoint in Hugging Face's layout (config + safetensors)."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    config = {"architectures": ["LlamaForCausalLM" if family == "llama" else "MixtralForCausalLM"],
              "model_type": family, "hidden_size": HIDDEN, "intermediate_size": INTER, "vocab_size": VOCAB,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "num_hidden_layers": LAYERS,
              "head_dim": head_dim, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "hidden_act": "silu",
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2}
    if family == "mixtral":
        config.update(num_local_experts=EXPERTS, num_experts_per_tok=2)

    def w(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {"model.embed_tokens.weight": w(VOCAB, HIDDEN, scale=1.0), "lm_head.weight": w(VOCAB, HIDDEN),
               "model.norm.weight": rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights.update({p + "input_layernorm.weight": rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32),
                        p + "post_attention_layernorm.weight": rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32),
                        p + "self_attn.q_proj.weight": w(HEADS * head_dim, HIDDEN),
                        p + "self_attn.k_proj.weight": w(KV_HEADS * head_dim, HIDDEN),
                        p + "self_attn.v_proj.weight": w(KV_HEADS * head_dim, HIDDEN),
                        p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * head_dim)})
        if family == "llama":
            weights.update({p + "mlp.gate_proj.weight": w(INTER, HIDDEN), p + "mlp.up_proj.weight": w(INTER, HIDDEN),
                            p + "mlp.down_proj.weight": w(HIDDEN, INTER)})
        else:
            weights[p + "block_sparse_moe.gate.weight"] = w(EXPERTS, HIDDEN, scale=0.6)
            for e in range(EXPERTS):
                q = f"{p}block_sparse_moe.experts.{e}."
                weights.update({q + "w1.weight": w(INTER, HIDDEN), q + "w2.weight": w(HIDDEN, INTER),
                                q + "w3.weight": w(INTER, HIDDEN)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, str(folder / "model.safetensors"))


def prefill_feeds(model: onnx.ModelProto, tokens: int = 7, seed: int = 1) -> dict[str, np.ndarray]:
    """One sequence of ``tokens`` prompt tokens on a fresh paged cache of 4 blocks of 4."""
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, VOCAB, tokens), "position_ids": np.arange(tokens),
             "cumulative_sequence_length": np.array([0, tokens], np.int32), "past_seqlens": np.array([0], np.int32),
             "block_table": np.array([[2, 0]], np.int32),
             "slot_mapping": np.array([8 + t if t < 4 else t - 4 for t in range(tokens)], np.int32)}
    for i in model.graph.input:
        if "cache" in i.name:
            feeds[i.name] = rng.standard_normal((4, 4, KV_HEADS, HIDDEN // HEADS)).astype(np.float32)
    return feeds


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{family: (model folder, feeds, the plain model's outputs)}."""
    root = tmp_path_factory.mktemp("context")
    out = {}
    for family in ("llama", "mixtral"):
        write_checkpoint(root / f"{family}-ckpt", family)
        folder = build(root / f"{family}-ckpt", root / family)
        model = onnx.load(folder / "model.onnx")
        feeds = prefill_feeds(model)
        want = ort_session(model).run(None, feeds)
        out[family] = (folder, feeds, want)
    return out


def copy(folder, tmp_path):
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target / "model.onnx"


def assert_outputs_equal(got, want, atol=1e-6, rtol=0.0):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=atol, rtol=rtol)


def test_openvino_and_onnxruntime_blobs_equal_the_plain_model(exported, tmp_path):
    folder, feeds, want = exported["llama"]
    path = copy(folder, tmp_path)
    scopes = context.annotate(path, backend="openvino")
    assert len(scopes) >= 3  # before layer 0's attention, between the layers, after the last
    assert not any(r.error for r in context.compile(path, "openvino"))
    assert not any(r.error for r in context.compile(path, "onnxruntime", embed=True))
    assert context.check(path).ok
    # the export keeps its weights in model.onnx.data: the OpenVINO blobs of scopes that read some
    # read them from there (weightless); a scope of small embedded constants only has a full blob
    model = onnx.load(path, load_external_data=False)
    external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    groups = scope_nodes(model)
    for name, scope in context.read_manifest(model).scopes.items():
        reads_external = bool(external.intersection(boundary(model, groups[name])[2]))
        assert [b.format for b in scope.blobs if b.backend == "openvino"] == \
            ["openvino.compiled_model.weightless" if reads_external else "openvino.compiled_model"]
    for backends, atol, rtol in ((["openvino"], 1e-5, 1e-4), (["onnxruntime"], 1e-6, 0.0),
                                 (["onnxruntime", "openvino"], 1e-6, 0.0), ([], 1e-6, 0.0)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", context.ContextWarning)  # every blob valid: nothing falls back
            session = context.load(path, backends)
        expected = backends[0] if backends else "original"
        assert {c.runner for c in session.choices.values()} == {expected}, session.plan
        assert_outputs_equal(session.run(None, feeds), want, atol, rtol)
    # the plain model is untouched by the context: stock onnxruntime runs the annotated file as is
    assert_outputs_equal(ort_session(onnx.load(path)).run(None, feeds), want)


def test_a_mix_of_backends_per_scope(exported, tmp_path):
    folder, feeds, want = exported["llama"]
    path = copy(folder, tmp_path)
    names = list(context.annotate(path, backend="openvino"))
    context.compile(path, "openvino", scopes=names[::2])
    context.compile(path, "onnxruntime", scopes=names[1::2])
    session = context.load(path)
    runners = [session.choices[n].runner for n in names]
    assert runners == ["openvino" if i % 2 == 0 else "onnxruntime" for i in range(len(names))]
    assert_outputs_equal(session.run(None, feeds), want, 1e-5, 1e-4)


def test_moe_scopes_on_the_kernel_library_need_the_native_code_opt_in(exported, tmp_path):
    folder, feeds, want = exported["mixtral"]
    path = copy(folder, tmp_path)
    scopes = context.annotate(path, op_types=["MoE"])
    assert len(scopes) == LAYERS and all(s.nodes == 1 for s in scopes.values())
    results = context.compile(path, "onnxgen-kernels")
    assert [r.error for r in results] == [None] * LAYERS
    blob = context.read_manifest(onnx.load(path, load_external_data=False)).scopes["MoE_0"].blobs[0]
    assert blob.native_code and blob.format == "onnxgen.kernels.library"
    with pytest.warns(context.ContextWarning, match="allow_native_code"):
        refused = context.load(path)
    assert {c.runner for c in refused.choices.values()} == {"original"}
    assert_outputs_equal(refused.run(None, feeds), want)
    allowed = context.load(path, allow_native_code=True)
    assert {c.runner for c in allowed.choices.values()} == {"onnxgen-kernels"}
    assert_outputs_equal(allowed.run(None, feeds), want)


def test_a_blob_that_fails_to_run_falls_back_with_a_warning(exported, tmp_path):
    folder, feeds, want = exported["llama"]
    path = copy(folder, tmp_path)
    context.annotate(path, backend="openvino")
    context.compile(path, "onnxruntime")
    session = context.load(path)
    step = next(s for s in session.steps if s.scope is not None)

    def broken(feeds):
        raise RuntimeError("device lost")

    step.runner = broken
    with pytest.warns(context.ContextWarning, match="failed to run.*device lost"):
        got = session.run(None, feeds)
    assert_outputs_equal(got, want)
    assert session.choices[step.scope].runner == "original"
    assert_outputs_equal(session.run(None, feeds), want)  # and stays on the original nodes


def test_strip_gives_back_the_original_graph(exported, tmp_path):
    folder, _, _ = exported["mixtral"]
    path = copy(folder, tmp_path)
    original = onnx.load(path, load_external_data=False)
    context.annotate(path, backend="onnxruntime")
    context.compile(path, "onnxruntime", embed=True)
    assert context.read_manifest(onnx.load(path, load_external_data=False)) is not None
    context.strip(path, path.parent / "plain.onnx")  # same folder: same external-data references
    plain = onnx.load(path.parent / "plain.onnx", load_external_data=False)
    assert plain.SerializeToString() == original.SerializeToString()
    context.strip(path, tmp_path / "elsewhere" / "plain.onnx")  # elsewhere: the weights are copied along
    moved, source = onnx.load(tmp_path / "elsewhere" / "plain.onnx"), onnx.load(path.parent / "plain.onnx")
    assert len(moved.graph.node) == len(source.graph.node)
    assert moved.graph.node == source.graph.node
    assert [onnx.numpy_helper.to_array(t).tobytes() for t in moved.graph.initializer] == \
        [onnx.numpy_helper.to_array(t).tobytes() for t in source.graph.initializer]


def test_cli(exported, tmp_path, capsys):
    from onnxgen.cli import main

    folder, feeds, want = exported["llama"]
    path = copy(folder, tmp_path)
    out = str(tmp_path / folder.name / "annotated.onnx")
    assert main(["context", "annotate", str(path), "--auto", "openvino", "-o", out]) == 0
    assert main(["context", "compile", out, "--backend", "openvino"]) == 0
    assert main(["context", "inspect", out]) == 0
    table = capsys.readouterr().out
    assert "openvino.compiled_model" in table and "usable" in table
    assert main(["context", "check", out]) == 0
    assert main(["context", "compile", out, "--backend", "onnxgen-kernels"]) == 1  # no onnxgen op in the scopes
    names = [n.name for n in onnx.load(path, load_external_data=False).graph.node if n.op_type == "PagedAttention"]
    assert main(["context", "annotate", str(path), "--nodes", f"attn={names[0]}", "-o", out]) == 0
    assert main(["context", "compile", out, "--backend", "onnxruntime"]) == 0
    assert_outputs_equal(context.load(out).run(None, feeds), want)
    assert main(["context", "strip", out, "-o", str(tmp_path / "plain.onnx")]) == 0
