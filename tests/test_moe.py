"""MoE against the Hugging Face transformers MoE blocks of each family (random weights), plus the
expert graph, the variants no family in the list uses, and the errors.

Tolerances: float32 models 1e-4 absolute and relative against the fp32 HF block; the fp16 case
(activations and expert weights in fp16, router in fp32) 3e-2 absolute and relative against the
same fp32 HF output.
"""

from __future__ import annotations

import importlib
import math
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from onnxgen.backends.reference import evaluator  # noqa: E402
from onnxgen.export.moe import FAMILIES, build_moe_block_model, moe_from_hf  # noqa: E402
from onnxgen.ops.moe import moe  # noqa: E402
from onnxgen.testing import run_expanded_on_ort, run_reference, single_node_model  # noqa: E402

FP32_TOL = 1e-4
FP16_TOL = 3e-2
T, H, E, I_MOE, I_SHARED = 7, 32, 8, 24, 20

# Small configs: H=32, E=8 (16 where groups need it), I=24, k=2 unless the family's variant needs more.
COMMON = dict(hidden_size=H, intermediate_size=I_MOE, moe_intermediate_size=I_MOE, num_experts_per_tok=2,
              num_local_experts=E, shared_expert_intermediate_size=I_SHARED, n_shared_experts=1,
              norm_topk_prob=True, hidden_act="silu", num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64)
CASES = {
    "mixtral": {},
    "minimax": {},
    "jamba": dict(num_experts=E),
    "qwen2_moe": dict(num_experts=E, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=E),
    "qwen3_next": dict(num_experts=E),
    "olmoe": dict(num_experts=E, norm_topk_prob=False),
    "flex_olmo": dict(num_experts=E),
    "hunyuan_v1_moe": dict(num_experts=E, moe_topk=2),
    "granitemoe": {},
    "gpt_oss": dict(swiglu_limit=1.5, num_experts_per_tok=3),  # a small limit so the clamps bite
    "deepseek_v3": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3,
                        routed_scaling_factor=2.5),
    "glm4_moe": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3,
                     routed_scaling_factor=1.5, norm_topk_prob=False),
    "dots1": dict(n_routed_experts=16, n_group=2, topk_group=1, num_experts_per_tok=3),
    "deepseek_v2": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3,
                        topk_method="group_limited_greedy", routed_scaling_factor=1.7),
    "ernie4_5_moe": dict(moe_num_experts=E, moe_k=2, moe_num_shared_experts=1, use_bias=True),
    "qwen3_vl_moe_text": dict(num_experts=E),
    "qwen3_5_moe_text": dict(num_experts=E),
    "granitemoeshared": dict(shared_intermediate_size=I_SHARED),
    "granitemoehybrid": dict(shared_intermediate_size=I_SHARED, mamba_n_heads=8, mamba_d_head=8),
    "exaone_moe": dict(num_experts=16, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3,
                       num_shared_experts=1, routed_scaling_factor=2.0),
    "kimi_linear": dict(num_experts=16, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3,
                        routed_scaling_factor=2.0),
    "glm4_moe_lite": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3),
    "mimo_v2_flash": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3),
    "solar_open": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3),
    "mistral4": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3,
                     routed_scaling_factor=1.3),
    "minimax_m2": {},
    "hy_v3": dict(num_shared_experts=1, router_scaling_factor=2.0),
    "lfm2_moe": dict(num_experts=E, use_expert_bias=True, routed_scaling_factor=1.5),
    "afmoe": dict(num_experts=E, num_shared_experts=1, route_scale=1.8),
    "cohere2_moe": dict(num_experts=E, num_shared_experts=1, shared_expert_combination_strategy="average"),
    "llama4_text": dict(num_experts_per_tok=1, intermediate_size_mlp=I_SHARED),
}
MODULE_DIR = {"llama4_text": "llama4", "qwen3_vl_moe_text": "qwen3_vl_moe", "qwen3_5_moe_text": "qwen3_5_moe"}


