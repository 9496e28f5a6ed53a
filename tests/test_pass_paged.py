"""onnxgen.passes.paged on decoders exported by torch.onnx, against transformers.

Tiny random-weight models (tests/hf_models.py) are exported with a KV cache by torch.onnx
(dynamo) in three forms, converted by the pass and run on onnxruntime with onnxgen's kernels
(caches bound in place): a ragged prefill of three prompts of different lengths, then decode
steps for all three in one batch.  Each step's logits (last token of each sequence) match
transformers' forward pass over the whole sequence within 1e-4 (abs and rel, fp32, logits of
order 1).  The forms:

- ``attention23``: Llama, ``torch.onnx.export(dynamo=True, opset_version=23)``: ``Attention``
  nodes, RMSNormalization and RotaryEmbedding ops; optimum's names (past_key_values.N.key,
  present.N.key);
- ``matmul_softmax``: Mistral with a sliding window, opset 18: sdpa decomposed into
  MatMul–Softmax(–IsNaN guard)–MatMul, the window only in the mask (found by the pass's probe);
- ``transformers``: Qwen3 (q/k norm) through transformers' own ONNX exporter (opset 20, its names
  input.past_key_values.layers.N.keys, the fully-masked-row guard after attention).
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch

from onnxgen.passes import paged
from onnxgen.passes.paged import PagedConversionError

from hf_models import tiny_checkpoint
from torch_export import (BLOCK, PagedRunner, assert_prefill_and_decode_match, export_torch_onnx,
                          export_transformers)


FORMS = {"attention23": ("llama", 23), "matmul_softmax": ("mistral", 18), "transformers": ("qwen3", 20)}


@pytest.fixture(scope="module", params=sorted(FORMS))
def exported(request, tmp_path_factory):
    family, opset = FORMS[request.param]
    hf = tiny_checkpoint(family, tmp_path_factory.mktemp(family), 1234)
    source = export_transformers(hf) if request.param == "transformers" else export_torch_onnx(hf, opset)
    return request.param, hf, source


def test_prefill_and_decode_match_transformers(exported, rng):
    form, hf, source = exported
    model = paged(source, block_size=BLOCK)
    onnx.checker.check_model(model, full_check=True)
    names = [i.name for i in model.graph.input]
    assert names[:6] == ["input_ids", "position_ids", "cumulative_sequence_length", "past_seqlens", "block_table",
                         "slot_mapping"]
    assert names[6:] == [f"{k}_cache.{i}" for i in range(2) for k in ("key", "value")]
    assert [o.name for o in model.graph.output] == ["logits"] + [f"{k}_cache_out.{i}" for i in range(2)
                                                                 for k in ("key", "value")]
    kinds = {n.op_type for n in model.graph.node}
    assert "Softmax" not in kinds and "Attention" not in kinds and "PagedAttention" in kinds
    windows = {a.i for n in model.graph.node if n.op_type == "PagedAttention" for a in n.attribute
               if a.name == "local_window_size"}
    assert windows == ({hf.config.sliding_window - 1} if form == "matmul_softmax" else {-1})

    assert_prefill_and_decode_match(model, hf, rng, what=form)


@pytest.mark.parametrize("exported", ["attention23"], indirect=True)  # one form is enough here
def test_all_logits_and_expanded_path(exported, rng):
    """all_logits=True: one row per new token; run through the expansion pass (no kernels)."""
    form, hf, source = exported
    model = paged(source, all_logits=True)
    prompts = [list(map(int, rng.integers(0, 97, n))) for n in (4, 2)]
    logits = PagedRunner(model, 8, 2, use_kernels=False).step(prompts, [0, 0])
    with torch.no_grad():
        want = np.concatenate([hf(torch.tensor([p])).logits[0].numpy() for p in prompts])
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


def _rename_input(model: onnx.ModelProto, old: str, new: str) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in model.graph.input:
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
    return model


@pytest.mark.parametrize("exported", ["matmul_softmax"], indirect=True)  # one form is enough here
def test_unsupported_graphs_are_clear_errors(exported):
    form, _, source = exported
    with pytest.raises(PagedConversionError, match="layer 0 has a past value but no past key"):
        paged(_rename_input(source, "past_key_values.0.key", "k0"))
    no_past = source
    for name in ("past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"):
        no_past = _rename_input(no_past, name, name.replace("past_key_values", "kv"))
    with pytest.raises(PagedConversionError, match="no past key/value inputs"):
        paged(no_past)
    with pytest.raises(PagedConversionError, match="no 'position_ids' input: its positions come from the past"):
        paged(_rename_input(source, "position_ids", "positions"))
    broken = onnx.ModelProto.FromString(source.SerializeToString())
    for node in broken.graph.node:
        if node.op_type == "Softmax":
            node.op_type = "LogSoftmax"
    with pytest.raises(PagedConversionError, match=re.escape("attention of layer(s) [0, 1] was not matched")):
        paged(broken)
    # A bidirectional mask: the mask's comparison of key and query positions always true.
    bidirectional = onnx.ModelProto.FromString(source.SerializeToString())
    for node in bidirectional.graph.node:
        if node.op_type == "LessOrEqual":
            node.input[1] = node.input[0]
    with pytest.raises(PagedConversionError, match="the attention mask is not causal"):
        paged(bidirectional)


@pytest.mark.parametrize("exported", ["attention23"], indirect=True)  # one form is enough here
def test_cli_convert(exported, tmp_path):
    form, _, source = exported
    from onnxgen.cli import main

    onnx.save(source, tmp_path / "decoder.onnx")
    assert main(["convert", str(tmp_path / "decoder.onnx"), str(tmp_path / "paged.onnx"), "--block-size", "8"]) == 0
    model = onnx.load(tmp_path / "paged.onnx")
    assert [i.name for i in model.graph.input][:6] == ["input_ids", "position_ids", "cumulative_sequence_length",
                                                       "past_seqlens", "block_table", "slot_mapping"]
    assert model.graph.input[6].type.tensor_type.shape.dim[1].dim_value == 8
    assert main(["convert", str(tmp_path / "paged.onnx"), str(tmp_path / "again.onnx")]) == 2  # no past inputs


@pytest.mark.parametrize("exported", ["attention23"], indirect=True)  # one form is enough here
def test_converted_model_folder_serves_like_transformers(exported, tmp_path, rng):
    """onnxgen convert to a folder (onnxgen.json from the signature and the source's config): the
    engine's greedy tokens for a batch of prompts equal transformers' generate."""
    form, hf, source = exported
    from hf_models import assert_greedy_matches
    from onnxgen.cli import main
    from onnxgen.engine import LLMEngine, SamplingParams

    hf.save_pretrained(tmp_path / "hf")
    onnx.save(source, tmp_path / "decoder.onnx")
    assert main(["convert", str(tmp_path / "decoder.onnx"), str(tmp_path / "served"), "--block-size", "4",
                 "--source", str(tmp_path / "hf")]) == 0
    engine = LLMEngine(tmp_path / "served", max_num_batched_tokens=7)
    assert engine.max_model_len == hf.config.max_position_embeddings
    prompts = [list(map(int, rng.integers(3, 97, n))) for n in (6, 2, 9)]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))
    for prompt, output in zip(prompts, outputs):
        assert_greedy_matches(hf, prompt, output.token_ids)
