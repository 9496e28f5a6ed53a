"""PagedAttention: attention over a ragged batch whose keys and values live in a paged cache.

Per sequence the result is ONNX ``Attention`` (opset 25) over the logical sequence
``cache[0:past] ++ new tokens``; the new keys/values are also written into the caches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto
from onnx.reference.op_run import OpRun

from . import _schema as S
from . import flex_score
from .domain import DOMAIN, DOMAIN_VERSION

NAME = "PagedAttention"

DOC = """\
Attention for a ragged batch of `B` sequences whose earlier keys and values live in a paged
KV cache, as serving engines (vLLM, onnxruntime's `com.microsoft.PagedAttention`) lay it out.
The batch holds `num_tokens` new tokens in total: sequence `b` owns query rows
`cumulative_sequence_length[b] : cumulative_sequence_length[b+1]` (at least one), has
`past_seqlens[b]` tokens already cached, and its logical position `p` lives in cache block
`block_table[b, p // block_size]` at offset `p % block_size` (flat slot
`block * block_size + offset`). Prefill, chunked prefill and decode mix freely.

For each sequence the output equals ONNX `Attention` (opset 25) of its queries over the
logical keys/values `cache[0:past] ++ new`, where the new keys/values come from the `key` and
`value` inputs:

```
scores = (Q @ K^T) * scale                 # fp32; scale defaults to 1/sqrt(head_size)
scores = softcap * tanh(scores / softcap)  # if softcap > 0
scores = score_mod(scores, b, h, q_pos, kv_pos)   # if score_mod is given (see below)
mask: is_causal -> kv_pos <= q_pos (bottom-right: q_pos = past + row);
      local_window_size = W >= 0 -> kv_pos >= q_pos - W
probs = softmax over [scores, head_sink[h]]  # the sink joins the softmax, then is dropped
output = probs @ V                         # a fully masked row gives 0
```

Grouped-query attention: query head `h` reads KV head `h // (num_heads / kv_num_heads)`.
`head_sink` is a raw logit (not scaled, not soft-capped). fp16/bf16 inputs are computed in
fp32; the output has the query's type.

The outputs `key_cache_out` / `value_cache_out` are the caches with each new token's key and
value written at its slot: `slot_mapping[t]` when given (−1 skips the write; the token still
takes part in this step's attention), otherwise the slot of its position from the block table.
A kernel may alias them with the inputs and write in place.

Errors: a block id outside `[0, num_blocks)` where a position is read or written, a sequence
longer than its row of the block table, cumulative lengths that are not increasing from 0 to
`num_tokens`, slots out of range or written twice, and head counts that do not divide the
hidden sizes are refused.

`score_mod` (optional graph attribute) is the paged form of FlexAttention: a pointwise graph
`(score float32, batch int32, head int32, q_pos int32, kv_pos int32) -> score float32`, its five
inputs and one output in that order. `score` is the scaled (and soft-capped) logit, `batch` the
sequence's index in the batch, `head` the query head, `q_pos` and `kv_pos` absolute positions
in the sequence (`q_pos = past + row`). It is applied after softcap and before the causal and
window masks; a mask is written as −inf, and a row it masks completely gives 0. Every node is
elementwise with broadcasting (Add, Sub, Mul, Div, Neg, Abs, Tanh, Exp, Log, Sqrt, Pow, Where,
comparisons, And/Or/Not, Min/Max, Clip, Cast, Constant, Identity, …; a Gather reads a constant
1-D table at computed indices), and constants are scalars, so an implementation may evaluate it
on scalars, on broadcast tensors or over a vector of keys. Its value only matters at the pairs
the masks keep (`kv_pos < past + new`); a table it gathers from must cover them.
`onnxgen.ops.score_mods` builds the common ones (causal, sliding window, softcap, ALiBi,
relative position bias, prefix-LM, document masking) and composes them. onnxgen's kernel runs
it compiled to a small bytecode (`onnxgen.passes.compile_score_mod`): once per head and cache
block over a whole tile of query rows (masked pairs included, their values discarded), or, for a
graph that can fail (an integer division, a Gather at an index that varies with the positions),
once per query row, head and block over the visible keys only; the reference and the function
body evaluate the graph itself. Where the graph ends in masks made only of causal (`kv_pos <= q_pos`) and window
(`kv_pos >= q_pos - W`) bounds, the compiler hands those to the kernel as `is_causal` and
`local_window_size` (the kernel then skips the blocks they hide) and the bytecode computes the
rest; a plain mask needs no bytecode at all. The result is the same."""

SCHEMA = S.Schema(
    NAME, DOMAIN, DOMAIN_VERSION, DOC,
    inputs=[
        S.param("query", "T", "New queries `[num_tokens, num_heads * head_size]`."),
        S.param("key", "T", "New keys `[num_tokens, kv_num_heads * head_size]`."),
        S.param("value", "T", "New values `[num_tokens, kv_num_heads * v_head_size]`."),
        S.param("key_cache", "T_CACHE", "Key cache `[num_blocks, block_size, kv_num_heads, head_size]`."),
        S.param("value_cache", "T_CACHE", "Value cache `[num_blocks, block_size, kv_num_heads, v_head_size]`."),
        S.param("cumulative_sequence_length", "tensor(int32)", "Query row offsets `[B + 1]`, from 0 to num_tokens."),
        S.param("past_seqlens", "tensor(int32)", "Tokens already cached per sequence `[B]`."),
        S.param("block_table", "tensor(int32)", "Cache blocks of each sequence `[B, max_blocks]` (−1 unmapped)."),
        S.param("slot_mapping", "tensor(int32)", "Flat cache slot per new token `[num_tokens]` (−1 skips).", optional=True),
        S.param("head_sink", "T", "Per-head sink logit `[num_heads]`.", optional=True),
    ],
    outputs=[
        S.param("output", "T", "Attention output `[num_tokens, num_heads * v_head_size]`."),
        S.param("key_cache_out", "T_CACHE", "The key cache with the new keys written."),
        S.param("value_cache_out", "T_CACHE", "The value cache with the new values written."),
    ],
    type_constraints=[
        ("T", S.FLOATS, "Queries, new keys/values and output."),
        ("T_CACHE", S.FLOATS, "Cache element type."),
    ],
    attributes=[
        S.attr("num_heads", None, "Number of query heads."),
        S.attr("kv_num_heads", None, "Number of key/value heads (divides num_heads)."),
        S.attr("scale", 0.0, "Scale of Q·Kᵀ; 0 means 1/sqrt(head_size)."),
        S.attr("softcap", 0.0, "Soft cap of the scores (0 = off): softcap·tanh(score/softcap)."),
        S.attr("is_causal", 1, "Bottom-right causal mask: kv_pos <= q_pos."),
        S.attr("local_window_size", -1, "−1 unbounded; W >= 0: a query at q_pos sees kv_pos >= q_pos − W."),
        S.graph_attr("score_mod", "Pointwise (score, batch, head, q_pos, kv_pos) -> score graph."),
    ],
)


# ---- shape inference -----------------------------------------------------------------------

def infer(ctx) -> None:
    c = S.Inference(ctx, NAME)
    num_heads, kv_heads = c.attr("num_heads"), c.attr("kv_num_heads")
    if num_heads is None or kv_heads is None or num_heads <= 0 or kv_heads <= 0:
        c.fail(f"num_heads and kv_num_heads must be positive, got {num_heads} and {kv_heads}")
    if num_heads % kv_heads:
        c.fail(f"num_heads={num_heads} is not a multiple of kv_num_heads={kv_heads}")
    mod = ctx.get_attribute("score_mod")
    if mod is not None:
        try:
            flex_score.check(mod.g, NAME)
        except flex_score.ScoreModError as error:
            c.fail(str(error).removeprefix(f"{NAME}: "))
    q, k, v = c.rank(0, 2, "query"), c.rank(1, 2, "key"), c.rank(2, 2, "value")
    kc, vc = c.rank(3, 4, "key_cache"), c.rank(4, 4, "value_cache")
    cu, past = c.rank(5, 1, "cumulative_sequence_length"), c.rank(6, 1, "past_seqlens")
    table = c.rank(7, 2, "block_table")
    slots = c.rank(8, 1, "slot_mapping") if c.has(8) else None
    sink = c.rank(9, 1, "head_sink") if c.has(9) else None

    def same(a, b, what):
        if S.static(a) and S.static(b) and a != b:
            c.fail(what.format(a, b))

    head_size = None
    if q and S.static(q[1]):
        if q[1] % num_heads:
            c.fail(f"query width {q[1]} is not a multiple of num_heads={num_heads}")
        head_size = q[1] // num_heads
    if k and head_size and S.static(k[1]):
        same(k[1], kv_heads * head_size, "key width {} != kv_num_heads * head_size = {}")
    if kc:
        same(kc[2], kv_heads, "key_cache has {} heads but kv_num_heads is {}")
        same(kc[3], head_size, "key_cache head size {} != query head size {}")
    v_head_size = vc[3] if vc and S.static(vc[3]) else None
    if vc:
        same(vc[2], kv_heads, "value_cache has {} heads but kv_num_heads is {}")
    if v and S.static(v[1]):
        if v[1] % kv_heads:
            c.fail(f"value width {v[1]} is not a multiple of kv_num_heads={kv_heads}")
        same(v[1] // kv_heads, v_head_size, "value head size {} != value_cache head size {}")
        v_head_size = v_head_size or v[1] // kv_heads
    if kc and vc:
        same(kc[0], vc[0], "key_cache has {} blocks, value_cache {}")
        same(kc[1], vc[1], "key_cache block size {} != value_cache block size {}")
    for other, name in ((k, "key"), (v, "value"), (slots, "slot_mapping")):
        if q and other:
            same(q[0], other[0], f"query has {{}} tokens, {name} {{}}")
    if cu and past and S.static(cu[0]) and S.static(past[0]) and cu[0] != past[0] + 1:
        c.fail(f"cumulative_sequence_length has {cu[0]} entries; expected B + 1 = {past[0] + 1}")
    if table and past:
        same(table[0], past[0], "block_table has {} rows but past_seqlens has {}")
    if sink:
        same(sink[0], num_heads, "head_sink has {} entries but num_heads is {}")
    out_width = num_heads * v_head_size if v_head_size else None
    c.set_output(0, c.elem_type(0), [q[0] if q else None, out_width])
    c.set_output(1, c.elem_type(3), kc)
    c.set_output(2, c.elem_type(4), vc)


# ---- reference -----------------------------------------------------------------------------

@dataclass
class Layout:
    """Sizes read off the inputs once they are known to agree."""

    num_tokens: int
    batch: int
    head_size: int
    v_head_size: int
    num_blocks: int
    block_size: int
    group: int  # query heads per KV head


def check_inputs(query, key, value, key_cache, value_cache, cu, past, table, slots, sink,
                 num_heads: int, kv_num_heads: int) -> Layout:
    """Validate every input against the others; raise ValueError naming the first problem."""
    def fail(message):
        raise ValueError(f"PagedAttention: {message}")

    if num_heads <= 0 or kv_num_heads <= 0 or num_heads % kv_num_heads:
        fail(f"num_heads={num_heads} must be a positive multiple of kv_num_heads={kv_num_heads}")
    for name, array, rank in (("query", query, 2), ("key", key, 2), ("value", value, 2),
                              ("key_cache", key_cache, 4), ("value_cache", value_cache, 4),
                              ("cumulative_sequence_length", cu, 1), ("past_seqlens", past, 1),
                              ("block_table", table, 2)):
        if array.ndim != rank:
            fail(f"{name} must have rank {rank}, got shape {array.shape}")
    for name, array in (("cumulative_sequence_length", cu), ("past_seqlens", past), ("block_table", table),
                        ("slot_mapping", slots)):
        if array is not None and array.dtype != np.int32:
            fail(f"{name} must be int32, got {array.dtype}")
    if not (query.dtype == key.dtype == value.dtype) or key_cache.dtype != value_cache.dtype:
        fail(f"query/key/value must share a dtype and so must the caches; got {query.dtype}, {key.dtype}, "
             f"{value.dtype} and {key_cache.dtype}, {value_cache.dtype}")
    tokens = query.shape[0]
    if query.shape[1] % num_heads:
        fail(f"query width {query.shape[1]} is not a multiple of num_heads={num_heads}")
    head_size = query.shape[1] // num_heads
    num_blocks, block_size = key_cache.shape[:2]
    if key.shape != (tokens, kv_num_heads * head_size):
        fail(f"key has shape {key.shape}; expected ({tokens}, kv_num_heads * head_size = {kv_num_heads * head_size})")
    if key_cache.shape[2:] != (kv_num_heads, head_size):
        fail(f"key_cache has shape {key_cache.shape}; expected [num_blocks, block_size, {kv_num_heads}, {head_size}]")
    v_head_size = value_cache.shape[3]
    if value_cache.shape[:3] != (num_blocks, block_size, kv_num_heads):
        fail(f"value_cache has shape {value_cache.shape}; expected [{num_blocks}, {block_size}, {kv_num_heads}, v_head_size]")
    if value.shape != (tokens, kv_num_heads * v_head_size):
        fail(f"value has shape {value.shape}; expected ({tokens}, {kv_num_heads * v_head_size})")
    batch = past.shape[0]
    if cu.shape != (batch + 1,):
        fail(f"cumulative_sequence_length has shape {cu.shape}; expected ({batch + 1},) for {batch} sequences")
    if batch == 0 or cu[0] != 0 or cu[-1] != tokens or np.any(np.diff(cu) < 1):
        fail(f"cumulative_sequence_length {cu.tolist()} must increase strictly from 0 to num_tokens={tokens} "
             "(every sequence has at least one new token)")
    if np.any(past < 0):
        fail(f"past_seqlens must be >= 0, got {past.tolist()}")
    if table.shape[0] != batch:
        fail(f"block_table has {table.shape[0]} rows for {batch} sequences")
    if slots is not None:
        if slots.shape != (tokens,):
            fail(f"slot_mapping has shape {slots.shape}; expected ({tokens},)")
        bad = (slots < -1) | (slots >= num_blocks * block_size)
        if np.any(bad):
            fail(f"slot_mapping values {slots[bad].tolist()} lie outside [-1, {num_blocks * block_size})")
        written = slots[slots >= 0]
        if np.unique(written).size != written.size:
            fail("slot_mapping writes the same slot twice")
    if sink is not None and sink.shape != (num_heads,):
        fail(f"head_sink has shape {sink.shape}; expected ({num_heads},)")
    # Every position that is read (the past) or written (when the table gives the slots) is mapped.
    for b in range(batch):
        total = int(past[b] + cu[b + 1] - cu[b])
        needed = int(past[b]) if slots is not None else total  # positions read, or read and written
        if needed > table.shape[1] * block_size:
            fail(f"sequence {b} needs {needed} mapped positions (past {int(past[b])} + new "
                 f"{total - int(past[b])}) but its block_table row holds {table.shape[1]} blocks of {block_size}")
        blocks = table[b, : -(-needed // block_size)]
        if np.any((blocks < 0) | (blocks >= num_blocks)):
            fail(f"sequence {b} uses block ids {blocks.tolist()}; each must lie in [0, {num_blocks})")
    return Layout(tokens, batch, head_size, v_head_size, num_blocks, block_size, num_heads // kv_num_heads)


def token_slots(layout: Layout, cu, past, table) -> np.ndarray:
    """The flat cache slot of every new token, from the block table."""
    slots = np.empty(layout.num_tokens, dtype=np.int64)
    for b in range(layout.batch):
        positions = past[b] + np.arange(cu[b + 1] - cu[b])
        slots[cu[b]: cu[b + 1]] = table[b, positions // layout.block_size] * layout.block_size + positions % layout.block_size
    return slots


def attend(q, k, v, past: int, *, scale, softcap, is_causal, local_window_size, sink, score_mod=None):
    """One sequence: q [n, Hq, D], k [L, Hkv, D], v [L, Hkv, Dv] in fp32 -> [n, Hq, Dv].

    ``score_mod(scores [Hq, n, L], head [Hq, 1, 1], q_pos [1, n, 1], kv_pos [1, 1, L])``
    returns the modified scores."""
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) * scale
    if softcap > 0:
        scores = softcap * np.tanh(scores / softcap)
    q_pos = past + np.arange(q.shape[0])[:, None]
    kv_pos = np.arange(k.shape[0])[None, :]
    if score_mod is not None:
        scores = score_mod(scores, np.arange(q.shape[1])[:, None, None], q_pos[None], kv_pos[None])
    allowed = np.ones_like(scores[0], dtype=bool)
    if is_causal:
        allowed &= kv_pos <= q_pos
    if local_window_size >= 0:
        allowed &= kv_pos >= q_pos - local_window_size
    scores = np.where(allowed, scores, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    if sink is not None:
        top = np.maximum(top, sink[:, None, None])
    top = np.where(np.isneginf(top), 0.0, top)
    weights = np.exp(scores - top)
    denom = weights.sum(axis=-1, keepdims=True)
    if sink is not None:
        denom = denom + np.exp(sink[:, None, None] - top)
    probs = weights / np.where(denom == 0, 1.0, denom)
    return np.einsum("hqk,khd->qhd", probs, v)


def paged_attention(query, key, value, key_cache, value_cache, cumulative_sequence_length, past_seqlens,
                    block_table, slot_mapping=None, head_sink=None, *, num_heads, kv_num_heads, scale=0.0,
                    softcap=0.0, is_causal=1, local_window_size=-1, score_mod=None):
    """The math, in numpy: returns (output, key_cache_out, value_cache_out)."""
    if score_mod is not None:
        score_mod = getattr(score_mod, "proto_", score_mod)  # onnx.reference hands over an evaluator
        flex_score.check(score_mod, NAME)
    cu, past, table = cumulative_sequence_length, past_seqlens, block_table
    layout = check_inputs(query, key, value, key_cache, value_cache, cu, past, table, slot_mapping, head_sink,
                          num_heads, kv_num_heads)
    tokens, d, dv = layout.num_tokens, layout.head_size, layout.v_head_size
    q = query.astype(np.float32).reshape(tokens, num_heads, d)
    k_new = key.astype(np.float32).reshape(tokens, kv_num_heads, d)
    v_new = value.astype(np.float32).reshape(tokens, kv_num_heads, dv)
    sink = head_sink.astype(np.float32) if head_sink is not None else None
    scale = scale or 1.0 / np.sqrt(d)

    outputs = np.empty((tokens, num_heads, dv), dtype=np.float32)
    for b in range(layout.batch):
        begin, end, n_past = cu[b], cu[b + 1], int(past[b])
        positions = np.arange(n_past)
        past_slots = (table[b, positions // layout.block_size], positions % layout.block_size)
        k = np.concatenate([key_cache[past_slots].astype(np.float32), k_new[begin:end]])
        v = np.concatenate([value_cache[past_slots].astype(np.float32), v_new[begin:end]])
        mod = None
        if score_mod is not None:
            mod = functools.partial(lambda s, h, qp, kp, b: flex_score.evaluate(score_mod, s, b, h, qp, kp), b=b)
        outputs[begin:end] = attend(q[begin:end], k, v, n_past, scale=scale, softcap=softcap,
                                    is_causal=is_causal, local_window_size=local_window_size, sink=sink,
                                    score_mod=mod)

    slots = slot_mapping.astype(np.int64) if slot_mapping is not None else token_slots(layout, cu, past, table)
    written = slots >= 0
    key_out, value_out = key_cache.copy(), value_cache.copy()
    blocks, offsets = slots[written] // layout.block_size, slots[written] % layout.block_size
    key_out[blocks, offsets] = key.reshape(tokens, kv_num_heads, d)[written].astype(key_cache.dtype)
    value_out[blocks, offsets] = value.reshape(tokens, kv_num_heads, dv)[written].astype(value_cache.dtype)
    return outputs.reshape(tokens, num_heads * dv).astype(query.dtype), key_out, value_out


class PagedAttention(OpRun):
    op_domain = DOMAIN
    op_schema = SCHEMA  # onnx.reference fills attribute defaults from it

    def _run(self, *inputs, attributes=None, **attrs):
        return paged_attention(*inputs, **attrs)


# ---- function body -------------------------------------------------------------------------

def body(op, inputs, attrs):
    """Standard ops: write the caches with ScatterND, then attend per sequence on padded tiles.

    Queries are gathered into ``[B, max_new]`` tiles and keys/values into ``[B, max_total]``
    tiles (past from the cache through the block table, new ones from the inputs), so the
    scores are ``[B, Hkv, group, max_new, max_total]``: memory grows with the longest
    sequence, not with num_tokens².
    """
    score_mod = attrs.get("score_mod")
    if score_mod is not None:
        if not isinstance(score_mod, onnx.GraphProto):  # an onnx-ir graph from the expand pass
            score_mod = ir.serde.serialize_graph(score_mod)
        flex_score.check(score_mod, NAME)
    query, key, value, key_cache, value_cache, cu, past, table, slots, sink = (list(inputs) + [None] * 10)[:10]
    num_heads, kv_heads = attrs["num_heads"], attrs["kv_num_heads"]
    group = num_heads // kv_heads
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT
    query_type = query.type.dtype.value if query.type is not None else f32

    def to_f32(x):
        return x if x.type is not None and x.type.dtype.value == f32 else op.Cast(x, to=f32)

    def dim(shape, index):  # a 1-element int64 tensor
        return op.Gather(shape, op.ints(index))

    def scalar(x):
        return op.Squeeze(x, op.ints(0))

    cache_shape = op.Shape(key_cache)
    num_tokens = dim(op.Shape(query), 0)
    head_size, v_head_size = dim(cache_shape, 3), dim(op.Shape(value_cache), 3)
    block_size, max_blocks = dim(cache_shape, 1), dim(op.Shape(table), 1)
    cu, past, table = op.Cast(cu, to=i64), op.Cast(past, to=i64), op.Cast(table, to=i64)

    # Which sequence each token belongs to, and its position in that sequence.
    starts, ends = op.Slice(cu, op.ints(0), op.ints(-1)), op.Slice(cu, op.ints(1), op.ints(2**62))
    new_lens = op.Sub(ends, starts)
    totals = op.Add(past, new_lens)
    tokens = op.Range(op.const(0, np.int64), scalar(num_tokens), op.const(1, np.int64))
    token_seq = op.ReduceSum(op.Cast(op.GreaterOrEqual(op.Unsqueeze(tokens, op.ints(1)), op.Unsqueeze(ends, op.ints(0))), to=i64),
                             op.ints(1), keepdims=0)
    token_row = op.Sub(tokens, op.Gather(starts, token_seq))  # index among its sequence's new tokens
    table_flat = op.Reshape(table, op.ints(-1))

    def slot_of(seq, position):
        block = op.Gather(table_flat, op.Add(op.Mul(seq, max_blocks), op.Div(position, block_size)))
        return op.Add(op.Mul(block, block_size), op.Mod(position, block_size))

    # 1. Write the new keys and values at their slots (−1: not written).
    if slots is None:
        slots = slot_of(token_seq, op.Add(op.Gather(past, token_seq), token_row))
    else:
        slots = op.Cast(slots, to=i64)
    written = op.GreaterOrEqual(slots, op.const(0, np.int64))
    write_slots = op.Unsqueeze(op.Compress(slots, written), op.ints(-1))
    write_tokens = op.Compress(tokens, written)

    def updated(cache, new, width):
        shape = op.Shape(cache)
        flat = op.Reshape(cache, op.Concat(op.ints(-1), op.Slice(shape, op.ints(2), op.ints(4)), axis=0))
        rows = op.Reshape(new, op.Concat(op.ints(-1), op.const([kv_heads], np.int64), width, axis=0))
        rows = op.Cast(rows, to=cache.type.dtype.value) if cache.type is not None else rows
        return op.Reshape(op.ScatterND(flat, write_slots, op.Gather(rows, write_tokens)), shape), flat

    key_cache_out, key_flat = updated(key_cache, key, head_size)
    value_cache_out, value_flat = updated(value_cache, value, v_head_size)

    # 2. Logical keys/values per sequence, [B, L, Hkv, D]: the past from the cache, then the new ones.
    longest = op.ReduceMax(totals, op.ints(0), keepdims=1)
    kv_pos = op.Unsqueeze(op.Range(op.const(0, np.int64), scalar(longest), op.const(1, np.int64)), op.ints(0))  # [1, L]
    seqs = op.Unsqueeze(op.Range(op.const(0, np.int64), scalar(op.Shape(past)), op.const(1, np.int64)), op.ints(1))
    past_col, start_col = op.Unsqueeze(past, op.ints(1)), op.Unsqueeze(starts, op.ints(1))
    from_cache = op.Less(kv_pos, past_col)  # [B, L]
    last_position = op.Sub(op.Mul(max_blocks, block_size), op.ints(1))
    cache_slots = slot_of(seqs, op.Min(kv_pos, last_position))
    num_slots = op.Mul(dim(cache_shape, 0), block_size)
    cache_slots = op.Max(op.Min(cache_slots, op.Sub(num_slots, op.ints(1))), op.ints(0))  # padding stays in range
    new_rows = op.Max(op.Min(op.Add(start_col, op.Sub(kv_pos, past_col)), op.Sub(num_tokens, op.ints(1))), op.ints(0))
    pick_cache = op.Unsqueeze(from_cache, op.ints(2, 3))

    def logical(flat, new, width):
        rows = op.Reshape(to_f32(new), op.Concat(op.ints(-1), op.const([kv_heads], np.int64), width, axis=0))
        return op.Where(pick_cache, to_f32(op.Gather(flat, cache_slots)), op.Gather(rows, new_rows))

    keys, values = logical(key_flat, key, head_size), logical(value_flat, value, v_head_size)

    # 3. Queries in [B, M] tiles, grouped by KV head: [B, Hkv, group, M, D].
    longest_new = op.ReduceMax(new_lens, op.ints(0), keepdims=1)
    q_row = op.Unsqueeze(op.Range(op.const(0, np.int64), scalar(longest_new), op.const(1, np.int64)), op.ints(0))  # [1, M]
    q_index = op.Min(op.Add(start_col, q_row), op.Sub(num_tokens, op.ints(1)))
    q = op.Reshape(to_f32(query), op.Concat(op.ints(-1), op.const([kv_heads, group], np.int64), head_size, axis=0))
    q = op.Transpose(op.Gather(q, q_index), perm=[0, 2, 3, 1, 4])
    k = op.Unsqueeze(op.Transpose(keys, perm=[0, 2, 3, 1]), op.ints(2))  # [B, Hkv, 1, D, L]
    v = op.Unsqueeze(op.Transpose(values, perm=[0, 2, 1, 3]), op.ints(2))  # [B, Hkv, 1, L, Dv]

    # 4. Scores, soft cap, masks, a softmax that lets the sink in and maps empty rows to 0.
    scale = attrs["scale"] or None
    scale = op.const(np.float32(scale)) if scale else op.Reciprocal(op.Sqrt(op.Cast(head_size, to=f32)))
    scores = op.Mul(op.MatMul(q, k), scale)
    if attrs["softcap"] > 0:
        cap = op.const(np.float32(attrs["softcap"]))
        scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
    q_pos = op.Unsqueeze(op.Add(past_col, q_row), op.ints(2))  # [B, M, 1]
    key_pos = op.Unsqueeze(kv_pos, op.ints(0))  # [1, 1, L]
    if score_mod is not None:
        # Padding rows and columns see clamped positions (their scores are masked below), so a
        # table the mod reads only needs to cover the real pairs.
        last = op.Unsqueeze(op.Sub(totals, op.ints(1)), op.ints(1, 2))  # [B, 1, 1]
        i32 = TensorProto.INT32

        def five_d(x, axes):
            return op.Cast(op.Unsqueeze(x, op.ints(*axes)), to=i32)

        mod_inputs = [
            scores,
            five_d(op.Range(op.const(0, np.int64), scalar(op.Shape(past)), op.const(1, np.int64)), (1, 2, 3, 4)),
            op.Cast(op.Reshape(op.Range(op.const(0, np.int64), op.const(num_heads, np.int64), op.const(1, np.int64)),
                               op.const([1, kv_heads, group, 1, 1], np.int64)), to=i32),
            five_d(op.Min(q_pos, last), (1, 2)),   # [B, 1, 1, M, 1]
            five_d(op.Min(key_pos, last), (1, 2)),  # [B, 1, 1, 1, L]
        ]
        scores = op.Expand(flex_score.inline(op, score_mod, mod_inputs), op.Shape(scores))
    allowed = op.Less(key_pos, op.Unsqueeze(totals, op.ints(1, 2)))
    if attrs["is_causal"]:
        allowed = op.And(allowed, op.LessOrEqual(key_pos, q_pos))
    if attrs["local_window_size"] >= 0:
        allowed = op.And(allowed, op.GreaterOrEqual(key_pos, op.Sub(q_pos, op.const(attrs["local_window_size"], np.int64))))
    scores = op.Where(op.Unsqueeze(allowed, op.ints(1, 2)), scores, op.const(np.float32(-np.inf)))
    top = op.ReduceMax(scores, op.ints(-1), keepdims=1)
    if sink is not None:
        sink = op.Reshape(to_f32(sink), op.const([1, kv_heads, group, 1, 1], np.int64))
        top = op.Max(top, sink)
    top = op.Where(op.IsInf(top, detect_positive=0), op.const(np.float32(0)), top)
    weights = op.Exp(op.Sub(scores, top))
    denom = op.ReduceSum(weights, op.ints(-1), keepdims=1)
    if sink is not None:
        denom = op.Add(denom, op.Exp(op.Sub(sink, top)))
    denom = op.Where(op.Equal(denom, op.const(np.float32(0))), op.const(np.float32(1)), denom)
    out = op.MatMul(op.Div(weights, denom), v)  # [B, Hkv, group, M, Dv]

    # 5. Back to token rows.
    out = op.Transpose(out, perm=[0, 3, 1, 2, 4])
    out = op.Reshape(out, op.Concat(op.ints(-1), op.Mul(op.const([num_heads], np.int64), v_head_size), axis=0))
    out = op.Gather(out, op.Add(op.Mul(token_seq, scalar(longest_new)), token_row))
    if query_type != f32:
        out = op.Cast(out, to=query_type)
    return [out, key_cache_out, value_cache_out]


EXAMPLE = '''\
import numpy as np
import onnxgen
from onnxgen.testing import single_node_model, run_reference, run_expanded_on_ort

rng = np.random.default_rng(0)
heads, kv_heads, head_size, block_size = 4, 2, 8, 16
# Two sequences: one prefilling 5 tokens, one decoding 1 token after 20 cached ones.
past = np.array([0, 20], np.int32)
cu = np.array([0, 5, 6], np.int32)
block_table = np.array([[3, -1], [0, 2]], np.int32)   # sequence 1 uses blocks 0 then 2
tokens, num_blocks = 6, 4
inputs = {
    "query": rng.standard_normal((tokens, heads * head_size)).astype(np.float32),
    "key": rng.standard_normal((tokens, kv_heads * head_size)).astype(np.float32),
    "value": rng.standard_normal((tokens, kv_heads * head_size)).astype(np.float32),
    "key_cache": rng.standard_normal((num_blocks, block_size, kv_heads, head_size)).astype(np.float32),
    "value_cache": rng.standard_normal((num_blocks, block_size, kv_heads, head_size)).astype(np.float32),
    "cumulative_sequence_length": cu,
    "past_seqlens": past,
    "block_table": block_table,
}
model = single_node_model("PagedAttention", inputs, ["output", "key_cache_out", "value_cache_out"],
                          num_heads=heads, kv_num_heads=kv_heads)
out, key_cache, value_cache = run_reference(model, inputs)
ort_out, _, _ = run_expanded_on_ort(model, inputs)
assert out.shape == (tokens, heads * head_size) and np.allclose(out, ort_out, atol=1e-4)
# The decode token (position 20) went to block 2 (= block_table[1, 20 // 16]), offset 4.
assert np.array_equal(key_cache[2, 4], inputs["key"][5].reshape(kv_heads, head_size))
'''
