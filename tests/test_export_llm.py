"""Exported decoder LLMs against transformers on random weights.

Each family's tiny model is built from a config with seeded random weights, saved as a
checkpoint (safetensors), exported with the paged signature, and run on onnxruntime with the
kernel library: a ragged prefill of three prompts of different lengths, then decode steps for
all three at once.  The logits at every step match transformers' forward pass over the whole
sequence (fp32, 1e-4 abs on logits of order 1), and 32 greedy tokens equal ``generate``'s.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch

from onnxgen.backends.ort import session
from onnxgen.export.llm import build

from hf_models import FAMILIES, tiny_checkpoint  # noqa: E402

BLOCK = 4


class PagedRunner:
    """The application side, minimal: one block table row per sequence, slots from positions."""

    def __init__(self, model_dir, lengths_max: int, batch: int):
        import onnx

        info = json.loads((model_dir / "onnxgen.json").read_text())
        meta = info["architecture"]
        cache_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[info["dtype"]]
        self.s = session(onnx.load(str(model_dir / "model.onnx")))
        blocks_per_seq = -(-lengths_max // BLOCK)
        num_blocks = batch * blocks_per_seq + 3
        order = np.random.default_rng(0).permutation(num_blocks)
        self.table = order[: batch * blocks_per_seq].reshape(batch, blocks_per_seq).astype(np.int32)
        for i in range(meta["num_layers"]):
            for kind in ("key", "value"):
                shape = (num_blocks, BLOCK, meta["kv_heads"], meta["head_dim"])
                self.s.set_cache(f"{kind}_cache.{i}", np.zeros(shape, cache_dtype))

    def step(self, new_tokens: list[list[int]], past: list[int]) -> np.ndarray:
        ids, positions, slots = [], [], []
        for b, (tokens, p) in enumerate(zip(new_tokens, past)):
            for j, token in enumerate(tokens):
                pos = p + j
                ids.append(token)
                positions.append(pos)
                slots.append(int(self.table[b, pos // BLOCK]) * BLOCK + pos % BLOCK)
        lengths = [len(t) for t in new_tokens]
        return self.s.run({
            "input_ids": np.array(ids, np.int64), "position_ids": np.array(positions, np.int64),
            "cumulative_sequence_length": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
            "past_seqlens": np.array(past, np.int32), "block_table": self.table,
            "slot_mapping": np.array(slots, np.int32),
        })["logits"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_and_decode_match_transformers(tmp_path, rng, family):
    hf = tiny_checkpoint(family, tmp_path / "hf", int(rng.integers(1 << 30)))
    out = build(tmp_path / "hf", tmp_path / "onnx", block_size=BLOCK)
    assert (out / "model.onnx.data").exists() and json.loads((out / "onnxgen.json").read_text())["inputs"][0] == "input_ids"
    prompts = [list(rng.integers(0, 97, n)) for n in (5, 11, 3)]
    steps = 4
    runner = PagedRunner(out, max(map(len, prompts)) + steps, len(prompts))
    sequences = [list(p) for p in prompts]
    past = [0, 0, 0]
    new = [list(p) for p in prompts]
    for step in range(steps + 1):
        logits = runner.step(new, past)
        with torch.no_grad():
            want = [hf(torch.tensor([seq])).logits[0, -1].numpy() for seq in sequences]
        np.testing.assert_allclose(logits, np.stack(want), rtol=1e-4, atol=1e-4, err_msg=f"step {step}")
        chosen = [int(w.argmax()) for w in want]  # follow transformers' choices (ties cannot diverge)
        past = [len(seq) for seq in sequences]
        new = [[int(t)] for t in chosen]
        for seq, t in zip(sequences, chosen):
            seq.append(int(t))


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(NotImplementedError, match="architecture .bloom. is not supported; supported: gemma, .*, llama, "):
        build(tmp_path, tmp_path / "out")


def test_broken_weights_file_is_a_clear_error(tmp_path):
    tiny_checkpoint("llama", tmp_path, 1)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        build(tmp_path, tmp_path / "out")


def test_missing_weight_is_named(tmp_path, rng):
    from safetensors.numpy import load_file, save_file

    tiny_checkpoint("llama", tmp_path / "hf", 1)
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        build(tmp_path / "hf", tmp_path / "onnx")


def test_expanded_path_without_kernels(tmp_path, rng):
    """The same model through the expansion pass on stock onnxruntime (no kernel library)."""
    from onnxgen import kernels

    hf = tiny_checkpoint("qwen3", tmp_path / "hf", int(rng.integers(1 << 30)))
    out = build(tmp_path / "hf", tmp_path / "onnx", block_size=BLOCK)
    prompts = [list(rng.integers(0, 97, n)) for n in (6, 2)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "library_path", lambda: None)
        with pytest.warns(UserWarning, match="expanded model"):
            runner = PagedRunner(out, 8, len(prompts))
    logits = runner.step(prompts, [0, 0])
    with torch.no_grad():
        want = np.stack([hf(torch.tensor([p])).logits[0, -1].numpy() for p in prompts])
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


def test_cli_export(tmp_path):
    from onnxgen.cli import main

    tiny_checkpoint("llama", tmp_path / "hf", 3)
    assert main(["export", str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "onnxgen.json").read_text())
    assert meta["architecture"]["family"] == "llama" and meta["block_size"] == 16


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gemma2"])
def test_greedy_generation_matches_generate(tmp_path, rng, family):
    """32 greedy tokens for three prompts of different lengths decoded together in one ragged
    batch equal transformers' ``generate`` (greedy) for each prompt alone, up to the first step
    where transformers' own top two scores tie within 1e-4 (random weights make such ties)."""
    hf = tiny_checkpoint(family, tmp_path / "hf", int(rng.integers(1 << 30)))
    out = build(tmp_path / "hf", tmp_path / "onnx", block_size=BLOCK)
    prompts = [list(map(int, rng.integers(0, 97, n))) for n in (4, 9, 2)]
    new_tokens = 32
    runner = PagedRunner(out, max(map(len, prompts)) + new_tokens, len(prompts))
    generated = [[] for _ in prompts]
    past, step_tokens = [0, 0, 0], [list(p) for p in prompts]
    for _ in range(new_tokens):
        chosen = runner.step(step_tokens, past).argmax(axis=-1)
        past = [p + len(t) for p, t in zip(past, step_tokens)]
        step_tokens = [[int(t)] for t in chosen]
        for g, t in zip(generated, chosen):
            g.append(int(t))
    for prompt, ours in zip(prompts, generated):
        with torch.no_grad():
            ids = torch.tensor([prompt])  # an explicit mask: a prompt may contain the pad id
            # No eos: plain argmax for every step (min_new_tokens would instead forbid eos, which
            # argmax may pick on random weights).
            hf.generation_config.eos_token_id = None
            result = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        want = result.sequences[0, len(prompt):].tolist()
        for j, (a, b) in enumerate(zip(ours, want)):
            if a != b:  # allowed only where transformers itself has a tie within tolerance
                scores = result.scores[j][0]
                assert float(scores[b] - scores[a]) < 1e-4, f"token {j}: ours {a}, transformers {b}"
                break


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_narrow_weights_and_caches(tmp_path, rng, family, dtype):
    """--dtype float16/bfloat16: weights and KV caches in that type, compute in fp32.  The oracle
    is transformers with its weights rounded to the same type (fp32 compute); the caches' rounding
    of K/V is the remaining difference (tolerance 2e-2 fp16, 8e-2 bf16 on logits of order 1)."""
    hf = tiny_checkpoint(family, tmp_path / "hf", int(rng.integers(1 << 30)))
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(torch_dtype).float())
    out = build(tmp_path / "hf", tmp_path / "onnx", block_size=BLOCK, dtype=dtype)
    assert (out / "model.onnx.data").stat().st_size < sum(p.numel() for p in hf.parameters()) * 3
    prompts = [list(map(int, rng.integers(0, 97, n))) for n in (5, 8)]
    runner = PagedRunner(out, 12, len(prompts))
    tol = 2e-2 if dtype == "float16" else 8e-2
    sequences, past, new = [list(p) for p in prompts], [0, 0], [list(p) for p in prompts]
    for _ in range(3):
        logits = runner.step(new, past)
        with torch.no_grad():
            want = np.stack([hf(torch.tensor([s])).logits[0, -1].numpy() for s in sequences])
        np.testing.assert_allclose(logits, want, rtol=tol, atol=tol)
        chosen = [int(w.argmax()) for w in want]
        past = [len(s) for s in sequences]
        new = [[c] for c in chosen]
        for s, c in zip(sequences, chosen):
            s.append(c)


def test_all_logits(tmp_path, rng):
    """--all-logits: one row of logits per new token, each equal to transformers' at that position."""
    hf = tiny_checkpoint("qwen2", tmp_path / "hf", int(rng.integers(1 << 30)))
    out = build(tmp_path / "hf", tmp_path / "onnx", block_size=BLOCK, all_logits=True)
    prompts = [list(map(int, rng.integers(0, 97, n))) for n in (6, 3)]
    logits = PagedRunner(out, 8, 2).step(prompts, [0, 0])
    assert logits.shape == (9, 97)
    with torch.no_grad():
        want = np.concatenate([hf(torch.tensor([p])).logits[0].numpy() for p in prompts])
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
