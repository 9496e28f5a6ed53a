"""The MoE and GroupedMatMul CPU kernels against the numpy references (onnxgen.ops.moe.moe,
onnxgen.ops.grouped_matmul.grouped_matmul), onnxruntime's own com.microsoft.MoE, and HF-family
blocks built by onnxgen.export.moe.

Tolerances (kernel vs reference, both computing in fp32; only the summation order differs):
relative = tol and absolute = tol * max(1, max |Y|) with tol 1e-4 for fp32, 2e-3 for fp16 and
1e-2 for bf16 (X and weights in that type, Y rounded to it: about one output ulp, a rounding
flip).  Routing (topk_indices) must match exactly; topk_weights to 1e-5 relative.  Against
onnxruntime's com.microsoft.MoE and the HF blocks: 1e-4 (fp32).
Both micro-kernels run: AVX-512 where the CPU has it, and the AVX2 baseline in a subprocess
with ONNXGEN_NO_AVX512=1.
"""

from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxgen import kernels
from onnxgen.ops.domain import DOMAIN, DOMAIN_VERSION
from onnxgen.ops.grouped_matmul import grouped_matmul
from onnxgen.ops.moe import moe
from onnxgen.backends.ort import ort_value
from onnxgen.testing import cast_bf16_outputs_to_float, feeds, single_node_model

BF16 = np.dtype(ml_dtypes.bfloat16)
TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 2e-3, BF16: 1e-2}
MOE_NAMES = ["X", "router_logits", "gate_up_weights", "gate_up_bias", "down_weights", "down_bias", "selection_bias"]


@pytest.fixture(scope="module", autouse=True)
def library():
    path = kernels.library_path()
    if path is None:
        if os.environ.get("ONNXGEN_ALLOW_NO_KERNELS") == "1":
            pytest.skip("the kernel library is not built and ONNXGEN_ALLOW_NO_KERNELS=1")
        pytest.fail("the kernel library is not built (pip install -e . builds it)")
    return path


def run_kernel(model, inputs, threads=2):
    bf16_outputs = cast_bf16_outputs_to_float(model)  # numpy has no bf16 for ORT: cast in the graph
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(kernels.library_path())
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = {name: ort_value(a) for name, a in feeds(inputs).items()}
    out = [v.numpy() for v in session.run_with_ort_values(None, values)]
    return [o.astype(BF16) if i in bf16_outputs else o for i, o in enumerate(out)]


def moe_inputs(rng, tokens, hidden, experts, inter, *, gated=1, dtype=np.float32, gate_up_bias=False,
               down_bias=False, selection_bias=False, logit_scale=1.0):
    n1 = 2 * inter if gated else inter

    def w(*shape, fan_in):
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32).astype(dtype)

    return {
        "X": rng.standard_normal((tokens, hidden)).astype(np.float32).astype(dtype),
        "router_logits": (rng.standard_normal((tokens, experts)) * logit_scale).astype(np.float32),
        "gate_up_weights": w(experts, hidden, n1, fan_in=hidden),
        "gate_up_bias": rng.standard_normal((experts, n1)).astype(np.float32).astype(dtype) if gate_up_bias else None,
        "down_weights": w(experts, inter, hidden, fan_in=inter),
        "down_bias": rng.standard_normal((experts, hidden)).astype(np.float32).astype(dtype) if down_bias else None,
        "selection_bias": (rng.standard_normal(experts) * 0.1).astype(np.float32) if selection_bias else None,
    }


def as_initializers(model, inputs, names):
    """Moves the named inputs into the model as initializers (constants the kernel may pack when
    the session is created); returns the feeds left."""
    feeds_ = dict(inputs)
    for name in names:
        array = feeds_.pop(name)
        if array.dtype == BF16:
            tensor = helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, array.view(np.uint16).tobytes(), raw=True)
        else:
            tensor = numpy_helper.from_array(array, name)
        model.graph.initializer.append(tensor)
        kept = [i for i in model.graph.input if i.name != name]
        del model.graph.input[:]
        model.graph.input.extend(kept)
    return feeds_


