"""Random ragged paged-attention batches and an oracle: onnx's Attention-25 reference per sequence.

The oracle gathers each sequence's logical keys/values from the cache through the block table
(written here, independently of the op) and hands them to ``onnx.reference``'s Attention with
``past_key``/``past_value``, so bottom-right causality, the window and softcap are onnx's.
A head sink is expressed for the oracle as one extra key at the front of the past whose score
is exactly the sink logit (extra query/key dimensions carry it), with a zero value; a window
would hide that key, so sinks are checked with windows against transformers' gpt-oss instead.
"""

from __future__ import annotations

import functools

import numpy as np
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxgen.testing import single_node_model

HEAD_SIZE = 8
OUTPUTS = ["output", "key_cache_out", "value_cache_out"]


# ---- random ragged batches ----------------------------------------------------------------

def random_batch(rng, *, batch, block_size, group, kv_heads=2, mode="mixed", dtype=np.float32,
                 with_slots=False, with_sink=False, v_head_size=HEAD_SIZE, max_len=40):
    """A ragged batch with a shuffled block table that has unused blocks and −1 entries."""
    if mode == "prefill":
        past = np.zeros(batch, np.int32)
        new = rng.integers(1, max_len, batch)
    elif mode == "decode":
        past = rng.integers(1, max_len, batch)
        new = np.ones(batch, np.int64)
    else:  # mixed: prefills, chunked prefills and decodes together
        past = rng.integers(0, max_len, batch) * rng.integers(0, 2, batch)
        new = np.where(rng.integers(0, 2, batch) == 1, 1, rng.integers(1, max_len, batch))
    past, new = past.astype(np.int32), new.astype(np.int32)
    totals = past + new
    needed = -(-totals // block_size)
    max_blocks = int(needed.max()) + int(rng.integers(0, 3))
    num_blocks = int(needed.sum()) + int(rng.integers(1, 4))  # some blocks belong to nobody
    order = rng.permutation(num_blocks)
    table = np.full((batch, max_blocks), -1, np.int32)
    used = 0
    for b in range(batch):
        table[b, : needed[b]] = order[used: used + needed[b]]
        used += needed[b]
    heads = kv_heads * group
    tokens = int(new.sum())
    inputs = {
        "query": rng.standard_normal((tokens, heads * HEAD_SIZE)).astype(dtype),
        "key": rng.standard_normal((tokens, kv_heads * HEAD_SIZE)).astype(dtype),
        "value": rng.standard_normal((tokens, kv_heads * v_head_size)).astype(dtype),
        "key_cache": rng.standard_normal((num_blocks, block_size, kv_heads, HEAD_SIZE)).astype(dtype),
        "value_cache": rng.standard_normal((num_blocks, block_size, kv_heads, v_head_size)).astype(dtype),
        "cumulative_sequence_length": np.concatenate([[0], np.cumsum(new)]).astype(np.int32),
        "past_seqlens": past,
        "block_table": table,
        "slot_mapping": None,
        "head_sink": rng.standard_normal(heads).astype(dtype) if with_sink else None,
    }
    if with_slots:
        slots = np.concatenate([
            table[b, (past[b] + np.arange(new[b])) // block_size] * block_size + (past[b] + np.arange(new[b])) % block_size
            for b in range(batch)
        ]).astype(np.int32)
        slots[rng.random(tokens) < 0.3] = -1
        inputs["slot_mapping"] = slots
    return inputs, dict(num_heads=heads, kv_num_heads=kv_heads)


# ---- the oracle ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def onnx_attention(q_heads, kv_heads, scale, softcap, is_causal, window):
    """onnx's reference Attention-25 with past_key/past_value, 4-D inputs."""
    names = ["Q", "K", "V", "", "past_key", "past_value"]
    node = helper.make_node("Attention", names, ["Y"], scale=scale,  # 4-D: head counts come from shapes
                            softcap=softcap, is_causal=is_causal, left_window_size=window)
    graph = helper.make_graph(
        [node], "oracle",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, None, None, None]) for n in names if n],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
    )
    return ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)]))