def hf_block(model_type, seed):
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **CASES[model_type]})
    config._experts_implementation = "eager"
    directory = MODULE_DIR.get(model_type, model_type)
    module = importlib.import_module(f"transformers.models.{directory}.modeling_{directory}")
    block = getattr(module, FAMILIES[model_type].oracle)(config).eval()
    with torch.no_grad():
        for name, tensor in list(block.named_parameters()) + list(block.named_buffers()):
            if not tensor.is_floating_point():
                continue
            std = 0.6 if name.split(".")[0] in ("gate", "router") else 0.05 if "correction" in name else 0.15
            tensor.copy_(torch.randn_like(tensor) * std)
    return config, block


def hf_forward(block, x):
    with torch.no_grad():
        out = block(torch.from_numpy(x)[None])
    return (out[0] if isinstance(out, tuple) else out).reshape(x.shape).numpy()


def numpy_state(block):
    return {k: v.detach().numpy() for k, v in block.state_dict().items()}


@pytest.mark.parametrize("model_type", list(CASES))
def test_family_matches_hf(rng, model_type):
    config, block = hf_block(model_type, int(rng.integers(2**31)))
    x = rng.standard_normal((T, H)).astype(np.float32)
    want = hf_forward(block, x)
    moe_block = moe_from_hf(model_type, config.to_dict(), numpy_state(block))
    model = build_moe_block_model(moe_block)
    onnx.checker.check_model(model, full_check=True)
    got_ref = evaluator(model).run(None, {"X": x})[0]
    np.testing.assert_allclose(got_ref, want, rtol=FP32_TOL, atol=FP32_TOL)
    got_ort = run_expanded_on_ort(model, {"X": x})[0]
    np.testing.assert_allclose(got_ort, want, rtol=FP32_TOL, atol=FP32_TOL)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "deepseek_v3", "llama4_text"])
def test_family_fp16(rng, model_type):
    config, block = hf_block(model_type, int(rng.integers(2**31)))
    x = rng.standard_normal((T, H)).astype(np.float32)
    want = hf_forward(block, x)
    model = build_moe_block_model(moe_from_hf(model_type, config.to_dict(), numpy_state(block)), np.float16)
    onnx.checker.check_model(model, full_check=True)
    for got in (evaluator(model).run(None, {"X": x.astype(np.float16)})[0],
                run_expanded_on_ort(model, {"X": x.astype(np.float16)})[0]):
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=FP16_TOL, atol=FP16_TOL)


@pytest.mark.parametrize("model_type,router", [
    ("mixtral", "gate"), ("qwen3_moe", "gate"), ("granitemoe", "router"), ("gpt_oss", "router"),
    ("deepseek_v3", "gate"), ("deepseek_v2", "gate"), ("ernie4_5_moe", "gate"),
])
def test_router_outputs_match_hf(rng, model_type, router):
    config, block = hf_block(model_type, int(rng.integers(2**31)))
    x = rng.standard_normal((T, H)).astype(np.float32)
    with torch.no_grad():
        _, hf_weights, hf_indices = getattr(block, router)(torch.from_numpy(x))
    model = build_moe_block_model(moe_from_hf(model_type, config.to_dict(), numpy_state(block)))
    for _, indices, weights in (evaluator(model).run(None, {"X": x}), run_expanded_on_ort(model, {"X": x})):
        assert indices.dtype == np.int64 and weights.dtype == np.float32
        order, hf_order = np.argsort(indices, axis=1), np.argsort(hf_indices.numpy(), axis=1)
        np.testing.assert_array_equal(np.take_along_axis(indices, order, 1),
                                      np.take_along_axis(hf_indices.numpy(), hf_order, 1))
        np.testing.assert_allclose(np.take_along_axis(weights, order, 1),
                                   np.take_along_axis(hf_weights.float().numpy(), hf_order, 1),
                                   rtol=FP32_TOL, atol=FP32_TOL)


# ---- variants no listed family exercises: an independent per-token loop --------------------------