def check_moe(inputs, constant_weights=False, **attrs):
    """``constant_weights``: the expert weights as initializers (the kernel may prepack them)."""
    model = single_node_model("MoE", inputs, ["Y", "topk_indices", "topk_weights"], **attrs)
    feeds_ = as_initializers(model, inputs, ["gate_up_weights", "down_weights"] if constant_weights else [])
    y, indices, weights = run_kernel(model, feeds_)
    want_y, want_indices, want_weights = moe(*inputs.values(), **attrs)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-6)
    assert y.dtype == inputs["X"].dtype and y.shape == want_y.shape
    tol = TOL[inputs["X"].dtype]
    scale = max(1.0, float(np.abs(want_y.astype(np.float32)).max()))
    np.testing.assert_allclose(y.astype(np.float32), want_y.astype(np.float32), rtol=tol, atol=tol * scale)
    return y


# ---- the expert MLP: every activation, layout, gating, bias -----------------------------------

EXPERT_CASES = [(act, 1, layout) for act in ("silu", "gelu", "gelu_tanh", "relu", "swiglu_clamped")
                for layout in ("concatenated", "interleaved")]
EXPERT_CASES += [(act, 0, "concatenated") for act in ("silu", "gelu", "gelu_tanh", "relu")]


@pytest.mark.parametrize("activation,gated,layout", EXPERT_CASES)
@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_expert_mlp(rng, activation, gated, layout, phase):
    tokens = int(rng.integers(1, 9)) if phase == "decode" else 200
    # H and I off the 64/128-column tiles and over one 64-row panel, so tails and K blocks run.
    inputs = moe_inputs(rng, tokens, 200, 8, 136, gated=gated, gate_up_bias=rng.random() < 0.5,
                        down_bias=rng.random() < 0.5)
    extra = dict(activation_alpha=1.5, activation_limit=1.2) if activation == "swiglu_clamped" else {}
    check_moe(inputs, k=2, activation=activation, gated=gated, gate_up_layout=layout, **extra)


# ---- routing variants ---------------------------------------------------------------------------

ROUTING = {
    "mixtral": dict(k=2, normalize=1),
    "qwen2 (no renormalisation)": dict(k=4),
    "sigmoid": dict(k=3, scoring="sigmoid", normalize=1, routed_scaling_factor=2.5),
    "deepseek-v3 groups": dict(k=4, scoring="sigmoid", normalize=1, n_group=4, topk_group=2,
                               routed_scaling_factor=2.5, selection_bias=True),
    "deepseek-v2 groups (max)": dict(k=3, n_group=4, topk_group=2, group_scoring="max", routed_scaling_factor=1.7),
    "gpt-oss": dict(k=4, softmax_after_topk=1, activation="swiglu_clamped", gate_up_layout="interleaved",
                    gate_up_bias=True, down_bias=True),
    "llama4 (weight on input)": dict(k=1, scoring="sigmoid", weight_position="input", down_bias=True),
    "weight on input, k=3": dict(k=3, weight_position="input", normalize=1, gate_up_bias=True),
    "selection bias, softmax": dict(k=2, selection_bias=True),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(ROUTING))
def test_routing_variants(rng, case, dtype):
    attrs = dict(ROUTING[case])
    flags = {name: attrs.pop(name, False) for name in ("selection_bias", "gate_up_bias", "down_bias")}
    tokens = int(rng.choice([1, 5, 8, 64]))
    inputs = moe_inputs(rng, tokens, 96, 16, 80, dtype=dtype, logit_scale=2.0, **flags)
    check_moe(inputs, **attrs)


def test_one_expert_many_tokens_and_one_token(rng):
    # E = k = 1: every row on one expert (the items split its columns); then a single token.
    check_moe(moe_inputs(rng, 150, 256, 1, 300), k=1)
    check_moe(moe_inputs(rng, 1, 256, 4, 300), k=4, normalize=1)