def oracle(inputs, num_heads, kv_num_heads, scale=0.0, softcap=0.0, is_causal=1, local_window_size=-1):
    f32 = {k: (v.astype(np.float32) if v is not None and v.dtype != np.int32 else v) for k, v in inputs.items()}
    cu, past, table = inputs["cumulative_sequence_length"], inputs["past_seqlens"], inputs["block_table"]
    block_size = inputs["key_cache"].shape[1]
    d, dv = HEAD_SIZE, inputs["value_cache"].shape[3]
    scale = scale or 1 / np.sqrt(d)
    sink = f32["head_sink"]
    group = num_heads // kv_num_heads
    outputs = []
    for b in range(len(past)):
        rows = slice(cu[b], cu[b + 1])
        n, p = cu[b + 1] - cu[b], past[b]
        pos = np.arange(p)
        where = (table[b, pos // block_size], pos % block_size)
        past_k, past_v = f32["key_cache"][where], f32["value_cache"][where]  # [p, Hkv, D]
        q = f32["query"][rows].reshape(n, num_heads, d)
        k = f32["key"][rows].reshape(n, kv_num_heads, d)
        v = f32["value"][rows].reshape(n, kv_num_heads, dv)
        if sink is not None:  # one extra key whose score is the sink: q·k = sink/scale per query head
            one_hot = np.tile(np.eye(group, dtype=np.float32), (kv_num_heads, 1))  # [Hq, group]
            q = np.concatenate([q, np.broadcast_to(one_hot, (n, num_heads, group))], axis=-1)
            k = np.concatenate([k, np.zeros((n, kv_num_heads, group), np.float32)], axis=-1)
            past_k = np.concatenate([past_k, np.zeros((p, kv_num_heads, group), np.float32)], axis=-1)
            sink_key = (sink / scale).reshape(1, kv_num_heads, group)
            sink_key = np.concatenate([np.zeros((1, kv_num_heads, d), np.float32), sink_key], axis=-1)
            past_k = np.concatenate([sink_key, past_k])
            past_v = np.concatenate([np.zeros((1, kv_num_heads, dv), np.float32), past_v])
        heads_first = lambda x: np.ascontiguousarray(x.transpose(1, 0, 2)[None])  # noqa: E731
        run = onnx_attention(num_heads, kv_num_heads, float(scale), float(softcap), is_causal, local_window_size)
        y = run.run(None, dict(Q=heads_first(q), K=heads_first(k), V=heads_first(v),
                               past_key=heads_first(past_k), past_value=heads_first(past_v)))[0]
        outputs.append(y[0].transpose(1, 0, 2).reshape(n, num_heads * dv))
    return np.concatenate(outputs)


def expected_caches(inputs):
    cu, past, table = inputs["cumulative_sequence_length"], inputs["past_seqlens"], inputs["block_table"]
    key_cache, value_cache = inputs["key_cache"].copy(), inputs["value_cache"].copy()
    block_size = key_cache.shape[1]
    kv_heads = key_cache.shape[2]
    slots = inputs["slot_mapping"]
    for b in range(len(past)):
        for i, t in enumerate(range(cu[b], cu[b + 1])):
            if slots is not None:
                slot = slots[t]
            else:
                pos = past[b] + i
                slot = table[b, pos // block_size] * block_size + pos % block_size
            if slot < 0:
                continue
            key_cache[slot // block_size, slot % block_size] = inputs["key"][t].reshape(kv_heads, -1)
            value_cache[slot // block_size, slot % block_size] = inputs["value"][t].reshape(kv_heads, -1)
    return key_cache, value_cache


def check_runners(inputs, attrs, runners, *, low_precision=False):
    """Run the one-node model through each ``(label, tolerance, run(model, inputs))`` and compare
    its output with the oracle and its caches, exactly, with the expected writes."""
    want = oracle(inputs, **attrs)
    want_k, want_v = expected_caches(inputs)
    model = single_node_model("PagedAttention", inputs, OUTPUTS, **attrs)
    for label, tol, run in runners:
        tol = max(tol, 4e-3) if low_precision else tol
        out, key_cache, value_cache = run(model, inputs)
        assert out.dtype == inputs["query"].dtype, label
        np.testing.assert_allclose(out.astype(np.float32), want, rtol=tol, atol=tol, err_msg=label)
        np.testing.assert_array_equal(key_cache, want_k, err_msg=label)
        np.testing.assert_array_equal(value_cache, want_v, err_msg=label)
