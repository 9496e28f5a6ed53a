"""passes.bf16_linear: bf16-weight linear layers onto GroupedMatMul (bf16 compute), against
transformers.

The oracle is transformers in fp32 with its weights rounded to bf16; the pass also rounds each
linear layer's input and output to bf16 and the KV caches are bf16, so logits (of order 0.5 on
these tiny models) may differ by up to 2e-2 (measured: 2e-3 to 3e-3, against 1e-3 without the
pass).  The session is told to run the pass, so the test runs it on any CPU: with AMX the kernel
uses its tile path (weights packed at session creation), elsewhere its AVX-512 or AVX2 one.
"""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from onnxgen.backends.ort import Session
from onnxgen.export.llm import build
from onnxgen.passes.bf16_linear import bf16_linear

sys.path.insert(0, str(Path(__file__).parent))
from hf_models import tiny_checkpoint  # noqa: E402

import test_export_llm  # noqa: E402


def narrow_linears(model: onnx.ModelProto) -> int:
    """MatMuls over a weight widened from bf16 (MoE routers keep fp32 weights: not these)."""
    widened = {n.output[0] for n in model.graph.node if n.op_type == "Cast"}
    return sum(n.op_type == "MatMul" and n.input[1] in widened for n in model.graph.node)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_bf16_linear_logits_against_transformers(tmp_path, rng, family, monkeypatch):
    hf = tiny_checkpoint(family, tmp_path / "hf", int(rng.integers(1 << 30)))
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    out = build(tmp_path / "hf", tmp_path / "onnx", block_size=4, dtype="bfloat16")
    model = onnx.load(str(out / "model.onnx"))
    rewritten = bf16_linear(model)
    grouped = [n for n in rewritten.graph.node if n.op_type == "GroupedMatMul"]
    assert len(grouped) == narrow_linears(model) > 0 and narrow_linears(rewritten) == 0
    assert all(len(n.input) == 2 for n in grouped)  # the dense form reads the bf16 weight itself
    # the Casts that widened those weights are gone (onnxruntime would have kept fp32 copies)
    read = {name for n in rewritten.graph.node for name in n.input} | {o.name for o in rewritten.graph.output}
    assert all(n.output[0] in read for n in rewritten.graph.node if n.op_type == "Cast")

    monkeypatch.setattr(test_export_llm, "session", lambda m: Session(m, bf16_compute=True))
    prompts = [list(map(int, rng.integers(0, 97, n))) for n in (5, 8)]
    runner = test_export_llm.PagedRunner(out, 12, len(prompts))
    sequences, past, new = [list(p) for p in prompts], [0, 0], [list(p) for p in prompts]
    for _ in range(3):
        logits = runner.step(new, past)
        with torch.no_grad():
            want = np.stack([hf(torch.tensor([s])).logits[0, -1].numpy() for s in sequences])
        np.testing.assert_allclose(logits, want, rtol=2e-2, atol=2e-2)
        chosen = [int(w.argmax()) for w in want]
        past, new = [len(s) for s in sequences], [[c] for c in chosen]
        for s, c in zip(sequences, chosen):
            s.append(c)


def test_fp32_models_are_left_alone(tmp_path, rng):
    hf = tiny_checkpoint("llama", tmp_path / "hf", int(rng.integers(1 << 30)))
    out = build(tmp_path / "hf", tmp_path / "onnx", block_size=4)
    model = onnx.load(str(out / "model.onnx"))
    assert bf16_linear(model) is model