def test_optional_outputs_and_empty_batch(rng):
    inputs = moe_inputs(rng, 6, 32, 4, 24)
    model = single_node_model("MoE", inputs, ["Y"], k=2)
    (y,) = run_kernel(model, inputs)
    np.testing.assert_allclose(y, moe(*inputs.values(), k=2)[0], rtol=1e-4, atol=1e-4)
    empty = {**inputs, "X": inputs["X"][:0], "router_logits": inputs["router_logits"][:0]}
    y, indices, weights = run_kernel(single_node_model("MoE", empty, ["Y", "topk_indices", "topk_weights"], k=2),
                                     empty)
    assert y.shape == (0, 32) and indices.shape == (0, 2) and weights.shape == (0, 2)


def test_fp16_router_logits(rng):
    inputs = moe_inputs(rng, 7, 64, 8, 48, selection_bias=True)
    inputs["router_logits"] = inputs["router_logits"].astype(np.float16)
    inputs["selection_bias"] = inputs["selection_bias"].astype(np.float16)
    check_moe(inputs, k=2, normalize=1)


def test_avx2_fallback_matches(tmp_path):
    """The baseline micro-kernel (ONNXGEN_NO_AVX512=1) in a fresh process: MoE and GroupedMatMul."""
    script = f"""
import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
import numpy as np
import test_kernels_moe as t
rng = np.random.default_rng(7)
for dtype in (np.float32, np.float16, t.BF16):
    t.check_moe(t.moe_inputs(rng, 70, 200, 8, 136, dtype=dtype, gate_up_bias=True, down_bias=True), k=2,
                gate_up_layout="interleaved", activation="swiglu_clamped")
    t.check_moe(t.moe_inputs(rng, 3, 72, 4, 40, gated=0, dtype=dtype), k=2, activation="gelu", gated=0)
t.check_grouped(t.grouped_inputs(rng, 20, 150, 5, 70, 3, True, np.float32))
t.check_grouped(t.grouped_inputs(rng, 5, 300, 3, 600, 2, True, np.float32), constant_weights=True)
for layout in ("concatenated", "interleaved"):
    t.check_moe(t.moe_inputs(rng, 9, 300, 4, 280, gate_up_bias=True), constant_weights=True, k=2, gate_up_layout=layout)
print("ok")
"""
    env = {**os.environ, "ONNXGEN_NO_AVX512": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_no_amx_matches(tmp_path):
    """bf16 weights without the AMX tile path (ONNXGEN_NO_AMX=1: the AVX-512 micro-kernel over
    weights widened to fp32; constant ones packed into column tiles), in a fresh process: MoE and
    GroupedMatMul."""
    script = f"""
import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
import numpy as np
import test_kernels_moe as t
rng = np.random.default_rng(11)
t.check_moe(t.moe_inputs(rng, 70, 200, 8, 136, dtype=t.BF16, gate_up_bias=True, down_bias=True), k=2)
t.check_grouped(t.grouped_inputs(rng, 37, 150, 3, 70, 2, True, t.BF16))
for tokens, hidden, inter in t.CONSTANT_SIZES:
    t.check_moe(t.moe_inputs(rng, tokens, hidden, 4, inter, dtype=t.BF16), constant_weights=True, k=2)
t.check_grouped(t.grouped_inputs(rng, 5, 300, 3, 600, 2, True, t.BF16), constant_weights=True)
print("ok")
"""
    env = {**os.environ, "ONNXGEN_NO_AMX": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# ---- GroupedMatMul --------------------------------------------------------------------------------

def grouped_inputs(rng, m, k_dim, groups, n, k, with_bias, dtype):
    return {
        "input": rng.standard_normal((m, k_dim)).astype(np.float32).astype(dtype),
        "weights": (rng.standard_normal((groups, k_dim, n)) / np.sqrt(k_dim)).astype(np.float32).astype(dtype),
        "group_indices": rng.integers(-groups, groups, size=(m, k)).astype(np.int64),
        "bias": rng.standard_normal((groups, n)).astype(np.float32).astype(dtype) if with_bias else None,
    }


def check_grouped(inputs, constant_weights=False):
    model = single_node_model("GroupedMatMul", inputs, ["output"])
    (got,) = run_kernel(model, as_initializers(model, inputs, ["weights"] if constant_weights else []))
    want = grouped_matmul(**inputs)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = TOL[inputs["input"].dtype]
    scale = max(1.0, float(np.abs(want.astype(np.float32)).max(initial=0.0)))
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 16, 3, 8, 1), (7, 130, 5, 200, 2), (200, 64, 4, 129, 3), (0, 8, 2, 4, 2),
                                   (5, 0, 2, 4, 2), (4, 8, 2, 4, 0)])
