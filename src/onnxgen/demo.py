"""The foundation demo: a tiny decoder layer built on the new ops, run step by step.

It builds one transformer layer with seeded random weights (RMSNormalization, q/k/v
projections, PagedAttention over a paged KV cache, an output projection, a router and an
8-expert MoE), then plays two engine steps: a prefill of three sequences of different
lengths, then a decode step for all three whose cache is the one the first step returned.
Each step runs through onnx's reference evaluator (the spec), through stock onnxruntime after
``onnxgen.passes.expand``, and through onnxruntime with onnxgen's kernel library (caches written
in place); the demo prints the times and how far the answers are from the reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from . import kernels
from .backends.ort import session as ort_session
from .backends.reference import evaluator
from .ops.domain import DOMAIN, DOMAIN_VERSION
from .passes import expand


@dataclass(frozen=True)
class LayerConfig:
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    experts: int = 8
    top_k: int = 2
    intermediate: int = 96
    block_size: int = 16
    num_blocks: int = 16

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads


def build_layer(config: LayerConfig = LayerConfig(), seed: int = 0) -> onnx.ModelProto:
    """One decoder layer with the paged signature (flat tokens, block table, caches in and out)."""
    rng = np.random.default_rng(seed)
    c = config
    kv_width = c.kv_heads * c.head_size

    def weight(name, *shape, scale=None):
        scale = scale or 1 / np.sqrt(shape[-2] if len(shape) > 1 else shape[0])
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        weight("w_q", c.hidden, c.hidden), weight("w_k", c.hidden, kv_width), weight("w_v", c.hidden, kv_width),
        weight("w_o", c.hidden, c.hidden), weight("w_router", c.hidden, c.experts),
        weight("w_gate_up", c.experts, c.hidden, 2 * c.intermediate), weight("w_down", c.experts, c.intermediate, c.hidden),
        numpy_helper.from_array(np.ones(c.hidden, np.float32), "norm_scale"),
    ]
    nodes = [
        helper.make_node("RMSNormalization", ["hidden_states", "norm_scale"], ["normed"], axis=-1),
        helper.make_node("MatMul", ["normed", "w_q"], ["q"]),
        helper.make_node("MatMul", ["normed", "w_k"], ["k"]),
        helper.make_node("MatMul", ["normed", "w_v"], ["v"]),
        helper.make_node(
            "PagedAttention",
            ["q", "k", "v", "key_cache", "value_cache", "cumulative_sequence_length", "past_seqlens", "block_table"],
            ["attn", "key_cache_out", "value_cache_out"],
            domain=DOMAIN, num_heads=c.heads, kv_num_heads=c.kv_heads,
        ),
        helper.make_node("MatMul", ["attn", "w_o"], ["attn_out"]),
        helper.make_node("Add", ["hidden_states", "attn_out"], ["residual"]),
        helper.make_node("MatMul", ["residual", "w_router"], ["router_logits"]),
        helper.make_node("MoE", ["residual", "router_logits", "w_gate_up", "", "w_down"], ["moe_out"],
                         domain=DOMAIN, k=c.top_k, normalize=1),
        helper.make_node("Add", ["residual", "moe_out"], ["output"]),
    ]
    cache = [c.num_blocks, c.block_size, c.kv_heads, c.head_size]
    inputs = [
        helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["num_tokens", c.hidden]),
        helper.make_tensor_value_info("key_cache", TensorProto.FLOAT, cache),
        helper.make_tensor_value_info("value_cache", TensorProto.FLOAT, cache),
        helper.make_tensor_value_info("cumulative_sequence_length", TensorProto.INT32, ["batch_plus_1"]),
        helper.make_tensor_value_info("past_seqlens", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("block_table", TensorProto.INT32, ["batch", "max_blocks"]),
    ]
    outputs = [
        helper.make_tensor_value_info("output", TensorProto.FLOAT, ["num_tokens", c.hidden]),
        helper.make_tensor_value_info("key_cache_out", TensorProto.FLOAT, cache),
        helper.make_tensor_value_info("value_cache_out", TensorProto.FLOAT, cache),
    ]
    graph = helper.make_graph(nodes, "onnxgen_demo_layer", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 25), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        producer_name="onnxgen-demo",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def demo_steps(config: LayerConfig, seed: int = 1) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Feeds for a prefill of three sequences (7, 3 and 12 tokens) then one decode step each."""
    rng = np.random.default_rng(seed)
    prompt_lens = np.array([7, 3, 12], np.int32)
    # A shuffled block table: sequence b owns blocks table[b, :2].
    table = rng.permutation(config.num_blocks)[:6].reshape(3, 2).astype(np.int32)
    cache_shape = (config.num_blocks, config.block_size, config.kv_heads, config.head_size)

    def step(past, new):
        return {
            "hidden_states": rng.standard_normal((int(new.sum()), config.hidden)).astype(np.float32),
            "cumulative_sequence_length": np.concatenate([[0], np.cumsum(new)]).astype(np.int32),
            "past_seqlens": past.astype(np.int32),
            "block_table": table,
        }

    prefill = {**step(np.zeros(3), prompt_lens), "key_cache": np.zeros(cache_shape, np.float32),
               "value_cache": np.zeros(cache_shape, np.float32)}
    return [("prefill 7+3+12 tokens", prefill), ("decode 1+1+1 tokens", step(prompt_lens, np.ones(3, np.int32)))]


