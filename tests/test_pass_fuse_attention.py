"""onnxgen.passes.fuse_attention: torch's MatMul-Softmax-MatMul attention -> ONNX Attention (opset 23).

On a tiny random SD-style checkpoint exported without the fusion (``onnxgen export-diffusion
--no-fuse-attention``), the fused text encoder, UNet and VAE decoder give the unfused model's
outputs on onnxruntime at shapes other than the traced ones (max abs difference ≤ 1e-5; outputs of
order 1), in the 3-D and the 4-D form, and hold one Attention node per attention module and no
Softmax.  On hand-built graphs: a mask whose shape fits ``attn_mask`` is passed as one (same
outputs); a mask that does not (a [B, 1, 1, L] padding mask), a Softmax that is not over the last
axis, a dynamic scale on the scores and broadcast batch are left alone.  test_text2image.py checks
the default (fused) export against diffusers.  The dynamo exporter's UNet and VAE (its kᵀ through a
3-D reshape round trip) are fused and checked the same way.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")

from onnxgen.cli import main  # noqa: E402
from onnxgen.export.diffusion import TINY_CONFIG, load_components, up_to_date, write_random_checkpoint  # noqa: E402
from onnxgen.passes import fuse_attention  # noqa: E402

TOLERANCE = 1e-5  # max abs difference, fused vs unfused, on outputs of order 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd-fuse") / "checkpoint"
    write_random_checkpoint(folder, TINY_CONFIG, seed=11)
    return folder


@pytest.fixture(scope="module")
def unfused(checkpoint):
    out = checkpoint.parent / "unfused"
    assert main(["export-diffusion", str(checkpoint), str(out), "--no-fuse-attention"]) == 0
    return out


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _run(model: onnx.ModelProto | str, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _feeds(component: str, rng) -> dict:
    if component == "text_encoder":
        ids = rng.integers(0, 49406, (3, 77))
        ids[:, 0], ids[0, 9], ids[1, 30], ids[2, 76] = 49406, 49407, 49407, 49407
        return {"input_ids": ids}
    if component == "unet":
        return {"sample": rng.standard_normal((3, 4, 6, 10), dtype=np.float32),
                "timestep": np.array([999.0, 421.5, 1.0], np.float32),
                "encoder_hidden_states": rng.standard_normal((3, 77, 32), dtype=np.float32)}
    return {"latent_sample": rng.standard_normal((2, 4, 4, 6), dtype=np.float32)}


def _attention_modules(component: str, modules) -> int:
    from diffusers.models.attention_processor import Attention
    from transformers.models.clip.modeling_clip import CLIPAttention

    text_encoder, unet, vae = modules
    if component == "text_encoder":
        return sum(isinstance(m, CLIPAttention) for m in text_encoder.modules())
    module = unet if component == "unet" else vae.decoder
    return sum(isinstance(m, Attention) for m in module.modules())


@pytest.mark.parametrize("three_d", [True, False], ids=["3d", "4d"])
@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder"])
def test_fused_component_matches_unfused(unfused, checkpoint, component, three_d, rng):
    source = onnx.load(str(unfused / f"{component}.onnx"))
    assert "Attention" not in _ops(source) and _opset(source) == 18
    fused = fuse_attention(source, three_d=three_d)
    expected = _attention_modules(component, load_components(checkpoint))
    assert expected > 0
    assert _ops(fused).count("Attention") == expected
    assert "Softmax" not in _ops(fused)
    assert _opset(fused) == 23
    assert {p.key: p.value for p in fused.metadata_props}["onnxgen.fused_attention"] == str(expected)
    onnx.checker.check_model(fused, full_check=True)
    if three_d and component != "text_encoder":  # diffusers' layout: the attention's transposes are gone
        assert _ops(fused).count("Transpose") == _ops(source).count("Transpose") - 4 * expected
    feeds = _feeds(component, rng)
    for ours, theirs in zip(_run(fused, feeds), _run(str(unfused / f"{component}.onnx"), feeds)):
        assert ours.shape == theirs.shape
        assert np.abs(theirs).max() < 20
        assert np.abs(ours - theirs).max() <= TOLERANCE, np.abs(ours - theirs).max()


@pytest.fixture(scope="module")
def unfused_dynamo(checkpoint):
    from onnxgen.export.diffusion import export_diffusion

    return export_diffusion(checkpoint, checkpoint.parent / "unfused-dynamo", dynamo=True, fuse_attention=False)


@pytest.mark.parametrize("component", ["unet", "vae_decoder"])
def test_fused_dynamo_component_matches_unfused(unfused_dynamo, checkpoint, component, rng):
    """The dynamo exporter writes kᵀ as Reshape(Transpose(Reshape(k))) and constant scales."""
    source = onnx.load(str(unfused_dynamo / f"{component}.onnx"))
    fused = fuse_attention(source)
    assert _ops(fused).count("Attention") == _attention_modules(component, load_components(checkpoint))
    assert "Softmax" not in _ops(fused) and _opset(fused) == 23
    feeds = _feeds(component, rng)
    for ours, theirs in zip(_run(fused, feeds), _run(source, feeds)):
        assert np.abs(ours - theirs).max() <= TOLERANCE, np.abs(ours - theirs).max()


def test_export_records_the_fusion(checkpoint, unfused, tmp_path):
    out = tmp_path / "fused"
    assert main(["export-diffusion", str(checkpoint), str(out)]) == 0
    exporter = json.loads((out / "onnxgen.json").read_text())["exporter"]
    assert exporter["fuse_attention"] is True and exporter["opset"] == 18
    counts = exporter["attention_nodes"]
    assert set(counts) == {"text_encoder", "unet", "vae_decoder"} and all(counts.values())
    for name, count in counts.items():
        model = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        assert _ops(model).count("Attention") == count and _opset(model) == 23
    assert json.loads((unfused / "onnxgen.json").read_text())["exporter"]["fuse_attention"] is False
    assert up_to_date(out) and not up_to_date(out, fuse_attention=False)
    assert up_to_date(unfused, fuse_attention=False) and not up_to_date(unfused)
    assert not up_to_date(tmp_path / "nothing-here")
    # a folder from before the fusion existed: no "fuse_attention" in its manifest
    manifest = json.loads((unfused / "onnxgen.json").read_text())
    del manifest["exporter"]["fuse_attention"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "onnxgen.json").write_text(json.dumps(manifest))
    assert not up_to_date(old) and up_to_date(old, fuse_attention=False)


# Hand-built graphs (opset 18): q, k, v [B, H, S, D] inputs, the exporter's shape of attention.

B, H, S, L, D = 2, 3, 5, 7, 4


def _attention_graph(*, mask_shape=None, softmax_axis=-1, scores_scale_input=False, k_batch=B, k_layout="BHLD"):
    """softmax(q·kᵀ·D^-0.5 [+ mask]) · v with the scale as torch writes it (sqrt on q and on kᵀ)."""
    k_shape = [k_batch, H, L, D] if k_layout == "BHLD" else [k_batch, L, H, D]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", H, "s", D]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, [k_batch if k_batch == 1 else "b", *k_shape[1:]]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, ["b", H, L, D])]
    k_perm = [0, 1, 3, 2] if k_layout == "BHLD" else [0, 2, 3, 1]
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [D ** -0.25])
    nodes = [helper.make_node("Constant", [], ["s"], value=scale),
             helper.make_node("Mul", ["q", "s"], ["qs"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=k_perm),
             helper.make_node("Mul", ["kt", "s"], ["ks"]),
             helper.make_node("MatMul", ["qs", "ks"], ["scores"])]
    scores = "scores"
    if scores_scale_input:
        inputs.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, []))
        nodes.append(helper.make_node("Mul", [scores, "t"], ["scaled"]))
        scores = "scaled"
    if mask_shape is not None:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, mask_shape))
        nodes.append(helper.make_node("Add", [scores, "mask"], ["masked"]))
        scores = "masked"
    nodes += [helper.make_node("Softmax", [scores], ["p"], axis=softmax_axis),
              helper.make_node("MatMul", ["p", "v"], ["o"])]
    output = helper.make_tensor_value_info("o", TensorProto.FLOAT, ["b", H, "s", D])
    graph = helper.make_graph(nodes, "attention", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _graph_feeds(model: onnx.ModelProto, rng) -> dict:
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.dim_value else {"b": B, "s": S}[d.dim_param] for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    mask = feeds.get("mask")
    if mask is not None and mask.ndim >= 2:  # causal-style: -inf above the diagonal, random values elsewhere
        mask[..., np.triu(np.ones(mask.shape[-2:], bool), 1)] = -np.inf
    return feeds


@pytest.mark.parametrize("k_layout", ["BHLD", "BLHD"])
@pytest.mark.parametrize("mask_shape", [None, ["s", L], [H, "s", L], [1, H, "s", L], ["b", 1, "s", L]],
                         ids=["none", "2d", "3d", "4d", "4d-batch"])
def test_masks_that_fit_attn_mask_are_fused(mask_shape, k_layout, rng):
    source = _attention_graph(mask_shape=mask_shape, k_layout=k_layout)
    fused = fuse_attention(source)
    assert _ops(fused).count("Attention") == 1 and "Softmax" not in _ops(fused) and _opset(fused) == 23
    attention = next(n for n in fused.graph.node if n.op_type == "Attention")
    assert len(attention.input) == (3 if mask_shape is None else 4)
    scale = [a.f for a in attention.attribute if a.name == "scale"]
    assert scale == [pytest.approx(D ** -0.5)]
    onnx.checker.check_model(fused, full_check=True)
    feeds = _graph_feeds(source, rng)
    np.testing.assert_allclose(_run(fused, feeds)[0], _run(source, feeds)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", [dict(mask_shape=["b", 1, 1, L]), dict(mask_shape=[L]), dict(softmax_axis=2),
                                  dict(scores_scale_input=True), dict(k_batch=1)],
                         ids=["padding-mask", "1d-mask", "softmax-axis", "dynamic-scores-scale", "broadcast-batch"])
def test_other_patterns_are_left_alone(case, rng, caplog):
    source = _attention_graph(**case)
    with caplog.at_level("WARNING", logger="onnxgen.passes.fuse_attention"):
        result = fuse_attention(source)
    assert _ops(result) == _ops(source) and _opset(result) == 18
    assert {p.key: p.value for p in result.metadata_props}["onnxgen.fused_attention"] == "0"
    assert "0 Attention node(s); 1 other Softmax" in caplog.text
    feeds = _graph_feeds(source, rng)
    np.testing.assert_array_equal(_run(result, feeds)[0], _run(source, feeds)[0])