def test_grouped_matmul(rng, dtype, shape):
    m, k_dim, groups, n, k = shape
    check_grouped(grouped_inputs(rng, m, k_dim, groups, n, k, bool(rng.random() < 0.5), dtype))


# ---- onnxruntime's com.microsoft.MoE as a second oracle ------------------------------------------

def ort_contrib_moe(inputs, k, activation_type, normalize, gated):
    """com.microsoft.MoE on the same weights: fc1 [E, N1, H] (swiglu_fusion=1: interleaved), fc2 [E, H, I]."""
    fc1 = np.ascontiguousarray(inputs["gate_up_weights"].transpose(0, 2, 1))
    fc2 = np.ascontiguousarray(inputs["down_weights"].transpose(0, 2, 1))
    attrs = dict(k=k, activation_type=activation_type, normalize_routing_weights=normalize)
    if gated:
        attrs.update(swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    names = ["X", "router_logits", "fc1", "fc1_bias", "fc2", "fc2_bias"]
    node = helper.make_node("MoE", names, ["Y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node], "ort_moe",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("X", "router_logits")],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for a, n in ((fc1, "fc1"), (inputs["gate_up_bias"], "fc1_bias"), (fc2, "fc2"),
                                                     (inputs["down_bias"], "fc2_bias"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return s.run(None, {"X": inputs["X"], "router_logits": inputs["router_logits"]})[0]


@pytest.mark.parametrize("activation,gated,normalize", [("silu", 1, 1), ("silu", 1, 0), ("relu", 0, 1), ("silu", 0, 0)])
def test_matches_onnxruntime_contrib_moe(rng, activation, gated, normalize):
    # Overlap: softmax over all experts, top-k, optional renormalisation; SwiGLU = silu-gated,
    # interleaved (swiglu_fusion=1, alpha=1, beta=0, no clamp); relu/silu plain MLPs; biases.
    inputs = moe_inputs(rng, int(rng.choice([3, 64])), 128, 8, 96, gated=gated, gate_up_bias=True, down_bias=True)
    layout = "interleaved" if gated else "concatenated"
    model = single_node_model("MoE", inputs, ["Y"], k=2, normalize=normalize, activation=activation, gated=gated,
                              gate_up_layout=layout)
    (y,) = run_kernel(model, inputs)
    want = ort_contrib_moe(inputs, 2, "swiglu" if gated else activation, normalize, gated)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


# ---- HF-family blocks through onnxgen.export.moe -------------------------------------------------

@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "deepseek_v3", "llama4_text", "ernie4_5_moe"])
def test_hf_family_block(rng, model_type):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_moe import T, hf_block, hf_forward, numpy_state

    from onnxgen.backends.reference import evaluator
    from onnxgen.export.moe import build_moe_block_model, moe_from_hf

    config, block = hf_block(model_type, int(rng.integers(2**31)))
    x = rng.standard_normal((T, config.hidden_size)).astype(np.float32)
    model = build_moe_block_model(moe_from_hf(model_type, config.to_dict(), numpy_state(block)))
    got = run_kernel(model, {"X": x})
    want = evaluator(model).run(None, {"X": x})
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[0], hf_forward(block, x), rtol=1e-4, atol=1e-4)


# ---- bad inputs: onnxruntime reports the kernel's message ------------------------------------------

def loose_model(op_type, inputs, outputs, **attrs):
    """A one-node model with no shape inference, so the kernel sees what the checker would refuse."""
    names = [n if a is not None else "" for n, a in inputs.items()]
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node(op_type, names, outputs, domain=DOMAIN, **attrs)
    graph = helper.make_graph(
        [node], "bad",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None)
         for n, a in inputs.items() if a is not None],
        [helper.make_value_info(o, onnx.TypeProto()) for o in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])