class _Stateless:
    """Runs a model whose caches go in as inputs and come back as outputs, the caller carrying them."""

    def __init__(self, runner):
        self.runner, self.caches = runner, {}

    def step(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        y, key_cache, value_cache = self.runner.run(None, {**feeds, **self.caches})
        self.caches = {"key_cache": key_cache, "value_cache": value_cache}  # the next step reads them
        return y


class _InPlace:
    """onnxgen's kernel session: the caches stay in its buffers and are written in place."""

    def __init__(self, model: onnx.ModelProto):
        self.session = ort_session(model)

    def step(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        for name in ("key_cache", "value_cache"):
            if name in feeds:
                self.session.set_cache(name, feeds[name].copy())
        rest = {k: v for k, v in feeds.items() if k not in ("key_cache", "value_cache")}
        return self.session.run(rest)["output"]


def run(config: LayerConfig = LayerConfig(), out=print) -> float:
    """Run the demo; return the largest difference from the reference."""
    model = build_layer(config)
    started = time.perf_counter()
    expanded = expand(model)
    expand_ms = (time.perf_counter() - started) * 1e3
    out(f"built a decoder layer: {len(model.graph.node)} nodes using onnxgen.preview "
        f"PagedAttention + MoE; expanded to {len(expanded.graph.node)} standard nodes in {expand_ms:.0f} ms")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    backends = {
        "reference": _Stateless(evaluator(model)),
        "expanded": _Stateless(ort.InferenceSession(expanded.SerializeToString(), options,
                                                    providers=["CPUExecutionProvider"])),
    }
    if kernels.library_path():
        backends["kernels"] = _InPlace(model)
    else:
        out("(onnxgen's kernel library is not built: skipping the kernel column)")
    worst = 0.0
    header = "".join(f"{name + ' ms':>14}" for name in backends)
    out(f"{'step':<24}{'tokens':>7}{header}{'max |diff|':>12}")
    for label, feeds in demo_steps(config):
        results = {}
        for name, backend in backends.items():
            started = time.perf_counter()
            results[name] = (backend.step(feeds), (time.perf_counter() - started) * 1e3)
        want = results["reference"][0]
        diff = max(float(np.abs(y - want).max()) for y, _ in results.values())
        worst = max(worst, diff)
        times = "".join(f"{ms:>14.1f}" for _, ms in results.values())
        out(f"{label:<24}{len(feeds['hidden_states']):>7}{times}{diff:>12.2e}")
    names = " and ".join(n for n in backends if n != "reference")
    out(f"onnxruntime ({names}) agrees with the reference" if worst < 1e-3
        else "MISMATCH between onnxruntime and the reference")
    return worst
