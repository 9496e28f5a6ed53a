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
import warnings

import numpy as np
import onnx
import pytest
import torch

from onnxgen.backends.ort import session
from onnxgen.passes import paged
from onnxgen.passes.paged import PagedConversionError

from hf_models import tiny_checkpoint

BLOCK = 4
FORMS = {"attention23": ("llama", 23), "matmul_softmax": ("mistral", 18), "transformers": ("qwen3", 20)}


class _WithCache(torch.nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *presents), flat tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()  # full layers: a sliding-window layer would truncate the past it is given
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])


def _sample_inputs(hf, batch=2, seq=3, past=4):
    config = hf.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return dict(
        input_ids=torch.randint(0, config.vocab_size, (batch, seq)),
        attention_mask=torch.ones(batch, past + seq, dtype=torch.long),
        position_ids=torch.arange(past, past + seq)[None].repeat(batch, 1),
        past=[torch.randn(batch, kv_heads, past, head_dim) for _ in range(2 * layers)],
    )


def export_torch_onnx(hf, opset: int) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) with optimum's input and output names."""
    sample = _sample_inputs(hf)
    layers = len(sample["past"]) // 2
    names = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
               tuple({0: batch, 2: past} for _ in sample["past"]))
    args = (sample["input_ids"], sample["attention_mask"], sample["position_ids"], *sample["past"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_WithCache(hf).eval(), args, input_names=names, output_names=outputs,
                                    dynamic_shapes=dynamic, opset_version=opset, dynamo=True, verbose=False)
    return program.model_proto


def export_transformers(hf) -> onnx.ModelProto:
    """transformers' own exporter (torch.onnx underneath), with a DynamicCache as the past."""
    import onnx_ir as ir
    from transformers.exporters.exporter_onnx import OnnxConfig, OnnxExporter

    sample = _sample_inputs(hf)
    with torch.no_grad():
        cache = hf(torch.randint(0, hf.config.vocab_size, (2, 4)), use_cache=True).past_key_values
    inputs = dict(input_ids=sample["input_ids"], attention_mask=sample["attention_mask"],
                  position_ids=sample["position_ids"], past_key_values=cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = OnnxExporter().export(hf, inputs, config=OnnxConfig(dynamic=True))
    return ir.serde.serialize_model(exported.program)


@pytest.fixture(scope="module", params=sorted(FORMS))
def exported(request, tmp_path_factory):
    family, opset = FORMS[request.param]
    hf = tiny_checkpoint(family, tmp_path_factory.mktemp(family), 1234)
    source = export_transformers(hf) if request.param == "transformers" else export_torch_onnx(hf, opset)
    return request.param, hf, source


class PagedRunner:
    """The application side, minimal: one block-table row per sequence, slots from positions."""

    def __init__(self, model: onnx.ModelProto, max_len: int, batch: int, **session_args):
        self.s = session(model, **session_args)
        blocks_per_seq = -(-max_len // BLOCK)
        num_blocks = batch * blocks_per_seq + 3
        order = np.random.default_rng(0).permutation(num_blocks)
        self.table = order[: batch * blocks_per_seq].reshape(batch, blocks_per_seq).astype(np.int32)
        for cache in model.graph.input:
            if "_cache." in cache.name:
                dims = [d.dim_value for d in cache.type.tensor_type.shape.dim]
                self.s.set_cache(cache.name, np.zeros((num_blocks, BLOCK, *dims[2:]), np.float32))

    def step(self, new_tokens: list[list[int]], past: list[int]) -> np.ndarray:
        ids, positions, slots = [], [], []
        for b, (tokens, p) in enumerate(zip(new_tokens, past)):
            for j, token in enumerate(tokens):
                ids.append(token)
                positions.append(p + j)
                slots.append(int(self.table[b, (p + j) // BLOCK]) * BLOCK + (p + j) % BLOCK)
        return self.s.run({
            "input_ids": np.array(ids, np.int64), "position_ids": np.array(positions, np.int64),
            "cumulative_sequence_length": np.concatenate([[0], np.cumsum([len(t) for t in new_tokens])]).astype(np.int32),
            "past_seqlens": np.array(past, np.int32), "block_table": self.table,
            "slot_mapping": np.array(slots, np.int32),
        })["logits"]


def _transformers_last_logits(hf, sequences):
    with torch.no_grad():
        return np.stack([hf(torch.tensor([s])).logits[0, -1].numpy() for s in sequences])


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

    prompts = [list(map(int, rng.integers(0, 97, n))) for n in (5, 11, 3)]
    steps = 4
    runner = PagedRunner(model, max(map(len, prompts)) + steps, len(prompts))
    sequences, past, new = [list(p) for p in prompts], [0, 0, 0], [list(p) for p in prompts]
    for step in range(steps + 1):
        logits = runner.step(new, past)
        want = _transformers_last_logits(hf, sequences)
        np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4, err_msg=f"{form}, step {step}")
        chosen = [int(w.argmax()) for w in want]
        past = [len(s) for s in sequences]
        new = [[c] for c in chosen]
        for s, c in zip(sequences, chosen):
            s.append(c)


def test_all_logits_and_expanded_path(exported, rng):
    """all_logits=True: one row per new token; run through the expansion pass (no kernels)."""
    form, hf, source = exported
    if form != "attention23":
        pytest.skip("one form is enough for this path")
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


def test_unsupported_graphs_are_clear_errors(exported):
    form, _, source = exported
    if form != "matmul_softmax":
        pytest.skip("one form is enough for the errors")
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