def small(rng, experts=8, hidden=16, inter=12, tokens=3):
    return moe_inputs(rng, tokens, hidden, experts, inter)


MOE_BAD = [
    ("k > E", {}, dict(k=9), "k=9 exceeds the number of experts E=8"),
    ("k < 1", {}, dict(k=0), "k must be >= 1"),
    ("unknown activation", {}, dict(k=2, activation="swish"), "unknown activation 'swish'"),
    ("unknown scoring", {}, dict(k=2, scoring="tanh"), "unknown scoring 'tanh'"),
    ("groups", {}, dict(k=1, n_group=3, topk_group=1), "do not split into n_group=3"),
    ("topk_group", {}, dict(k=1, n_group=2, topk_group=3), "topk_group must lie in"),
    ("weights dtype", {"gate_up_weights": np.zeros((8, 16, 24), np.float16)}, dict(k=2), "X's type"),
    ("int X", {"X": np.zeros((3, 16), np.int32)}, dict(k=2), "'X' must be float32, float16 or bfloat16"),
    ("H mismatch", {"down_weights": np.zeros((8, 12, 15), np.float32)}, dict(k=2), r"H \(hidden size\)"),
    ("E mismatch", {"gate_up_weights": np.zeros((7, 16, 24), np.float32)}, dict(k=2), r"E \(experts\)"),
    ("I mismatch", {"down_weights": np.zeros((8, 11, 16), np.float32)}, dict(k=2), "N1=24 columns"),
    ("T mismatch", {"router_logits": np.zeros((2, 8), np.float32)}, dict(k=2), r"T \(tokens\)"),
    ("rank", {"X": np.zeros((1, 3, 16), np.float32)}, dict(k=2), "'X' must have rank 2"),
    ("bias shape", {"down_bias": np.zeros((8, 15), np.float32)}, dict(k=2), "down_bias must have shape"),
    ("selection bias shape", {"selection_bias": np.zeros(7, np.float32)}, dict(k=2), "selection_bias has shape"),
    ("missing weights", {"down_weights": None}, dict(k=2), "required unless the 'expert' graph"),
]


@pytest.mark.parametrize("case,changes,attrs,message", MOE_BAD, ids=[b[0] for b in MOE_BAD])
def test_moe_errors(rng, case, changes, attrs, message):
    inputs = {**small(rng), **changes}
    model = loose_model("MoE", inputs, ["Y"], **attrs)
    with pytest.raises(Exception, match=message):
        run_kernel(model, inputs)


GMM_BAD = [
    ("index too large", {"group_indices": np.array([[0], [3], [1]], np.int64)}, r"must lie in \[-3, 3\); got 3"),
    ("index too small", {"group_indices": np.array([[0], [-4], [1]], np.int64)}, "got -4"),
    ("int32 indices", {"group_indices": np.zeros((3, 1), np.int32)}, "'group_indices' must be int64"),
    ("K mismatch", {"weights": np.zeros((3, 5, 6), np.float32)}, "shapes do not agree"),
    ("M mismatch", {"group_indices": np.zeros((2, 1), np.int64)}, "shapes do not agree"),
    ("weights dtype", {"weights": np.zeros((3, 4, 6), np.float16)}, "'weights' must have the type of 'input'"),
    ("bias shape", {"bias": np.zeros((3, 5), np.float32)}, "bias must have shape"),
]


@pytest.mark.parametrize("case,changes,message", GMM_BAD, ids=[b[0] for b in GMM_BAD])
def test_grouped_matmul_errors(case, changes, message):
    inputs = {"input": np.zeros((3, 4), np.float32), "weights": np.zeros((3, 4, 6), np.float32),
              "group_indices": np.zeros((3, 1), np.int64), "bias": None, **changes}
    model = loose_model("GroupedMatMul", inputs, ["output"])
    with pytest.raises(Exception, match=message):
        run_kernel(model, inputs)


