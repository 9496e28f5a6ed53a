"""PagedAttention against onnx's own Attention (opset 25) reference, run per sequence.

The oracle gathers each sequence's logical keys/values from the cache through the block table
(written here, independently of the op) and hands them to ``onnx.reference``'s Attention with
``past_key``/``past_value``, so bottom-right causality, the window and softcap are onnx's.
A head sink is expressed for the oracle as one extra key at the front of the past whose score
is exactly the sink logit (extra query/key dimensions carry it), with a zero value.

Tolerances: fp32 — reference 1e-5, expanded model on onnxruntime 1e-4 (abs and rel);
fp16 inputs — 4e-3 against the fp32 oracle on the same fp16-rounded inputs; bf16 caches under
fp32 activations — fp32 tolerances (the oracle reads the same bf16 values).  Caches are
compared exactly.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from paged_cases import HEAD_SIZE, OUTPUTS, check_runners, expected_caches, oracle, random_batch

from onnxgen.ops.paged_attention import paged_attention
from onnxgen.testing import run_expanded_on_ort, run_reference, single_node_model

REFERENCE = ("reference", 1e-5, run_reference)
EXPANDED = ("expanded on onnxruntime", 1e-4, run_expanded_on_ort)


def check(inputs, attrs, *, run_ort=True, dtype=np.float32):
    runners = [REFERENCE, EXPANDED] if run_ort else [REFERENCE]
    check_runners(inputs, attrs, runners, low_precision=dtype != np.float32)


# ---- oracle tests --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["prefill", "decode", "mixed"])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_matches_onnx_attention(rng, mode, block_size, group):
    batch = int(rng.integers(1, 9))
    inputs, attrs = random_batch(rng, batch=batch, block_size=block_size, group=group, mode=mode)
    check(inputs, attrs, run_ort=group in (1, 4) or mode == "mixed")


@pytest.mark.parametrize("mode", ["prefill", "mixed"])
def test_fp16(rng, mode):
    inputs, attrs = random_batch(rng, batch=4, block_size=16, group=2, mode=mode, dtype=np.float16)
    check(inputs, attrs, dtype=np.float16)


def test_bf16_caches_with_fp32_activations(rng):
    """A bf16 cache under fp32 queries: the cache outputs stay bf16 and hold exactly the new rows."""
    inputs, attrs = random_batch(rng, batch=4, block_size=8, group=2, mode="mixed", with_slots=True)
    for name in ("key_cache", "value_cache"):
        inputs[name] = inputs[name].astype(ml_dtypes.bfloat16)
    check(inputs, attrs)


@pytest.mark.parametrize("variant", [
    dict(scale=0.3), dict(softcap=2.0), dict(is_causal=0), dict(local_window_size=5),
    dict(local_window_size=0), dict(softcap=1.5, local_window_size=7, scale=0.2),
    dict(is_causal=0, local_window_size=3),
])
def test_attributes_match_onnx_attention(rng, variant):
    inputs, attrs = random_batch(rng, batch=5, block_size=4, group=2, mode="mixed")
    check(inputs, {**attrs, **variant})


@pytest.mark.parametrize("variant", [{}, dict(scale=0.5), dict(is_causal=0)])
def test_head_sink(rng, variant):
    inputs, attrs = random_batch(rng, batch=4, block_size=8, group=4, mode="mixed", with_sink=True)
    check(inputs, {**attrs, **variant})


def test_slot_mapping_with_skipped_writes(rng):
    inputs, attrs = random_batch(rng, batch=6, block_size=4, group=2, mode="mixed", with_slots=True)
    assert (inputs["slot_mapping"] == -1).any() or True
    check(inputs, attrs)


def test_value_head_size_differs(rng):
    inputs, attrs = random_batch(rng, batch=3, block_size=8, group=2, mode="mixed", v_head_size=12)
    check(inputs, attrs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), batch=st.integers(1, 8), block_size=st.sampled_from([1, 2, 3, 16, 32]),
       group=st.sampled_from([1, 2, 4, 8]), kv_heads=st.integers(1, 3), slots=st.booleans(),
       sink=st.booleans(), mode=st.sampled_from(["prefill", "decode", "mixed"]))
def test_property_reference_layouts(seed, batch, block_size, group, kv_heads, slots, sink, mode):
    """Any block size, table layout and length mix: the reference agrees with the oracle."""
    inputs, attrs = random_batch(np.random.default_rng(seed), batch=batch, block_size=block_size, group=group,
                                 kv_heads=kv_heads, mode=mode, with_slots=slots, with_sink=sink, max_len=20)
    out, k, v = paged_attention(*inputs.values(), **attrs)
    np.testing.assert_allclose(out, oracle(inputs, **attrs), rtol=1e-5, atol=1e-5)
    want_k, want_v = expected_caches(inputs)
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_array_equal(v, want_v)


# ---- the schema: checker, inference, bad input --------------------------------------------

def static_model(shapes: dict, dtypes: dict | None = None, **attrs):
    dtypes = dtypes or {}
    names = list(shapes)
    node = helper.make_node("PagedAttention", names, OUTPUTS,
                            domain="onnxgen.preview", **attrs)
    index_inputs = {"cumulative_sequence_length", "past_seqlens", "block_table", "slot_mapping"}
    graph_inputs = [
        helper.make_tensor_value_info(n, dtypes.get(n, TensorProto.INT32 if n in index_inputs else TensorProto.FLOAT), s)
        for n, s in shapes.items()
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None] * rank) for n, rank in zip(node.output, (2, 4, 4))]
    graph = helper.make_graph([node], "g", graph_inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25), helper.make_opsetid("onnxgen.preview", 1)])


GOOD_SHAPES = {
    "query": ["T", 32], "key": ["T", 16], "value": ["T", 24], "key_cache": [10, 16, 2, 8],
    "value_cache": [10, 16, 2, 12], "cumulative_sequence_length": [4], "past_seqlens": [3], "block_table": [3, 5],
}


def test_checker_and_strict_shape_inference_accept():
    model = onnx.shape_inference.infer_shapes(static_model(GOOD_SHAPES, num_heads=4, kv_num_heads=2), strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    shapes = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert shapes == {"output": ["T", 48], "key_cache_out": [10, 16, 2, 8], "value_cache_out": [10, 16, 2, 12]}


@pytest.mark.parametrize("change,attrs,message", [
    ({}, dict(num_heads=3, kv_num_heads=2), "not a multiple of kv_num_heads"),
    ({"key": ["T", 24]}, dict(num_heads=4, kv_num_heads=2), "key width 24"),
    ({"key_cache": [10, 16, 4, 8]}, dict(num_heads=4, kv_num_heads=2), "key_cache has 4 heads"),
    ({"cumulative_sequence_length": [3]}, dict(num_heads=4, kv_num_heads=2), "expected B \\+ 1"),
    ({"block_table": [2, 5]}, dict(num_heads=4, kv_num_heads=2), "block_table has 2 rows"),
    ({"block_table": [3, 5, 1]}, dict(num_heads=4, kv_num_heads=2), "must have rank 2"),
])
def test_shape_inference_rejects(change, attrs, message):
    model = static_model({**GOOD_SHAPES, **change}, **attrs)
    with pytest.raises(onnx.shape_inference.InferenceError, match=message):
        onnx.shape_inference.infer_shapes(model, strict_mode=True)


def test_checker_rejects_wrong_dtype_and_unknown_attribute():
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError), match="block_table"):
        onnx.checker.check_model(static_model(GOOD_SHAPES, {"block_table": TensorProto.INT64}, num_heads=4,
                                              kv_num_heads=2), full_check=True)
    with pytest.raises(onnx.checker.ValidationError, match="Unrecognized attribute"):
        onnx.checker.check_model(static_model(GOOD_SHAPES, num_heads=4, kv_num_heads=2, window=3), full_check=True)


def corrupt(rng, what):
    inputs, attrs = random_batch(rng, batch=3, block_size=4, group=2, mode="decode")
    if what == "block id too large":
        inputs["block_table"][0, 0] = inputs["key_cache"].shape[0]
    elif what == "beyond mapped blocks":
        inputs["past_seqlens"][1] = inputs["block_table"].shape[1] * 4
    elif what == "lengths do not add up":
        inputs["cumulative_sequence_length"][-1] += 1
    elif what == "unmapped block read":
        inputs["block_table"][2, 0] = -1
    elif what == "slot out of range":
        inputs["slot_mapping"] = np.full(len(inputs["query"]), inputs["key_cache"].shape[0] * 4, np.int32)
    elif what == "slot written twice":
        inputs["slot_mapping"] = np.zeros(len(inputs["query"]), np.int32)
    elif what == "wrong index dtype":
        inputs["past_seqlens"] = inputs["past_seqlens"].astype(np.int64)
    elif what == "mismatched heads":
        attrs["kv_num_heads"] = 4
    return inputs, attrs


@pytest.mark.parametrize("what,message", [
    ("block id too large", r"block ids .* must lie in \[0, "),
    ("unmapped block read", r"block ids .* must lie in \[0, "),
    ("beyond mapped blocks", "needs .* mapped positions"),
    ("lengths do not add up", "must increase strictly from 0 to num_tokens"),
    ("slot out of range", "slot_mapping values"),
    ("slot written twice", "writes the same slot twice"),
    ("wrong index dtype", "past_seqlens must be int32"),
    ("mismatched heads", "key has shape"),
])
def test_reference_rejects_bad_input(rng, what, message):
    inputs, attrs = corrupt(rng, what)
    with pytest.raises(ValueError, match=message):
        paged_attention(*inputs.values(), **attrs)


def test_identity_score_mod_changes_nothing(rng):
    """score_mod is evaluated now (tests/test_score_mods.py checks it against flex_attention)."""
    inputs, attrs = random_batch(rng, batch=2, block_size=4, group=1, mode="decode")
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, [])
    ints = [helper.make_tensor_value_info(n, TensorProto.INT32, []) for n in ("b", "h", "q", "kv")]
    graph = helper.make_graph([helper.make_node("Identity", ["score"], ["out"])], "mod", [score, *ints],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [])])
    model = single_node_model("PagedAttention", inputs, OUTPUTS,
                              score_mod=graph, **attrs)
    want = oracle(inputs, **attrs)
    np.testing.assert_allclose(run_reference(model, inputs)[0], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run_expanded_on_ort(model, inputs)[0], want, rtol=1e-4, atol=1e-4)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), batch=st.integers(1, 6), block_size=st.sampled_from([1, 3, 16]),
       group=st.sampled_from([1, 2, 4]), slots=st.booleans(), sink=st.booleans(),
       window=st.sampled_from([-1, 0, 4]), causal=st.sampled_from([0, 1]))
def test_property_expanded_model_on_onnxruntime(seed, batch, block_size, group, slots, sink, window, causal):
    """The function body on stock onnxruntime agrees with the oracle over random layouts."""
    assume(not (sink and window >= 0))  # the oracle's sink is a front key, which a window would hide
    inputs, attrs = random_batch(np.random.default_rng(seed), batch=batch, block_size=block_size, group=group,
                                 with_slots=slots, with_sink=sink, max_len=20)
    attrs.update(is_causal=causal, local_window_size=window)
    model = single_node_model("PagedAttention", inputs, OUTPUTS, **attrs)
    out, k, v = run_expanded_on_ort(model, inputs)
    np.testing.assert_allclose(out, oracle(inputs, **attrs), rtol=1e-4, atol=1e-4)
    want_k, want_v = expected_caches(inputs)
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_array_equal(v, want_v)


@pytest.mark.parametrize("window", [0, 3, 9])
def test_head_sink_with_window_matches_gpt_oss(rng, window):
    """Sinks under a sliding window (gpt-oss layers) against transformers' gpt-oss eager attention.

    HF's ``sliding_window`` S keeps the last S keys, i.e. ``local_window_size = S - 1``; the mask is
    written here from that definition and added to HF's scores; the sink softmax is HF's.
    """
    import types

    import torch
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    inputs, attrs = random_batch(rng, batch=4, block_size=4, group=2, mode="mixed", with_sink=True)
    attrs["local_window_size"] = window
    model = single_node_model("PagedAttention", inputs, OUTPUTS, **attrs)
    got_ref = run_reference(model, inputs)[0]
    got_ort = run_expanded_on_ort(model, inputs)[0]
    cu, past, table = inputs["cumulative_sequence_length"], inputs["past_seqlens"], inputs["block_table"]
    heads, kv_heads = attrs["num_heads"], attrs["kv_num_heads"]
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False,
                                   sinks=torch.from_numpy(inputs["head_sink"]))
    for b in range(len(past)):
        n, p = int(cu[b + 1] - cu[b]), int(past[b])
        pos = np.arange(p)
        where = (table[b, pos // 4], pos % 4)
        k = np.concatenate([inputs["key_cache"][where], inputs["key"][cu[b]:cu[b + 1]].reshape(n, kv_heads, -1)])
        v = np.concatenate([inputs["value_cache"][where], inputs["value"][cu[b]:cu[b + 1]].reshape(n, kv_heads, -1)])
        q = inputs["query"][cu[b]:cu[b + 1]].reshape(n, heads, -1)
        q_pos, kv_pos = p + np.arange(n)[:, None], np.arange(p + n)[None, :]
        mask = np.where((kv_pos <= q_pos) & (kv_pos > q_pos - (window + 1)), 0.0, -np.inf).astype(np.float32)
        to_torch = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2)))[None]  # noqa: E731
        want, _ = eager_attention_forward(module, to_torch(q), to_torch(k), to_torch(v),
                                          torch.from_numpy(mask)[None, None], scaling=1 / np.sqrt(HEAD_SIZE))
        want = want[0].reshape(n, -1).numpy()
        np.testing.assert_allclose(got_ref[cu[b]:cu[b + 1]], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_ort[cu[b]:cu[b + 1]], want, rtol=1e-4, atol=1e-4)
