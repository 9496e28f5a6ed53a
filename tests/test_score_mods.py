"""PagedAttention's score_mod and the score-mod library against PyTorch's flex_attention.

Every builder of ``onnxgen.ops.score_mods`` (and random compositions of them) on random paged
layouts: the numpy reference and the expanded model on onnxruntime against
``torch.nn.attention.flex_attention`` (eager, CPU) on the same logical keys/values.
Tolerances (fp32, abs and rel): reference 1e-5, expanded model on onnxruntime 1e-4.
Caches are compared exactly.  Bad score graphs are refused with the op named.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from flex_cases import library, t_compose, torch_paged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from paged_cases import OUTPUTS, expected_caches, random_batch

from onnxgen.ops import flex_score
from onnxgen.ops import score_mods as sm
from onnxgen.testing import run_expanded_on_ort, run_reference, single_node_model

RUNNERS = [("reference", 1e-5, run_reference), ("expanded on onnxruntime", 1e-4, run_expanded_on_ort)]


def longest(inputs):
    return int((inputs["past_seqlens"] + np.diff(inputs["cumulative_sequence_length"])).max())


def check(inputs, attrs, mod, torch_mod, runners=RUNNERS):
    want = torch_paged(inputs, torch_mod, **attrs)
    want_k, want_v = expected_caches(inputs)
    model = single_node_model("PagedAttention", inputs, OUTPUTS, score_mod=mod, **attrs)
    onnx.checker.check_model(model, full_check=True)
    for label, tol, run in runners:
        out, key_cache, value_cache = run(model, inputs)
        np.testing.assert_allclose(out, want, rtol=tol, atol=tol, err_msg=f"{mod.name}: {label}")
        np.testing.assert_array_equal(key_cache, want_k, err_msg=label)
        np.testing.assert_array_equal(value_cache, want_v, err_msg=label)


@pytest.mark.parametrize("index", range(10))
def test_library_matches_flex_attention(rng, index):
    inputs, attrs = random_batch(rng, batch=3, block_size=4, group=2, mode="mixed", max_len=20)
    name, mod, torch_mod = library(rng, attrs["num_heads"], 3, longest(inputs))[index]
    attrs["is_causal"] = 0  # the mods mask by themselves
    check(inputs, attrs, mod, torch_mod)


@pytest.mark.parametrize("variant", [dict(is_causal=1), dict(local_window_size=3), dict(scale=0.3)])
def test_score_mod_with_the_attributes(rng, variant):
    """The mod comes after the scale and before PagedAttention's own causal/window masks."""
    inputs, attrs = random_batch(rng, batch=3, block_size=4, group=2, mode="mixed", max_len=20)
    _, mod, torch_mod = library(rng, attrs["num_heads"], 3, longest(inputs))[4]  # alibi
    check(inputs, {**attrs, **variant}, mod, torch_mod)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), picks=st.lists(st.integers(0, 9), min_size=2, max_size=3),
       block_size=st.sampled_from([1, 3, 16]), group=st.sampled_from([1, 4]), causal=st.sampled_from([0, 1]))
def test_random_compositions(seed, picks, block_size, group, causal):
    rng = np.random.default_rng(seed)
    inputs, attrs = random_batch(rng, batch=3, block_size=block_size, group=group, mode="mixed", max_len=16)
    cases = library(rng, attrs["num_heads"], 3, longest(inputs))
    mod = sm.compose(*(cases[i][1] for i in picks))
    torch_mod = t_compose(*(cases[i][2] for i in picks))
    check(inputs, {**attrs, "is_causal": causal}, mod, torch_mod)


def test_fully_masked_rows_give_zero(rng):
    inputs, attrs = random_batch(rng, batch=2, block_size=4, group=1, mode="mixed")
    g = sm._Graph("nothing")
    mod = g.finish(g.mask(g.op("Less", "kv_pos", g.const(-1, np.int32))))
    model = single_node_model("PagedAttention", inputs, OUTPUTS, score_mod=mod, **attrs)
    for _, _, run in RUNNERS:
        assert np.array_equal(run(model, inputs)[0], np.zeros_like(inputs["query"]))


# ---- bad score graphs ----------------------------------------------------------------------

def _graph(nodes, inputs=None, output_type=TensorProto.FLOAT, initializer=(), output_shape=()):
    inputs = inputs or [helper.make_tensor_value_info(n, t, []) for n, t in
                        zip(flex_score.INPUT_NAMES, flex_score.INPUT_TYPES)]
    return helper.make_graph(nodes, "bad", inputs, [helper.make_tensor_value_info("out", output_type, output_shape)],
                             initializer=list(initializer))


BAD = {
    "arity": (_graph([helper.make_node("Identity", ["score"], ["out"])],
                     inputs=[helper.make_tensor_value_info("score", TensorProto.FLOAT, [])]), "5 inputs"),
    "input type": (_graph([helper.make_node("Identity", ["score"], ["out"])],
                          inputs=[helper.make_tensor_value_info(n, TensorProto.INT64 if n == "kv_pos" else t, [])
                                  for n, t in zip(flex_score.INPUT_NAMES, flex_score.INPUT_TYPES)]),
                   r"input 4 \(kv_pos.*int32, got int64"),
    "not pointwise": (_graph([helper.make_node("ReduceMax", ["score"], ["out"], name="rmax")]),
                      "ReduceMax node 'rmax'.*not pointwise"),
    "wrong shape": (_graph([helper.make_node("Add", ["score", "v"], ["out"], name="add")],
                           initializer=[helper.make_tensor("v", TensorProto.FLOAT, [3], [1, 2, 3])]),
                    "constant 'v' has shape"),
    "type mismatch": (_graph([helper.make_node("Add", ["score", "kv_pos"], ["out"], name="add")]), "type-check"),
    "int output": (_graph([helper.make_node("Identity", ["kv_pos"], ["out"])], output_type=TensorProto.INT32),
                   "must be float"),
    "gather from input": (_graph([helper.make_node("Gather", ["score", "head"], ["out"], name="g")]),
                          "Gather node 'g' must read a constant"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_score_graphs_are_refused(rng, case):
    graph, message = BAD[case]
    with pytest.raises(flex_score.ScoreModError, match=message):
        flex_score.check(graph)
    inputs, attrs = random_batch(rng, batch=2, block_size=4, group=1, mode="decode")
    with pytest.raises(Exception, match=message):  # from onnx's shape inference: the node and the op
        single_node_model("PagedAttention", inputs, OUTPUTS, score_mod=graph, **attrs)
