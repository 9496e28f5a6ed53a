"""Decoders exported with a KV cache by torch.onnx, and a minimal paged runner: shared by the
tests of onnxgen.passes.paged and onnxgen.passes.fuse_moe."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import torch

from onnxgen.backends.ort import session

BLOCK = 4


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


def transformers_last_logits(hf, sequences):
    with torch.no_grad():
        return np.stack([hf(torch.tensor([s])).logits[0, -1].numpy() for s in sequences])




def assert_prefill_and_decode_match(model: onnx.ModelProto, hf, rng, steps: int = 4, tol: float = 1e-4,
                                    what: str = "") -> None:
    """A ragged prefill of three prompts (5, 11, 3 tokens) and ``steps`` decode steps for all three
    together; each step's last-token logits equal transformers' forward pass within ``tol``."""
    prompts = [list(map(int, rng.integers(0, hf.config.vocab_size, n))) for n in (5, 11, 3)]
    runner = PagedRunner(model, max(map(len, prompts)) + steps, len(prompts))
    sequences, past, new = [list(p) for p in prompts], [0, 0, 0], [list(p) for p in prompts]
    for step in range(steps + 1):
        logits = runner.step(new, past)
        want = transformers_last_logits(hf, sequences)
        np.testing.assert_allclose(logits, want, rtol=tol, atol=tol, err_msg=f"{what}, step {step}")
        chosen = [int(w.argmax()) for w in want]  # follow transformers' choices
        past = [len(s) for s in sequences]
        new = [[c] for c in chosen]
        for s, c in zip(sequences, chosen):
            s.append(c)