def loop_oracle(x, logits, w1, b1, w2, b2, *, k, activation, gated):
    """Softmax top-k, no renormalisation, one token at a time in float64."""
    out = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        p = np.exp(logits[t] - logits[t].max())
        p /= p.sum()
        for e in np.argsort(-p)[:k]:
            h = x[t].astype(np.float64) @ w1[e] + (b1[e] if b1 is not None else 0)
            g, u = (h[: h.size // 2], h[h.size // 2:]) if gated else (h, 1.0)
            act = {"relu": np.maximum(g, 0),
                   "gelu": 0.5 * g * (1 + np.array([math.erf(v / math.sqrt(2)) for v in g])),
                   "gelu_tanh": 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))),
                   "silu": g / (1 + np.exp(-g))}[activation]
            out[t] += p[e] * ((act * u) @ w2[e] + (b2[e] if b2 is not None else 0))
    return out


@pytest.mark.parametrize("activation,gated", [("relu", 0), ("gelu", 1), ("gelu_tanh", 0), ("silu", 0)])
def test_activations_and_non_gated_experts(rng, activation, gated):
    inter = 6
    inputs = {
        "X": rng.standard_normal((5, 8)).astype(np.float32),
        "router_logits": rng.standard_normal((5, 4)).astype(np.float32),
        "gate_up_weights": rng.standard_normal((4, 8, inter * (1 + gated))).astype(np.float32),
        "gate_up_bias": rng.standard_normal((4, inter * (1 + gated))).astype(np.float32),
        "down_weights": rng.standard_normal((4, inter, 8)).astype(np.float32),
        "down_bias": rng.standard_normal((4, 8)).astype(np.float32),
    }
    model = single_node_model("MoE", inputs, ["Y"], k=2, activation=activation, gated=gated)
    onnx.checker.check_model(model, full_check=True)
    want = loop_oracle(*inputs.values(), k=2, activation=activation, gated=gated)
    for got in (run_reference(model, inputs)[0], run_expanded_on_ort(model, inputs)[0]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---- the expert graph ----------------------------------------------------------------------------

def expert_graph(weights):
    """(x [n, H], e) -> tanh(x @ W[e]) + 0.5 * x: a non-MLP expert with its weights inside."""
    g = helper.make_graph(
        [helper.make_node("Gather", ["W", "e"], ["We"], axis=0),
         helper.make_node("MatMul", ["x", "We"], ["h"]),
         helper.make_node("Tanh", ["h"], ["th"]),
         helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.array(0.5, np.float32))),
         helper.make_node("Mul", ["x", "half"], ["xh"]),
         helper.make_node("Add", ["th", "xh"], ["y"])],
        "expert",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weights.shape[1]]),
         helper.make_tensor_value_info("e", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, weights.shape[1]])],
        [numpy_helper.from_array(weights, "W")],
    )
    return g


@pytest.mark.parametrize("weight_position", ["output", "input"])
def test_expert_graph(rng, weight_position):
    tokens, hidden, experts, k = 6, 8, 5, 2
    w = rng.standard_normal((experts, hidden, hidden)).astype(np.float32)
    inputs = {"X": rng.standard_normal((tokens, hidden)).astype(np.float32),
              "router_logits": rng.standard_normal((tokens, experts)).astype(np.float32)}
    model = single_node_model("MoE", inputs, ["Y", "topk_indices", "topk_weights"], k=k, scoring="sigmoid",
                              normalize=1, expert=expert_graph(w), weight_position=weight_position)
    onnx.checker.check_model(model, full_check=True)
    x, logits = inputs["X"].astype(np.float64), inputs["router_logits"].astype(np.float64)
    want = np.zeros_like(x)
    for t in range(tokens):
        s = 1 / (1 + np.exp(-logits[t]))
        chosen = np.argsort(-s)[:k]
        weights = s[chosen] / s[chosen].sum()
        for e, wt in zip(chosen, weights):
            xin = x[t] * wt if weight_position == "input" else x[t]
            y = np.tanh(xin @ w[e]) + 0.5 * xin
            want[t] += y if weight_position == "input" else wt * y
    for got in (run_reference(model, inputs), run_expanded_on_ort(model, inputs)):
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)
        assert got[1].shape == (tokens, k) and got[2].shape == (tokens, k)


# ---- errors --------------------------------------------------------------------------------------