@pytest.mark.parametrize("m,k_dim,n", [(1, 31, 15), (16, 32, 16), (17, 33, 17), (33, 100, 40), (70, 64, 300)])
def test_grouped_bf16_tile_edges(rng, m, k_dim, n):
    """bf16 weights take the AMX tile path where the CPU has it (kernels/csrc/amx.h: 16-row,
    16-column and 32-deep tiles, zero padded): counts on and off the tile edges."""
    check_grouped(grouped_inputs(rng, m, k_dim, 3, n, 2, True, BF16))


def check_dense(rng, shape, n, constant, dtype=BF16):
    """The dense form of passes.bf16_linear: GroupedMatMul(input fp32 [..., K], weights [K, N]) with
    no group_indices.  bf16 weights: against numpy on the input rounded to bf16 (the AMX path
    rounds it; the widening path does not, and stays within the same tolerance).  fp32 weights
    (packed into column tiles when constant): against numpy in float64, at 1e-4."""
    k_dim = shape[-1]
    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal((k_dim, n)) / np.sqrt(k_dim)).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(w.dtype) if dtype != BF16 else TensorProto.BFLOAT16
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape)),
              helper.make_tensor_value_info("w", elem, [k_dim, n])]
    graph = helper.make_graph([helper.make_node("GroupedMatMul", ["x", "w"], ["y"], domain="onnxgen.preview")], "g",
                              inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("onnxgen.preview", 1)])
    (got,) = run_kernel(model, as_initializers(model, {"x": x, "w": w}, ["w"] if constant else []))
    tol = 1e-2 if dtype == BF16 else 1e-4
    want = (x.astype(BF16) if dtype == BF16 else x).astype(np.float64) @ w.astype(np.float64)
    assert got.shape == (*shape[:-1], n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("constant", [True, False], ids=["packed-at-creation", "per-call"])
@pytest.mark.parametrize("shape,n", [((1, 31), 15), ((17, 64), 300), ((2, 3, 100), 40)])
def test_dense_bf16_linear(rng, shape, n, constant):
    check_dense(rng, shape, n, constant)


@pytest.mark.parametrize("constant", [True, False], ids=["packed-at-creation", "per-call"])
@pytest.mark.parametrize("shape,n", [((1, 31), 15), ((17, 300), 600), ((2, 3, 100), 40)])
def test_dense_fp32(rng, shape, n, constant):
    check_dense(rng, shape, n, constant, np.float32)


def test_dense_bf16_linear_without_amx():
    """The dense form on the widening GEMM path (ONNXGEN_NO_AMX=1), in a fresh process."""
    script = f"""
import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
import numpy as np
import test_kernels_moe as t
rng = np.random.default_rng(5)
for constant in (True, False):
    t.check_dense(rng, (17, 64), 300, constant)
print("ok")
"""
    env = {**os.environ, "ONNXGEN_NO_AMX": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


CONSTANT_SIZES = [(3, 96, 64), (70, 96, 72), (40, 96, 40), (9, 300, 280)]  # (tokens, hidden, intermediate)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
def test_constant_expert_weights(rng, dtype, layout):
    """Expert weights as initializers, packed at session creation (gemm.h's PackedWeights): fp32
    into column tiles of 256 read in place, fp16 into such tiles in fp16, bf16 into the AMX tile
    layout where the CPU has it (else tiles, as fp16; test_no_amx_matches).
    Decode and prefill sizes; hidden 300 and intermediate 280 put tails on the 256-column tiles
    (and on concatenated gate/up's second half, whose tiles start at 280) and run more than one
    128-row panel of the streamed path."""
    for tokens, hidden, inter in CONSTANT_SIZES:
        check_moe(moe_inputs(rng, tokens, hidden, 4, inter, dtype=dtype, gate_up_bias=True), constant_weights=True, k=2,
                  gate_up_layout=layout)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=["fp32", "fp16", "bf16"])
def test_constant_group_weights(rng, dtype):
    """GroupedMatMul's weights as an initializer (packed as the experts' are), tails and panels."""
    for m, k_dim, n in ((5, 300, 600), (40, 64, 129)):
        check_grouped(grouped_inputs(rng, m, k_dim, 3, n, 2, True, dtype), constant_weights=True)
