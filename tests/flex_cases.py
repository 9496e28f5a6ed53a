"""PyTorch's flex_attention as the oracle for score mods, paged and not.

Every builder of ``onnxgen.ops.score_mods`` has its PyTorch ``score_mod`` twin here, written
from the builder's documented formula (not from its graph).  ``torch_paged`` gathers each
sequence's logical keys/values from the paged cache (through the block table, as
``paged_cases.oracle`` does), pads them into one batch and runs
``torch.nn.attention.flex_attention.flex_attention`` (eager, CPU) with the mod shifted to
absolute positions (``q_pos = past + row``) and the PagedAttention attributes' causal/window
masks added.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.nn.attention.flex_attention import flex_attention

from onnxgen.ops import score_mods as sm

INF = float("inf")


def _flex(*args, **kwargs):
    # Eager flex_attention traces score_mod through dynamo and caches the trace by the function's
    # code: a later closure of the same builder with other captured tables (document ids,
    # prefixes) could reuse a stale one.  Start every oracle call from an empty cache.
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        return flex_attention(*args, **kwargs)


# ---- the library, twice: ONNX graphs and PyTorch functions ---------------------------------

def t_causal():
    return lambda s, b, h, q, kv: torch.where(kv <= q, s, -INF)


def t_sliding_window(window, causal=True):
    def mod(s, b, h, q, kv):
        keep = kv >= q - window
        if causal:
            keep = keep & (kv <= q)
        return torch.where(keep, s, -INF)
    return mod


def t_softcap(cap):
    return lambda s, b, h, q, kv: cap * torch.tanh(s / cap)


def t_alibi(slopes):
    slopes = torch.as_tensor(np.asarray(slopes, np.float32))
    return lambda s, b, h, q, kv: s + slopes[h] * (kv - q).float()


def t_relative_position_bias(table, max_distance):
    table = torch.as_tensor(np.asarray(table, np.float32))
    return lambda s, b, h, q, kv: s + table[h, torch.clamp(kv - q, -max_distance, max_distance) + max_distance]


def t_prefix_lm(prefix, causal=True):
    prefix = torch.as_tensor(np.asarray(prefix, np.int64).reshape(-1))

    def mod(s, b, h, q, kv):
        p = prefix[b] if prefix.numel() > 1 else prefix[0]
        keep = kv < p
        if causal:
            keep = keep | (kv <= q)
        return torch.where(keep, s, -INF)
    return mod


def t_document_mask(ids, causal=True):
    ids = torch.as_tensor(np.asarray(ids, np.int64))

    def mod(s, b, h, q, kv):
        same = ids[b, q] == ids[b, kv] if ids.ndim == 2 else ids[q] == ids[kv]
        if causal:
            same = same & (kv <= q)
        return torch.where(same, s, -INF)
    return mod


def library(rng, heads: int, batch: int, max_len: int):
    """(name, onnx graph, torch score_mod) for every builder, with random parameters."""
    window = int(rng.integers(0, 8))
    cap = float(rng.uniform(0.5, 3.0))
    distance = int(rng.integers(1, 6))
    table = rng.standard_normal((heads, 2 * distance + 1)).astype(np.float32)
    prefix = rng.integers(0, max_len, batch)
    ids = np.sort(rng.integers(0, 4, (batch, max_len)), axis=1).astype(np.int32)
    return [
        ("causal", sm.causal(), t_causal()),
        ("sliding_window", sm.sliding_window(window), t_sliding_window(window)),
        ("sliding_window_two_sided", sm.sliding_window(window, causal=False), t_sliding_window(window, False)),
        ("softcap", sm.softcap(cap), t_softcap(cap)),
        ("alibi", sm.alibi(heads), t_alibi(sm.alibi_slopes(heads))),
        ("relative_position_bias", sm.relative_position_bias(table, distance), t_relative_position_bias(table, distance)),
        ("prefix_lm", sm.prefix_lm(prefix), t_prefix_lm(prefix)),
        ("prefix_lm_one_length", sm.prefix_lm(int(prefix[0])), t_prefix_lm(int(prefix[0]))),
        ("document_mask", sm.document_mask(ids), t_document_mask(ids)),
        ("document_mask_shared", sm.document_mask(ids[0]), t_document_mask(ids[0])),
    ]


def t_compose(*mods):
    def mod(s, b, h, q, kv):
        for m in mods:
            s = m(s, b, h, q, kv)
        return s
    return mod


# ---- the oracle ----------------------------------------------------------------------------

def torch_paged(inputs, torch_mod, *, num_heads, kv_num_heads, scale=0.0, is_causal=1, local_window_size=-1,
                **_):
    """flex_attention over a PagedAttention batch -> output [num_tokens, Hq * Dv].

    One call for the whole batch: queries padded to the longest new part, keys/values to the
    longest sequence; padding keys are masked, padding rows dropped, and positions are clamped
    into each sequence (as a table the mod reads only covers real positions)."""
    f32 = {k: (v.astype(np.float32) if v is not None and v.dtype != np.int32 else v) for k, v in inputs.items()}
    cu, past, table = inputs["cumulative_sequence_length"], inputs["past_seqlens"], inputs["block_table"]
    block_size, d, dv = inputs["key_cache"].shape[1], inputs["key_cache"].shape[3], inputs["value_cache"].shape[3]
    scale = scale or 1 / np.sqrt(d)
    new = np.diff(cu)
    totals = past + new
    batch, m, length = len(past), int(new.max()), int(totals.max())
    q = np.zeros((batch, m, num_heads, d), np.float32)
    k = np.zeros((batch, length, kv_num_heads, d), np.float32)
    v = np.zeros((batch, length, kv_num_heads, dv), np.float32)
    for b in range(batch):
        n, p = int(new[b]), int(past[b])
        pos = np.arange(p)
        where = (table[b, pos // block_size], pos % block_size)
        k[b, :p + n] = np.concatenate([f32["key_cache"][where], f32["key"][cu[b]:cu[b + 1]].reshape(n, kv_num_heads, d)])
        v[b, :p + n] = np.concatenate([f32["value_cache"][where],
                                       f32["value"][cu[b]:cu[b + 1]].reshape(n, kv_num_heads, dv)])
        q[b, :n] = f32["query"][cu[b]:cu[b + 1]].reshape(n, num_heads, d)
    past_t, last_t = torch.from_numpy(past.astype(np.int64)), torch.from_numpy(totals.astype(np.int64) - 1)

    def mod(s, b, h, q_idx, kv):
        q_pos = torch.minimum(q_idx + past_t[b], last_t[b])
        kv_c = torch.minimum(kv, last_t[b])
        s = torch_mod(s, b, h, q_pos, kv_c) if torch_mod else s
        keep = kv <= last_t[b]
        if is_causal:
            keep = keep & (kv <= q_pos)
        if local_window_size >= 0:
            keep = keep & (kv >= q_pos - local_window_size)
        return torch.where(keep, s, -INF)

    heads_first = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))  # noqa: E731
    y = _flex(heads_first(q), heads_first(k), heads_first(v), score_mod=mod, scale=float(scale),
              enable_gqa=num_heads != kv_num_heads)
    y = y.numpy().transpose(0, 2, 1, 3)  # [B, M, Hq, Dv]
    return np.concatenate([y[b, :new[b]].reshape(new[b], num_heads * dv) for b in range(batch)])


def torch_flex(q, k, v, torch_mod, scale=None):
    """flex_attention on [B, H, L, D] numpy arrays (fp32)."""
    t = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in (q, k, v)]
    y = _flex(*t, score_mod=torch_mod, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return y.numpy()