def small_inputs(experts=8, hidden=4, inter=3, tokens=3):
    z = np.zeros
    return {"X": z((tokens, hidden), np.float32), "router_logits": z((tokens, experts), np.float32),
            "gate_up_weights": z((experts, hidden, 2 * inter), np.float32), "gate_up_bias": None,
            "down_weights": z((experts, inter, hidden), np.float32)}


def static_model(inputs, **attrs):
    node = helper.make_node("MoE", [n if a is not None else "" for n, a in inputs.items()], ["Y"],
                            domain="onnxgen.preview", **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
         for n, a in inputs.items() if a is not None],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25),
                                                   helper.make_opsetid("onnxgen.preview", 1)])


BAD = [
    ("unknown scoring", {}, dict(k=2, scoring="tanh"), "unknown scoring 'tanh'"),
    ("unknown activation", {}, dict(k=2, activation="swish"), "unknown activation 'swish'"),
    ("unknown layout", {}, dict(k=2, gate_up_layout="split"), "unknown gate_up_layout"),
    ("unknown weight_position", {}, dict(k=2, weight_position="middle"), "unknown weight_position"),
    ("unknown group_scoring", {}, dict(k=2, n_group=2, topk_group=1, group_scoring="mean"),
     "unknown group_scoring"),
    ("k > E", {}, dict(k=9), "k=9 exceeds the number of experts E=8"),
    ("k < 1", {}, dict(k=0), "k must be >= 1"),
    ("E not divisible", {}, dict(k=1, n_group=3, topk_group=1), "do not split into n_group=3"),
    ("topk_group > n_group", {}, dict(k=1, n_group=2, topk_group=3), "topk_group must lie in"),
    ("k > kept experts", {}, dict(k=5, n_group=4, topk_group=2), "k=5 exceeds the 4 experts"),
    ("H mismatch", {"down_weights": np.zeros((8, 3, 5), np.float32)}, dict(k=2), "H \\(hidden size\\)"),
    ("E mismatch", {"gate_up_weights": np.zeros((7, 4, 6), np.float32)}, dict(k=2), "E \\(experts\\)"),
    ("I mismatch", {"down_weights": np.zeros((8, 2, 4), np.float32)}, dict(k=2), "N1=6 columns"),
    ("T mismatch", {"router_logits": np.zeros((2, 8), np.float32)}, dict(k=2), "T \\(tokens\\)"),
    ("weights dtype", {"gate_up_weights": np.zeros((8, 4, 6), np.float16)}, dict(k=2), "X's type"),
    ("int X", {"X": np.zeros((3, 4), np.int32)}, dict(k=2), "must be float"),
    ("missing weights", {"down_weights": None}, dict(k=2), "required unless the 'expert' graph"),
]


@pytest.mark.parametrize("case,changes,attrs,message", BAD, ids=[b[0] for b in BAD])
def test_errors(case, changes, attrs, message):
    inputs = {**small_inputs(), **changes}
    with pytest.raises(ValueError, match=message):
        moe(*inputs.values(), **attrs)
    with pytest.raises(onnx.shape_inference.InferenceError, match=message):
        onnx.shape_inference.infer_shapes(static_model(inputs, **attrs), strict_mode=True)


def test_static_output_shapes():
    inputs = small_inputs()
    node = helper.make_node("MoE", list(inputs)[:3] + ["", "down_weights"], ["Y", "idx", "w"],
                            domain="onnxgen.preview", k=3)
    model = static_model(inputs, k=3)
    model.graph.node[0].CopyFrom(node)
    for name in ("idx", "w"):
        model.graph.output.append(helper.make_value_info(name, onnx.TypeProto()))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {o.name: ([d.dim_value for d in o.type.tensor_type.shape.dim], o.type.tensor_type.elem_type)
              for o in inferred.graph.output}
    assert shapes == {"Y": ([3, 4], TensorProto.FLOAT), "idx": ([3, 3], TensorProto.INT64),
                      "w": ([3, 3], TensorProto.FLOAT)}


def test_unmappable_family_is_refused():
    with pytest.raises(ValueError, match="no MoE mapping for model_type 'phimoe'"):
        moe_from_hf("phimoe", {}, {})
