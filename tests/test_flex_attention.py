"""ai.onnx.preview.FlexAttention, as onnx defines it, against PyTorch's flex_attention.

The whole-tensor score_mods are the library's pointwise mods lifted by
``score_mods.flex_score_mod`` (index tensors from Shape/Range/Unsqueeze, as torch.onnx writes
them).  Three ways to run the model: onnx's own reference (its ReferenceEvaluator evaluates the
op's context-dependent function), the expanded model on stock onnxruntime, and
``onnxgen.backends.ort.session`` (no manual step: the pointwise score_mods run on the compiled
kernel through passes.flex_kernel, a prob_mod is expanded; tests/test_flex_kernel.py checks which).
Tolerances (fp32, abs and rel): 1e-5 for onnx's reference, 1e-4 on onnxruntime; fp16 5e-3.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from flex_cases import library, t_compose, torch_flex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxgen.backends.ort import session
from onnxgen.ops import score_mods as sm
from onnxgen.testing import run_expanded_on_ort


def flex_model(score_mod, q_heads, kv_heads, dtype=TensorProto.FLOAT, **attrs):
    names = ("Q", "K", "V")
    node = helper.make_node("FlexAttention", list(names), ["Y"], domain="ai.onnx.preview", **attrs,
                            **({"score_mod": score_mod} if score_mod is not None else {}))
    heads = (q_heads, kv_heads, kv_heads)
    graph = helper.make_graph(
        [node], "flex",
        [helper.make_tensor_value_info(n, dtype, [None, h, None, 8]) for n, h in zip(names, heads)],
        [helper.make_tensor_value_info("Y", dtype, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25), helper.make_opsetid("ai.onnx.preview", 1)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def run_session(model, feeds):
    return [session(model, threads=1).run(feeds)["Y"]]


RUNNERS = [
    ("onnx reference", 1e-5, lambda m, f: ReferenceEvaluator(m).run(None, f)),
    ("expanded on onnxruntime", 1e-4, run_expanded_on_ort),
    ("onnxgen session", 1e-4, run_session),
]


def random_qkv(rng, batch, q_heads, kv_heads, q_len, kv_len, dtype=np.float32):
    return {"Q": rng.standard_normal((batch, q_heads, q_len, 8)).astype(dtype),
            "K": rng.standard_normal((batch, kv_heads, kv_len, 8)).astype(dtype),
            "V": rng.standard_normal((batch, kv_heads, kv_len, 8)).astype(dtype)}


@pytest.mark.parametrize("index", range(10))
def test_library_mods_match_flex_attention(rng, index):
    feeds = random_qkv(rng, 2, 4, 2, 6, 6)
    name, mod, torch_mod = library(rng, 4, 2, 6)[index]
    want = torch_flex(feeds["Q"], feeds["K"], feeds["V"], torch_mod)
    model = flex_model(sm.flex_score_mod(mod), 4, 2)
    for label, tol, run in RUNNERS:
        np.testing.assert_allclose(run(model, feeds)[0], want, rtol=tol, atol=tol, err_msg=f"{name}: {label}")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), picks=st.lists(st.integers(0, 9), min_size=2, max_size=3),
       heads=st.sampled_from([(4, 4), (4, 2), (4, 1)]), q_len=st.integers(1, 7), scale=st.sampled_from([None, 0.2]))
def test_random_compositions(seed, picks, heads, q_len, scale):
    """Queries shorter than keys too: positions count from 0 on both sides, as in flex_attention."""
    rng = np.random.default_rng(seed)
    feeds = random_qkv(rng, 2, *heads, q_len, 7)
    cases = library(rng, heads[0], 2, 7)
    picks = [i for i in picks if cases[i][0] != "document_mask_shared"] or [3]
    mod, torch_mod = sm.compose(*(cases[i][1] for i in picks)), t_compose(*(cases[i][2] for i in picks))
    want = torch_flex(feeds["Q"], feeds["K"], feeds["V"], torch_mod, scale=scale)
    # flex_attention gives 0 for a fully masked row; onnx's softmax gives NaN there (see the doc
    # of ai.onnx.preview.FlexAttention): compare the rows that see at least one key.
    seen = np.isfinite(want).all(-1) & (np.abs(want).sum(-1) > 0)
    model = flex_model(sm.flex_score_mod(mod), *heads, **({"scale": scale} if scale else {}))
    for label, tol, run in RUNNERS:
        got = run(model, feeds)[0]
        np.testing.assert_allclose(got[seen], want[seen], rtol=tol, atol=tol, err_msg=label)


def test_no_score_mod_and_fp16(rng):
    feeds = random_qkv(rng, 1, 2, 2, 5, 9, np.float16)
    want = torch_flex(*(feeds[n].astype(np.float32) for n in "QKV"), None)
    model = flex_model(sm.flex_score_mod(sm.softcap(50.0)), 2, 2, TensorProto.FLOAT16)
    want_capped = torch_flex(*(feeds[n].astype(np.float32) for n in "QKV"), lambda s, b, h, q, kv: 50 * (s / 50).tanh())
    for label, _, run in RUNNERS:
        got = run(model, feeds)[0]
        assert got.dtype == np.float16, label
        np.testing.assert_allclose(got.astype(np.float32), want_capped, rtol=5e-3, atol=5e-3, err_msg=label)
    model = flex_model(None, 2, 2, TensorProto.FLOAT16)
    got = run_session(model, feeds)[0]
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=5e-3, atol=5e-3)


def test_prob_mod(rng):
    """prob_mod (no flex_attention twin): probabilities squared, against numpy."""
    feeds = random_qkv(rng, 1, 2, 1, 3, 4)
    p_in = helper.make_tensor_value_info("p", TensorProto.FLOAT, [None] * 4)
    prob_mod = helper.make_graph([helper.make_node("Mul", ["p", "p"], ["o"])], "square", [p_in],
                                 [helper.make_tensor_value_info("o", TensorProto.FLOAT, [None] * 4)])
    model = flex_model(None, 2, 1, prob_mod=prob_mod)
    k, v = np.repeat(feeds["K"], 2, axis=1), np.repeat(feeds["V"], 2, axis=1)
    s = feeds["Q"] @ k.transpose(0, 1, 3, 2) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = (p * p) @ v
    for label, tol, run in RUNNERS:
        np.testing.assert_allclose(run(model, feeds)[0], want, rtol=tol, atol=tol, err_msg=label)
