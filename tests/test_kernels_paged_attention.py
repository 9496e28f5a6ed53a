"""The PagedAttention CPU kernel against the oracle, the reference and onnxruntime's own GQA.

Two ways in: plain onnxruntime with the library registered (outputs are new buffers), and
``onnxgen.backends.ort.session`` (caches bound in place).  Tolerances: 1e-4 (fp32), 4e-3 when
queries/keys/values are fp16; caches are compared exactly.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from paged_cases import OUTPUTS, check_runners, expected_caches, oracle, random_batch

from onnxgen import kernels
from onnxgen.backends.ort import session
from onnxgen.ops.paged_attention import paged_attention
from onnxgen.testing import feeds, single_node_model

CACHES = ("key_cache", "value_cache")


@pytest.fixture(scope="module", autouse=True)
def library():
    path = kernels.library_path()
    if path is None:
        pytest.fail("the kernel library is not built (pip install -e . builds it)")
    return path


def run_plain(model, inputs):
    options = ort.SessionOptions()
    options.register_custom_ops_library(kernels.library_path())
    s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return s.run(None, feeds(inputs))


def run_in_place(model, inputs):
    s = session(model)
    caches = {name: inputs[name].copy() for name in CACHES}
    for name, array in caches.items():
        s.set_cache(name, array)
    out = s.run({k: v for k, v in feeds(inputs).items() if k not in CACHES})["output"]
    assert all(s.caches[name] is caches[name] for name in CACHES)  # updated in place, not replaced
    return out, caches["key_cache"], caches["value_cache"]


PLAIN = ("kernel", 1e-4, run_plain)
IN_PLACE = ("kernel, caches bound in place", 1e-4, run_in_place)


@pytest.mark.parametrize("mode", ["prefill", "decode", "mixed"])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_matches_oracle(rng, mode, block_size, group):
    inputs, attrs = random_batch(rng, batch=int(rng.integers(1, 9)), block_size=block_size, group=group, mode=mode)
    check_runners(inputs, attrs, [PLAIN, IN_PLACE])


@pytest.mark.parametrize("variant", [
    dict(scale=0.3), dict(softcap=2.0), dict(is_causal=0), dict(local_window_size=5), dict(local_window_size=0),
    dict(softcap=1.5, local_window_size=7, scale=0.2), dict(is_causal=0, local_window_size=3),
])
def test_attributes(rng, variant):
    inputs, attrs = random_batch(rng, batch=5, block_size=4, group=2, mode="mixed", max_len=60)
    check_runners(inputs, {**attrs, **variant}, [PLAIN, IN_PLACE])


@pytest.mark.parametrize("variant", [{}, dict(scale=0.5), dict(is_causal=0)])
def test_head_sink(rng, variant):
    inputs, attrs = random_batch(rng, batch=4, block_size=8, group=4, mode="mixed", with_sink=True)
    check_runners(inputs, {**attrs, **variant}, [PLAIN, IN_PLACE])


def test_sink_and_window_match_the_reference(rng):
    inputs, attrs = random_batch(rng, batch=4, block_size=4, group=2, mode="mixed", with_sink=True, max_len=50)
    attrs["local_window_size"] = 6
    model = single_node_model("PagedAttention", inputs, OUTPUTS, **attrs)
    want = paged_attention(*inputs.values(), **attrs)
    for got, expected in zip(run_plain(model, inputs), want):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_slot_mapping_with_skipped_writes(rng):
    inputs, attrs = random_batch(rng, batch=6, block_size=4, group=2, mode="mixed", with_slots=True)
    check_runners(inputs, attrs, [PLAIN, IN_PLACE])


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16-cache"])
def test_low_precision(rng, dtype):
    if dtype == "bfloat16-cache":  # fp32 activations over a bf16 cache: only the in-place path returns bf16
        inputs, attrs = random_batch(rng, batch=5, block_size=16, group=2, mode="mixed", with_slots=True)
        for name in CACHES:
            inputs[name] = inputs[name].astype(ml_dtypes.bfloat16)
        check_runners(inputs, attrs, [IN_PLACE])
    else:
        inputs, attrs = random_batch(rng, batch=5, block_size=16, group=2, mode="mixed", dtype=dtype)
        check_runners(inputs, attrs, [PLAIN, IN_PLACE], low_precision=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bfloat16-cache"])
@pytest.mark.parametrize("window", [-1, 13])
def test_prefill_tiles_read_packed_segments(rng, dtype, window):
    """Sequences whose keys 512 or more query vectors read (rows x group): their segments are
    merged into runs of up to 128 positions across cache blocks of 5 and the new tokens, packed
    once per call (keys transposed in chunks of 32 or 16, values in strips of 32 columns, here
    with a partial last strip of 8), and every tile reads the pack; the other sequences in the
    batch read the cache."""
    low = dtype == np.float16
    while True:
        inputs, attrs = random_batch(rng, batch=4, block_size=5, group=4, mode="mixed", v_head_size=40, max_len=200,
                                     dtype=np.float16 if low else np.float32)
        new = np.diff(inputs["cumulative_sequence_length"])
        if new.max() * 4 >= 512 and new.min() * 4 < 512:
            break
    attrs["local_window_size"] = window
    if dtype == "bfloat16-cache":
        for name in CACHES:
            inputs[name] = inputs[name].astype(ml_dtypes.bfloat16)
        check_runners(inputs, attrs, [IN_PLACE])
    else:
        check_runners(inputs, attrs, [PLAIN, IN_PLACE], low_precision=low)


@pytest.mark.parametrize("case", ["long decode", "long prefill", "long chunked prefill"])
def test_long_sequences_split_across_threads(rng, case):
    """Sequences long enough to be cut into several KV chunks and query tiles, merged again."""
    past, new = {"long decode": (900, 1), "long prefill": (0, 150), "long chunked prefill": (500, 70)}[case]
    block_size, kv_heads, group = 16, 2, 2
    blocks = -(-(past + new) // block_size)
    table = rng.permutation(blocks + 3)[:blocks].astype(np.int32)[None]
    heads = kv_heads * group
    inputs = {
        "query": rng.standard_normal((new, heads * 8)).astype(np.float32),
        "key": rng.standard_normal((new, kv_heads * 8)).astype(np.float32),
        "value": rng.standard_normal((new, kv_heads * 8)).astype(np.float32),
        "key_cache": rng.standard_normal((blocks + 3, block_size, kv_heads, 8)).astype(np.float32),
        "value_cache": rng.standard_normal((blocks + 3, block_size, kv_heads, 8)).astype(np.float32),
        "cumulative_sequence_length": np.array([0, new], np.int32),
        "past_seqlens": np.array([past], np.int32),
        "block_table": table,
        "slot_mapping": None,
        "head_sink": None,
    }
    for window in (-1, 100):
        check_runners(inputs, dict(num_heads=heads, kv_num_heads=kv_heads, local_window_size=window), [PLAIN])


def test_steps_chain_in_place(rng):
    """Prefill then two decodes through one session: each step sees the previous writes."""
    inputs, attrs = random_batch(rng, batch=3, block_size=4, group=2, mode="prefill", max_len=9)
    # Room for two more tokens per sequence: the table maps every position it will need.
    past = inputs["cumulative_sequence_length"][1:] - inputs["cumulative_sequence_length"][:-1]
    num_blocks = inputs["key_cache"].shape[0]
    needed = -(-(past + 2) // 4)
    table = np.full((3, int(needed.max())), -1, np.int32)
    order = iter(rng.permutation(int(needed.sum()) + 2))
    for b in range(3):
        table[b, : needed[b]] = [next(order) for _ in range(needed[b])]
    for name in ("key_cache", "value_cache"):
        inputs[name] = rng.standard_normal((int(needed.sum()) + 2, *inputs[name].shape[1:])).astype(np.float32)
    inputs["block_table"] = table
    del num_blocks
    model = single_node_model("PagedAttention", inputs, OUTPUTS, **attrs)
    s = session(model)
    for name in CACHES:
        s.set_cache(name, inputs[name].copy())
    ref_caches = {name: inputs[name].copy() for name in CACHES}
    step = dict(inputs)
    for i in range(3):
        got = s.run({k: v for k, v in feeds(step).items() if k not in CACHES})["output"]
        want, ref_caches["key_cache"], ref_caches["value_cache"] = paged_attention(
            *{**step, **ref_caches}.values(), **attrs)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        for name in CACHES:
            np.testing.assert_array_equal(s.caches[name], ref_caches[name])
        # Next: one decode token per sequence.
        step["past_seqlens"] = (step["past_seqlens"] + np.diff(step["cumulative_sequence_length"])).astype(np.int32)
        step["cumulative_sequence_length"] = np.arange(4, dtype=np.int32)
        for name, width in (("query", attrs["num_heads"]), ("key", attrs["kv_num_heads"]), ("value", attrs["kv_num_heads"])):
            step[name] = rng.standard_normal((3, width * 8)).astype(np.float32)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), batch=st.integers(1, 8), block_size=st.sampled_from([1, 2, 5, 16, 32]),
       group=st.sampled_from([1, 2, 4, 8]), kv_heads=st.integers(1, 3), slots=st.booleans(), sink=st.booleans(),
       mode=st.sampled_from(["prefill", "decode", "mixed"]), window=st.sampled_from([-1, 0, 3, 17]),
       causal=st.sampled_from([0, 1]), softcap=st.sampled_from([0.0, 2.5]))
def test_property_kernel_equals_reference(seed, batch, block_size, group, kv_heads, slots, sink, mode, window,
                                          causal, softcap):
    inputs, attrs = random_batch(np.random.default_rng(seed), batch=batch, block_size=block_size, group=group,
                                 kv_heads=kv_heads, mode=mode, with_slots=slots, with_sink=sink, max_len=40)
    attrs.update(local_window_size=window, is_causal=causal, softcap=softcap)
    model = single_node_model("PagedAttention", inputs, OUTPUTS, **attrs)
    for got, want in zip(run_plain(model, inputs), paged_attention(*inputs.values(), **attrs)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_matches_onnxruntime_group_query_attention(rng):
    """One sequence over a contiguous cache: onnxruntime's com.microsoft.GroupQueryAttention."""
    heads, kv_heads, d, past, new, block_size = 8, 2, 16, 37, 5, 8
    for softcap, window in ((0.0, -1), (3.0, -1), (0.0, 9)):
        q = rng.standard_normal((1, new, heads * d)).astype(np.float32)
        k = rng.standard_normal((1, new, kv_heads * d)).astype(np.float32)
        v = rng.standard_normal((1, new, kv_heads * d)).astype(np.float32)
        past_k = rng.standard_normal((1, kv_heads, past, d)).astype(np.float32)
        past_v = rng.standard_normal((1, kv_heads, past, d)).astype(np.float32)
        node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total"],
                                ["y", "present_key", "present_value"], domain="com.microsoft", num_heads=heads,
                                kv_num_heads=kv_heads, softcap=softcap,
                                local_window_size=window + 1 if window >= 0 else -1)
        names = {"q": q, "k": k, "v": v, "past_key": past_k, "past_value": past_v}
        graph = helper.make_graph(
            [node], "gqa",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape)) for n, a in names.items()]
            + [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
               helper.make_tensor_value_info("total", TensorProto.INT32, [])],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {**names, "seqlens_k": np.array([past + new - 1], np.int32), "total": np.array(past + new, np.int32)})[0]
        # The same past, paged: positions 0..past-1 in shuffled blocks.
        blocks = -(-(past + new) // block_size)
        table = rng.permutation(blocks)[None].astype(np.int32)
        key_cache = np.zeros((blocks, block_size, kv_heads, d), np.float32)
        value_cache = np.zeros_like(key_cache)
        for pos in range(past):
            key_cache[table[0, pos // block_size], pos % block_size] = past_k[0, :, pos]
            value_cache[table[0, pos // block_size], pos % block_size] = past_v[0, :, pos]
        inputs = {"query": q[0], "key": k[0], "value": v[0], "key_cache": key_cache, "value_cache": value_cache,
                  "cumulative_sequence_length": np.array([0, new], np.int32),
                  "past_seqlens": np.array([past], np.int32), "block_table": table}
        got = run_plain(single_node_model("PagedAttention", inputs, OUTPUTS, num_heads=heads, kv_num_heads=kv_heads,
                                          softcap=softcap, local_window_size=window), inputs)[0]
        np.testing.assert_allclose(got, want[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("what,message", [
    ("block id too large", r"block_table\[0, 0\]=.* must lie in \[0, "),
    ("unmapped block read", r"block_table\[2, 0\]=-1 must lie in"),
    ("beyond mapped blocks", "needs .* mapped positions"),
    ("lengths do not add up", "must increase strictly from 0 to num_tokens"),
    ("slot out of range", r"slot_mapping\[0\]=.* lies outside"),
    ("slot written twice", "writes slot 0 twice"),
    ("wrong index dtype", "'past_seqlens' must be int32"),
    ("mismatched heads", "key has shape"),
])
def test_bad_input_is_an_onnxruntime_error(rng, what, message):
    from test_paged_attention import corrupt

    inputs, attrs = corrupt(rng, what)
    model = single_node_model("PagedAttention", {k: v for k, v in inputs.items()}, OUTPUTS, **attrs) \
        if what != "wrong index dtype" else _untyped_model(inputs, attrs)
    with pytest.raises(Exception, match=message):
        run_plain(model, inputs)


def _untyped_model(inputs, attrs):
    """A model whose schema check would refuse the input type: built without shape inference."""
    node = helper.make_node("PagedAttention", [k for k, v in inputs.items() if v is not None], OUTPUTS,
                            domain="onnxgen.preview", **attrs)
    graph = helper.make_graph([node], "bad", [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
        for k, v in inputs.items() if v is not None
    ], [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in OUTPUTS])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25), helper.make_opsetid("onnxgen.preview", 1)])


def test_session_falls_back_to_expansion_with_a_warning(rng, monkeypatch):
    inputs, attrs = random_batch(rng, batch=3, block_size=4, group=2, mode="mixed")
    monkeypatch.setattr(kernels, "library_path", lambda: None)
    model = single_node_model("PagedAttention", inputs, OUTPUTS, **attrs)
    with pytest.warns(UserWarning, match="kernel library is not built"):
        s = session(model)
    assert not s.uses_kernels
    for name in CACHES:
        s.set_cache(name, inputs[name].copy())
    out = s.run({k: v for k, v in feeds(inputs).items() if k not in CACHES})["output"]
    np.testing.assert_allclose(out, oracle(inputs, **attrs), rtol=1e-4, atol=1e-4)
    want_k, want_v = expected_caches(inputs)
    np.testing.assert_array_equal(s.caches["key_cache"], want_k)


def test_avx2_path(tmp_path):
    """The same kernel tests with AVX-512 switched off: the x86-64-v3 baseline path."""
    import os
    import subprocess
    import sys

    if os.environ.get("ONNXGEN_NO_AVX512"):
        pytest.skip("already running the AVX2 path")
    env = {**os.environ, "ONNXGEN_NO_AVX512": "1"}
    selection = "matches_oracle or attributes or low_precision or long_sequences or head_sink or wide_heads"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", __file__, "-k", selection],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__),
    )
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.parametrize("head_size,group,mode", [(64, 4, "decode"), (32, 2, "mixed"), (64, 1, "prefill")])
def test_bf16_cache_wide_heads(rng, head_size, group, mode):
    """bf16 caches with head sizes that take the 32-wide even/odd path, against the reference."""
    kv_heads, block_size, batch = 2, 16, 3
    past = rng.integers(20, 60, batch) if mode != "prefill" else np.zeros(batch, int)
    new = np.ones(batch, int) if mode == "decode" else rng.integers(1, 20, batch)
    needed = -(-(past + new) // block_size)
    num_blocks = int(needed.sum()) + 2
    order = iter(rng.permutation(num_blocks))
    table = np.full((batch, int(needed.max())), -1, np.int32)
    for b in range(batch):
        table[b, : needed[b]] = [next(order) for _ in range(needed[b])]
    tokens, heads = int(new.sum()), kv_heads * group
    inputs = {
        "query": rng.standard_normal((tokens, heads * head_size)).astype(np.float32),
        "key": rng.standard_normal((tokens, kv_heads * head_size)).astype(np.float32),
        "value": rng.standard_normal((tokens, kv_heads * head_size)).astype(np.float32),
        "key_cache": rng.standard_normal((num_blocks, block_size, kv_heads, head_size)).astype(ml_dtypes.bfloat16),
        "value_cache": rng.standard_normal((num_blocks, block_size, kv_heads, head_size)).astype(ml_dtypes.bfloat16),
        "cumulative_sequence_length": np.concatenate([[0], np.cumsum(new)]).astype(np.int32),
        "past_seqlens": past.astype(np.int32),
        "block_table": table,
        "slot_mapping": None,
        "head_sink": None,
    }
    for sink in (None, rng.standard_normal(heads).astype(np.float32)):
        inputs["head_sink"] = sink
        attrs = dict(num_heads=heads, kv_num_heads=kv_heads)
        model = single_node_model("PagedAttention", inputs, OUTPUTS, **attrs)
        got = run_in_place(model, inputs)
        want = paged_attention(*inputs.values(), **attrs)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
        for g, w in zip(got[1:], want[1:]):
            np.testing.assert_array_equal(g.astype(np.float32), w.astype(np.float32))
