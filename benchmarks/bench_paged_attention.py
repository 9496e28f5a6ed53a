"""PagedAttention on the CPU: onnxgen's kernel against onnxruntime and OpenVINO peers.

Llama-3-8B-shaped attention (32 query heads, 8 KV heads, head size 128), every engine on
two threads, all in one process, rounds interleaved across the implementations:

  (a) decode, batch 8, ~2000 cached tokens each (lengths vary around 2000), fp32 cache
      and the same with a bf16 cache;
  (b) decode, batch 1, 8192 cached tokens, fp32;
  (c) prefill of 512 tokens, one sequence, no past, fp32.

Implementations (each checked once against ours on the case's data: "max|diff|"):

  ours             onnxgen.backends.ort.session over a one-node onnxgen.preview.PagedAttention
                   model (block size 16, shuffled block table), caches bound in place; the
                   timed call is ``Session.run`` with the non-cache inputs.
  ort GQA shared   com.microsoft.GroupQueryAttention over a contiguous BNSH cache
                   [B, 8, max_seq, 128]; present_key/value bound (IOBinding) to the past
                   buffers, so the new token is written in place; seqlens_k = total - 1.
  ort GQA copy     the same op with plain ``run``: past [B, 8, max_past, 128] fed from numpy,
                   present allocated and the whole cache copied on every call.
  ort Attention    standard opset-24 TensorScatter (writes the new keys/values at past_len)
                   + Attention with nonpad_kv_seqlen over [B, 8, max_seq, 128] caches, the
                   TensorScatter outputs bound to the cache buffers (IOBinding).
  OpenVINO PA      OpenVINO's CPU PagedAttentionExtension built directly through the Python
                   API (openvino.op._PagedAttentionExtension), cache layout
                   [num_blocks, 8, 32, 128] chosen by the plugin, KV_CACHE_PRECISION and
                   INFERENCE_PRECISION_HINT = f32 (bf16 for the bf16-cache case: the plugin
                   then also rounds queries to bf16), INFERENCE_NUM_THREADS = 2.
  expanded         onnxgen.passes.expand of the same one-node model on stock onnxruntime
                   (standard ops only; caches fed and returned as copies).  Slow: fewer rounds.

Bytes moved (decode) = the K + V cache bytes one call must read; the floor is those bytes
over the copy bandwidth measured here (two threads copying a 1 GiB array; read + write bytes
per second), and GB/s is the same bytes over the measured median time.  '% read' relates GB/s
to the read bandwidth (two threads summing a 1 GiB array), the true ceiling of a kernel that
only reads: on the development VM it is 0.63x the copy figure.  Prefill is
compute-bound: its GFLOP/s column (4 * heads * head_size * causal score count) matters there.

    python benchmarks/bench_paged_attention.py            # full sizes (a few minutes)
    python benchmarks/bench_paged_attention.py --quick    # tiny sizes, a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from onnxgen import kernels
from onnxgen.backends.ort import session as onnxgen_session
from onnxgen.passes import expand
from onnxgen.testing import single_node_model

from memory import CacheSweep, copy_bandwidth, read_bandwidth  # benchmarks/memory.py (the script directory is on sys.path)

HQ, HKV, D = 32, 8, 128
BLOCK = 16  # ours
OV_BLOCK = 32  # OpenVINO's CPU plugin
THREADS = 2
BF16 = np.dtype(ml_dtypes.bfloat16)
OUTPUTS = ["output", "key_cache_out", "value_cache_out"]
CACHES = ("key_cache", "value_cache")
GQA_BF16 = "no bf16 CPU GroupQueryAttention kernel in onnxruntime (NOT_IMPLEMENTED); one type T for q and cache"


# ---- the data --------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    past: np.ndarray  # [B] int32
    new: np.ndarray  # [B] int32
    cache_dtype: np.dtype
    inputs: dict = field(default_factory=dict)  # ours: paged layout
    logical_k: list = field(default_factory=list)  # per sequence [total, HKV, D] fp32 (cache dtype values)
    logical_v: list = field(default_factory=list)

    @property
    def batch(self):
        return len(self.past)

    @property
    def total(self):
        return self.past + self.new

    @property
    def tokens(self):
        return int(self.new.sum())

    @property
    def decode(self):
        return bool((self.new == 1).all())

    def kv_bytes(self):
        """K + V cache bytes one call reads (every sequence's whole logical cache)."""
        return int(self.total.sum()) * HKV * D * 2 * np.dtype(self.cache_dtype).itemsize

    def flops(self):
        """Q·Kᵀ and P·V multiply-adds counted as 2 flops, causal pairs only."""
        pairs = sum(int(n) * int(p) + int(n) * (int(n) + 1) // 2 for p, n in zip(self.past, self.new))
        return 4 * HQ * D * pairs


def make_case(rng, name, past, new, cache_dtype):
    past, new = np.asarray(past, np.int32), np.asarray(new, np.int32)
    case = Case(name, past, new, np.dtype(cache_dtype))
    totals = past + new
    needed = -(-totals // BLOCK)
    max_blocks = int(needed.max())
    num_blocks = int(needed.sum()) + 3  # a few blocks nobody owns
    order = rng.permutation(num_blocks).astype(np.int32)
    table = np.full((case.batch, max_blocks), -1, np.int32)
    used = 0
    for b in range(case.batch):
        table[b, : needed[b]] = order[used: used + needed[b]]
        used += needed[b]
    tokens = case.tokens
    key_cache = np.zeros((num_blocks, BLOCK, HKV, D), np.float32)
    value_cache = np.zeros_like(key_cache)
    new_k = rng.standard_normal((tokens, HKV * D), np.float32)
    new_v = rng.standard_normal((tokens, HKV * D), np.float32)
    cu = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    for b in range(case.batch):
        k = rng.standard_normal((int(totals[b]), HKV, D), np.float32)
        v = rng.standard_normal((int(totals[b]), HKV, D), np.float32)
        k[past[b]:] = new_k[cu[b]: cu[b + 1]].reshape(-1, HKV, D)
        v[past[b]:] = new_v[cu[b]: cu[b + 1]].reshape(-1, HKV, D)
        k, v = k.astype(cache_dtype).astype(np.float32), v.astype(cache_dtype).astype(np.float32)
        case.logical_k.append(k)
        case.logical_v.append(v)
        pos = np.arange(past[b])  # only the past lives in the cache; the step writes the new tokens
        where = (table[b, pos // BLOCK], pos % BLOCK)
        key_cache[where] = k[: past[b]]
        value_cache[where] = v[: past[b]]
    # The new keys/values: exactly representable in the cache type, so every engine stores the same.
    new_k = np.concatenate([k[p:] for k, p in zip(case.logical_k, past)]).reshape(tokens, HKV * D)
    new_v = np.concatenate([v[p:] for v, p in zip(case.logical_v, past)]).reshape(tokens, HKV * D)
    case.inputs = {
        "query": rng.standard_normal((tokens, HQ * D), np.float32),
        "key": np.ascontiguousarray(new_k),
        "value": np.ascontiguousarray(new_v),
        "key_cache": key_cache.astype(cache_dtype),
        "value_cache": value_cache.astype(cache_dtype),
        "cumulative_sequence_length": cu,
        "past_seqlens": past,
        "block_table": table,
    }
    return case


def per_batch(case, flat):
    """[tokens, W] -> [B, S, W] (all sequences have the same number of new tokens here)."""
    n = int(case.new[0])
    assert (case.new == n).all()
    return np.ascontiguousarray(flat.reshape(case.batch, n, -1))


def contiguous_cache(case, max_seq, which):
    """A BNSH cache [B, HKV, max_seq, D] fp32 holding each sequence's past (rest zero)."""
    logical = case.logical_k if which == "k" else case.logical_v
    cache = np.zeros((case.batch, HKV, max_seq, D), np.float32)
    for b, x in enumerate(logical):
        p = int(case.past[b])
        cache[b, :, :p] = x[:p].transpose(1, 0, 2)
    return cache


# ---- implementations -------------------------------------------------------------------------

@dataclass
class Impl:
    name: str
    call: object = None  # the timed call
    output: object = None  # -> [tokens, HQ * D] fp32 after a call
    written: object = None  # -> (k, v) [tokens, HKV, D] the cache holds at the new tokens' positions
    note: str = ""
    error: str = ""
    max_rounds: int | None = None
    keep: list = field(default_factory=list)  # buffers the engine reads/writes in place


def ort_options():
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = THREADS
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as onnxgen's Session
    return options


def ort_value(array):
    if array.dtype == BF16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(array)


def ours_model(case):
    return single_node_model("PagedAttention", case.inputs, OUTPUTS, num_heads=HQ, kv_num_heads=HKV)


def impl_ours(case):
    s = onnxgen_session(ours_model(case), threads=THREADS)
    if not s.uses_kernels:
        raise RuntimeError("the kernel library is not loaded")
    caches = {name: case.inputs[name].copy() for name in CACHES}
    for name, array in caches.items():
        s.set_cache(name, array)
    feeds = {k: v for k, v in case.inputs.items() if k not in CACHES}
    last = {}

    def call():
        last["out"] = s.run(feeds)["output"]

    table = case.inputs["block_table"]

    def written():
        slots = [(table[b, p // BLOCK], p % BLOCK) for b in range(case.batch)
                 for p in range(int(case.past[b]), int(case.total[b]))]
        return tuple(np.stack([caches[n][blk, off] for blk, off in slots]) for n in CACHES)

    return Impl("ours", call, lambda: last["out"], written, keep=[caches])


def gqa_model(case, past_shape):
    b, s = case.batch, int(case.new[0])
    node = helper.make_node("GroupQueryAttention",
                            ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"],
                            ["output", "present_key", "present_value"], domain="com.microsoft",
                            num_heads=HQ, kv_num_heads=HKV)
    f = TensorProto.FLOAT
    graph = helper.make_graph([node], "gqa", [
        helper.make_tensor_value_info("query", f, [b, s, HQ * D]),
        helper.make_tensor_value_info("key", f, [b, s, HKV * D]),
        helper.make_tensor_value_info("value", f, [b, s, HKV * D]),
        helper.make_tensor_value_info("past_key", f, past_shape),
        helper.make_tensor_value_info("past_value", f, past_shape),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [b]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ], [helper.make_tensor_value_info(n, f, None) for n in node.output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), ort_options(), providers=["CPUExecutionProvider"])


def gqa_feeds(case):
    return {
        "query": per_batch(case, case.inputs["query"]),
        "key": per_batch(case, case.inputs["key"]),
        "value": per_batch(case, case.inputs["value"]),
        "seqlens_k": (case.total - 1).astype(np.int32),
        "total_sequence_length": np.array(case.total.max(), np.int32),
    }


def padded_len(case):
    return int(-(-int(case.total.max()) // 64) * 64)


def contiguous_written(case, cache_k, cache_v):
    def written():
        pos = [(b, p) for b in range(case.batch) for p in range(int(case.past[b]), int(case.total[b]))]
        return tuple(np.stack([c[b, :, p] for b, p in pos]) for c in (cache_k, cache_v))
    return written


def impl_gqa_shared(case):
    if case.cache_dtype != np.float32:
        raise NotImplementedError(GQA_BF16)
    max_seq = padded_len(case)
    past_k, past_v = contiguous_cache(case, max_seq, "k"), contiguous_cache(case, max_seq, "v")
    sess = gqa_model(case, list(past_k.shape))
    binding = sess.io_binding()
    binding.bind_output("output", "cpu")  # first: get_outputs() follows the binding order
    for name, array in gqa_feeds(case).items():
        binding.bind_ortvalue_input(name, ort_value(array))
    kv = {"past_key": ort_value(past_k), "past_value": ort_value(past_v)}
    for name, value in kv.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_ortvalue_output("present_key", kv["past_key"])
    binding.bind_ortvalue_output("present_value", kv["past_value"])

    def call():
        sess.run_with_iobinding(binding)

    def output():
        return binding.get_outputs()[0].numpy().reshape(case.tokens, HQ * D)

    return Impl("ort GQA shared", call, output, contiguous_written(case, past_k, past_v),
                note=f"max_seq {max_seq}", keep=[past_k, past_v, kv])


def impl_gqa_copy(case):
    if case.cache_dtype != np.float32:
        raise NotImplementedError(GQA_BF16)
    max_past = int(case.past.max())
    feeds = gqa_feeds(case)
    feeds["past_key"] = contiguous_cache(case, max_past, "k")
    feeds["past_value"] = contiguous_cache(case, max_past, "v")
    sess = gqa_model(case, list(feeds["past_key"].shape))
    last = {}

    def call():
        last["out"], last["k"], last["v"] = sess.run(["output", "present_key", "present_value"], feeds)

    def written():
        return contiguous_written(case, last["k"], last["v"])()

    return Impl("ort GQA copy", call, lambda: last["out"].reshape(case.tokens, HQ * D), written,
                note=f"past [B,{HKV},{max_past},{D}] fed, present returned")


def attention24_model(case, max_seq):
    """TensorScatter writes the new K/V at past_len; Attention reads the first nonpad_kv_seqlen."""
    b, s = case.batch, int(case.new[0])
    f = TensorProto.FLOAT
    c = lambda name, values: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
    perm = [0, 2, 1, 3]
    nodes = [
        c("q_shape", [b, s, HQ, D]), c("kv_shape", [b, s, HKV, D]), c("y_shape", [b, s, HQ * D]),
        helper.make_node("Reshape", ["query", "q_shape"], ["q4"]),
        helper.make_node("Transpose", ["q4"], ["q"], perm=perm),
        helper.make_node("Reshape", ["key", "kv_shape"], ["k4"]),
        helper.make_node("Transpose", ["k4"], ["k"], perm=perm),
        helper.make_node("Reshape", ["value", "kv_shape"], ["v4"]),
        helper.make_node("Transpose", ["v4"], ["v"], perm=perm),
        helper.make_node("TensorScatter", ["key_cache", "k", "write_indices"], ["key_cache_out"], axis=2),
        helper.make_node("TensorScatter", ["value_cache", "v", "write_indices"], ["value_cache_out"], axis=2),
        helper.make_node("Attention", ["q", "key_cache_out", "value_cache_out", "", "", "", "nonpad_kv_seqlen"],
                         ["y4"], is_causal=0 if case.decode else 1),
        helper.make_node("Transpose", ["y4"], ["y"], perm=perm),
        helper.make_node("Reshape", ["y", "y_shape"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "attention24", [
        helper.make_tensor_value_info("query", f, [b, s, HQ * D]),
        helper.make_tensor_value_info("key", f, [b, s, HKV * D]),
        helper.make_tensor_value_info("value", f, [b, s, HKV * D]),
        helper.make_tensor_value_info("key_cache", f, [b, HKV, max_seq, D]),
        helper.make_tensor_value_info("value_cache", f, [b, HKV, max_seq, D]),
        helper.make_tensor_value_info("write_indices", TensorProto.INT64, [b]),
        helper.make_tensor_value_info("nonpad_kv_seqlen", TensorProto.INT64, [b]),
    ], [helper.make_tensor_value_info(n, f, None) for n in ("output", "key_cache_out", "value_cache_out")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    return ort.InferenceSession(model.SerializeToString(), ort_options(), providers=["CPUExecutionProvider"])


def impl_attention24(case):
    if case.cache_dtype != np.float32:
        raise NotImplementedError("no bf16 CPU Attention-24 in onnxruntime (its function fallback needs "
                                  "Expand(13) bf16: NOT_IMPLEMENTED)")
    if not case.decode and int(case.past.max()) > 0:
        raise NotImplementedError("top-left causal Attention-24 only matches for prefill without past")
    max_seq = padded_len(case)
    cache_k, cache_v = contiguous_cache(case, max_seq, "k"), contiguous_cache(case, max_seq, "v")
    sess = attention24_model(case, max_seq)
    feeds = {
        "query": per_batch(case, case.inputs["query"]),
        "key": per_batch(case, case.inputs["key"]),
        "value": per_batch(case, case.inputs["value"]),
        "write_indices": case.past.astype(np.int64),
        "nonpad_kv_seqlen": case.total.astype(np.int64),
    }
    binding = sess.io_binding()
    binding.bind_output("output", "cpu")  # first: get_outputs() follows the binding order
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort_value(array))
    kv = {"key_cache": ort_value(cache_k), "value_cache": ort_value(cache_v)}
    for name, value in kv.items():
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(name + "_out", value)

    def call():
        sess.run_with_iobinding(binding)

    def output():
        return binding.get_outputs()[0].numpy().reshape(case.tokens, HQ * D)

    return Impl("ort Attention-24", call, output, contiguous_written(case, cache_k, cache_v),
                note=f"max_seq {max_seq}", keep=[cache_k, cache_v, kv])


def impl_openvino(case):
    import openvino as ov
    from openvino import opset13 as ops
    from openvino.op import _PagedAttentionExtension

    f32, i32 = ov.Type.f32, ov.Type.i32
    precision = "bf16" if case.cache_dtype == BF16 else "f32"

    def param(name, t, shape):
        return ops.parameter(ov.PartialShape(shape), t, name=name)

    def const(array):
        return ops.constant(array)

    def empty(dtype=np.int32, rank=1):
        return const(np.zeros([0] * rank, dtype))

    params = [param("query", f32, [-1, HQ * D]), param("key", f32, [-1, HKV * D]), param("value", f32, [-1, HKV * D]),
              param("key_cache", ov.Type.dynamic, [-1] * 4), param("value_cache", ov.Type.dynamic, [-1] * 4),
              param("past_lens", i32, [-1]), param("subsequence_begins", i32, [-1]),
              param("block_indices", i32, [-1]), param("block_indices_begins", i32, [-1])]
    max_context_len = param("max_context_len", i32, [])
    # OpenVINO 2026.4's PagedAttentionExtension takes 28 inputs; the optional features are off.
    args = params + [
        const(np.float32(1 / np.sqrt(D))),  # scale
        const(np.int32(0)),  # sliding_window (0: off)
        empty(np.float32),  # alibi_slopes
        max_context_len,
        empty(),  # score_aggregation_window (scores output unused)
        empty(), empty(rank=2), empty(np.float32, 2),  # rotated_block_indices, rotation_deltas, trig LUT
        empty(np.float32), const(np.int32(0)), const(np.int32(0)),  # xattention threshold/block/stride
        empty(np.float32, 4),  # sinks
        const(np.int32(0)), empty(), empty(), empty(),  # adaptive R-KV
        empty(),  # token_type_ids
        empty(np.uint8), empty(),  # qq_bias, qq_bias_begins
    ]
    node = _PagedAttentionExtension([a.output(0) for a in args])
    for key, value in dict(k_head_size=D, num_k_heads=HKV, v_head_size=D, num_v_heads=HKV).items():
        node.get_rt_info()[key] = value
    model = ov.Model([ops.result(node.output(0))], params + [max_context_len], "paged_attention")
    core = ov.Core()
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": THREADS, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
        "KV_CACHE_PRECISION": precision, "INFERENCE_PRECISION_HINT": precision,
        # OpenVINO pins its threads (and the calling thread) to cores by default, which slows
        # every other engine in the process afterwards; the peers share the process here.
        "ENABLE_CPU_PINNING": False})
    cache_type = compiled.input("key_cache").get_element_type()
    cache_shape = compiled.input("key_cache").get_partial_shape()
    assert [cache_shape[i].get_length() for i in (1, 2, 3)] == [HKV, OV_BLOCK, D], cache_shape
    np_cache = {"f32": np.float32, "bf16": BF16}[precision]
    assert str(cache_type) == {"f32": "<Type: 'float32'>", "bf16": "<Type: 'bfloat16'>"}[precision], cache_type

    # The same logical caches, repaged for OpenVINO's layout: [blocks, HKV, 32, D], shuffled blocks.
    rng = np.random.default_rng(7)
    needed = -(-case.total // OV_BLOCK)
    num_blocks = int(needed.sum()) + 3
    order = rng.permutation(num_blocks).astype(np.int32)
    key_cache = np.zeros((num_blocks, HKV, OV_BLOCK, D), np_cache)
    value_cache = np.zeros_like(key_cache)
    indices, begins, used = [], [0], 0
    for b in range(case.batch):
        blocks = order[used: used + needed[b]]
        used += needed[b]
        indices.append(blocks)
        begins.append(begins[-1] + len(blocks))
        p = int(case.past[b])
        pos = np.arange(p)
        key_cache[blocks[pos // OV_BLOCK], :, pos % OV_BLOCK] = case.logical_k[b][:p].astype(np_cache)
        value_cache[blocks[pos // OV_BLOCK], :, pos % OV_BLOCK] = case.logical_v[b][:p].astype(np_cache)

    def tensor(array):
        if array.dtype == BF16:
            return ov.Tensor(array.view(np.uint16), list(array.shape), ov.Type.bf16)  # shares the memory
        return ov.Tensor(array, shared_memory=True)

    request = compiled.create_infer_request()
    feeds = {
        "query": case.inputs["query"], "key": case.inputs["key"], "value": case.inputs["value"],
        "key_cache": key_cache, "value_cache": value_cache,
        "past_lens": case.past.astype(np.int32),
        "subsequence_begins": case.inputs["cumulative_sequence_length"],
        "block_indices": np.concatenate(indices).astype(np.int32),
        "block_indices_begins": np.array(begins, np.int32),
        "max_context_len": np.array(case.total.max(), np.int32),
    }
    tensors = {name: tensor(np.require(a, requirements="C")) for name, a in feeds.items()}  # keeps 0-d
    for name, t in tensors.items():
        request.set_tensor(name, t)

    def call():
        request.infer()

    def output():
        return np.array(request.get_output_tensor(0).data, np.float32).reshape(case.tokens, HQ * D)

    note = f"OpenVINO {ov.__version__.split('-')[0]}, cache {precision} [n,{HKV},{OV_BLOCK},{D}]"
    if precision == "bf16":
        note += ", bf16 compute"
    def written():
        pos = [(indices[b][p // OV_BLOCK], p % OV_BLOCK) for b in range(case.batch)
               for p in range(int(case.past[b]), int(case.total[b]))]
        return tuple(np.stack([c[blk, :, off] for blk, off in pos]) for c in (key_cache, value_cache))

    return Impl("OpenVINO PA", call, output, written, note=note, keep=[tensors, feeds])


def impl_expanded(case, max_rounds):
    model = expand(ours_model(case))
    sess = ort.InferenceSession(model.SerializeToString(), ort_options(), providers=["CPUExecutionProvider"])
    values = {name: ort_value(np.ascontiguousarray(a)) for name, a in case.inputs.items()}
    names = [o.name for o in sess.get_outputs()]
    last = {}

    table = case.inputs["block_table"]

    def call():
        last["out"], last["k"], last["v"] = sess.run_with_ort_values(names, values)

    def written():
        slots = [(table[b, p // BLOCK], p % BLOCK) for b in range(case.batch)
                 for p in range(int(case.past[b]), int(case.total[b]))]
        return tuple(np.stack([last[n].numpy()[blk, off] for blk, off in slots]) for n in "kv")

    return Impl("expanded", call, lambda: last["out"].numpy(), written if case.cache_dtype == np.float32 else None,
                max_rounds=max_rounds, note="stock onnxruntime, caches fed and returned (copies)")


# ---- measurement -----------------------------------------------------------------------------

def build(case, expanded_rounds, skip):
    builders = [("ours", impl_ours), ("ort GQA shared", impl_gqa_shared), ("ort GQA copy", impl_gqa_copy),
                ("ort Attention-24", impl_attention24), ("OpenVINO PA", impl_openvino),
                ("expanded", lambda c: impl_expanded(c, expanded_rounds))]
    impls = []
    for name, make in builders:
        if any(s.lower() in name.lower() for s in skip):
            continue
        try:
            impls.append(make(case))
        except Exception as e:  # noqa: BLE001 - report and go on with the others
            message = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            impls.append(Impl(name, error=message[:200]))
    return impls


def run_case(case, args, bandwidth, read):
    impls = build(case, args.expanded_rounds, args.skip)
    ours = impls[0]
    if ours.error:
        raise SystemExit(f"ours failed: {ours.error}")
    ours.call()
    want = ours.output().astype(np.float32)
    diffs = {}
    for impl in impls:
        if impl.error:
            continue
        try:
            impl.call()
            got = impl.output().astype(np.float32)
            diffs[impl.name] = float(np.abs(got - want).max())
            if impl.written is not None:  # the step must also have stored the new keys/values
                for got_kv, new in zip(impl.written(), (case.inputs["key"], case.inputs["value"])):
                    if not np.array_equal(got_kv.astype(np.float32).reshape(new.shape), new):
                        impl.error = "the new keys/values were not written to its cache; not timed"
        except Exception as e:  # noqa: BLE001
            impl.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
            if args.verbose:
                traceback.print_exc()
    tol = 2e-2 if case.cache_dtype == BF16 else 1e-3
    for impl in impls:  # never time something that computes a different answer
        if not impl.error and diffs[impl.name] > tol:
            impl.error = f"MISMATCH: max|diff| {diffs[impl.name]:.2e} > {tol:g}; not timed"

    live = [i for i in impls if not i.error]
    per_call = {}
    iters = {}
    for impl in live:  # warm up, and pick iterations per round so that a round lasts >= ~10 ms
        warm = 1 if impl.max_rounds else args.warmup
        t0 = time.perf_counter()
        for _ in range(warm):
            impl.call()
        t = (time.perf_counter() - t0) / warm
        iters[impl.name] = 1 if impl.max_rounds else max(1, min(50, int(0.03 / max(t, 1e-6))))
        per_call[impl.name] = []
    sweep = None if args.warm else CacheSweep(args.flush_mib)
    for r in range(args.rounds):
        for impl in live:
            if impl.max_rounds is not None and r >= impl.max_rounds:
                continue
            if sweep is not None:
                # Cold: this machine's last-level cache (480 MiB here) holds a whole KV cache, so
                # back-to-back calls would read it from L3.  A server's caches far exceed L3: stream
                # a larger buffer first so that every timed call reads its KV cache from memory.
                sweep()  # read only: dirty lines would be written back during the timed call
                t0 = time.perf_counter()
                impl.call()
                per_call[impl.name].append(time.perf_counter() - t0)
                continue
            n = iters[impl.name]
            impl.call()  # untimed: the previous engine's footprint is not charged to this one
            t0 = time.perf_counter()
            for _ in range(n):
                impl.call()
            per_call[impl.name].append((time.perf_counter() - t0) / n)

    nbytes = case.kv_bytes()
    floor = nbytes / bandwidth
    base = statistics.median(per_call["ours"])
    print(f"\n== {case.name}")
    lengths = f"past {int(case.past.min())}..{int(case.past.max())}" if case.batch > 1 else f"past {int(case.past[0])}"
    print(f"   B={case.batch}, {case.tokens} new tokens, {lengths}, cache {np.dtype(case.cache_dtype).name}; "
          f"K+V cache read {nbytes / 1e6:.1f} MB -> floor {floor * 1e3:.3f} ms at {bandwidth / 1e9:.1f} GB/s; "
          f"{case.flops() / 1e9:.2f} GFLOP")
    print(f"   {'':18}{'ms/call':>10}{'vs ours':>9}{'GB/s':>8}{'% copy':>8}{'% read':>8}{'GFLOP/s':>9}{'max|diff|':>11}"
          f"{'rounds':>8}  notes")
    for impl in impls:
        if impl.error:
            print(f"   {impl.name:18}{'n/a':>10}{'':>9}{'':>8}{'':>8}{'':>8}{'':>9}"
                  f"{diffs.get(impl.name, float('nan')):>11.1e}{'':>8}  {impl.error}")
            continue
        times = per_call[impl.name]
        t = statistics.median(times)
        rate = nbytes / t
        print(f"   {impl.name:18}{t * 1e3:10.3f}{t / base:8.2f}x{rate / 1e9:8.1f}{100 * rate / bandwidth:7.0f}%{100 * rate / read:7.0f}%"
              f"{case.flops() / t / 1e9:9.1f}{diffs[impl.name]:11.1e}{len(times):>5}x{iters[impl.name]:<2}  {impl.note}")
    sys.stdout.flush()
    del impls, live


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Columns: ms/call is the median over the timed rounds; 'vs ours' is that time over "
                                            "ours (> 1: slower than ours); GB/s = K+V cache bytes / time; "
                                            "'% copy' and '% read' relate it to the measured copy and read bandwidths; max|diff| is "
                                            "the output against ours on the same data; rounds is "
                                            "'timed rounds x calls per round'.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few rounds: a smoke test")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up calls per implementation (default 5)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds, interleaved (default 20)")
    parser.add_argument("--expanded-rounds", type=int, default=3,
                        help="timed rounds for the (slow) expanded function (default 3)")
    parser.add_argument("--copy-gib", type=float, default=1.0, help="GiB copied to measure bandwidth (default 1)")
    parser.add_argument("--cases", nargs="+", default=["a", "a-bf16", "b", "c"],
                        help="subset of: a a-bf16 b c (default: all)")
    parser.add_argument("--skip", nargs="*", default=[], help="implementations to leave out (substring match)")
    parser.add_argument("--warm", action="store_true",
                        help="time back-to-back calls (KV cache possibly in L3) instead of cold calls")
    parser.add_argument("--flush-mib", type=float, default=1024,
                        help="MiB streamed before each cold call to evict the last-level cache (default 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing peers")
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.rounds, args.expanded_rounds = 1, 2, 1
        args.copy_gib = min(args.copy_gib, 0.125)
    if kernels.library_path() is None:
        raise SystemExit("the kernel library is not built (pip install -e . --no-deps)")

    bandwidth = copy_bandwidth(int(args.copy_gib * (1 << 30)))
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write; 2 threads copying a "
          f"{args.copy_gib:g} GiB array, best of 5); {THREADS} threads everywhere; "
          f"heads {HQ}/{HKV}, head size {D}; onnxruntime {ort.__version__}")
    read = read_bandwidth(int(args.copy_gib * (1 << 30)))
    print(f"read bandwidth: {read / 1e9:.1f} GB/s (2 threads summing halves of a {args.copy_gib:g} GiB array, best of 5; "
          f"{read / bandwidth:.2f}x the copy figure)")
    print(f"rounds: {args.warmup} warm-up calls + {args.rounds} timed rounds (expanded: 1 + {args.expanded_rounds}); "
          f"cold: every timed call follows a 1 GiB two-thread read that evicts the last-level cache (--warm: back-to-back calls); medians of the per-call time")

    rng = np.random.default_rng(args.seed)
    scale = 16 if args.quick else 1
    specs = {
        "a": ("(a) decode, batch 8, ~2000 cached tokens, fp32 cache", 8, 2000, np.float32),
        "a-bf16": ("(a) decode, batch 8, ~2000 cached tokens, bf16 cache", 8, 2000, BF16),
        "b": ("(b) decode, batch 1, 8192 cached tokens, fp32 cache", 1, 8192, np.float32),
        "c": ("(c) prefill, 512 tokens, one sequence, no past, fp32", 1, 512, np.float32),
    }
    for key in args.cases:
        name, batch, length, dtype = specs[key]
        length //= scale
        if key == "c":
            case = make_case(rng, name, [0], [length], dtype)
        elif batch > 1:
            past = length + rng.integers(-length // 40, length // 40 + 1, batch)  # ~2000 +- 50
            case = make_case(rng, name, past, np.ones(batch), dtype)
        else:
            case = make_case(rng, name, [length], [1], dtype)
        run_case(case, args, bandwidth, read)


if __name__ == "__main__":
    main()
