"""Compiled score functions: score_mod graphs -> bytecode -> the PagedAttention CPU kernel.

Oracles: PyTorch's flex_attention (eager, CPU) for every library mod and random compositions
over random paged layouts; onnx's reference evaluator (the numpy reference, which runs the graph
itself) for graphs that use every opcode.  Two ways in: plain onnxruntime with the library and
a model compiled by ``compile_score_mods``, and ``onnxgen.backends.ort.session`` (compiles at
session creation, caches bound in place).  Tolerances: 1e-4 abs and rel (fp32), 4e-3 (fp16
inputs); caches exactly.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
from flex_cases import library, t_compose, torch_paged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from paged_cases import OUTPUTS, expected_caches, random_batch

from onnxgen import kernels
from onnxgen.backends.ort import session
from onnxgen.ops import flex_score
from onnxgen.ops import score_mods as sm
from onnxgen.passes.compile_score_mod import (PROGRAM_ATTR, ScoreModError, Unsupported, compile_graph,
                                              compile_score_mods, plain_mask)
from onnxgen.testing import feeds, run_reference, single_node_model

CACHES = ("key_cache", "value_cache")


@pytest.fixture(scope="module", autouse=True)
def library_built():
    if kernels.library_path() is None:
        pytest.fail("the kernel library is not built (pip install -e . builds it)")


def run_compiled(model, inputs):
    """Plain onnxruntime + the library on the compiled model: the kernel and nothing else."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback allowed here
        compiled = compile_score_mods(model)
    node, mod = compiled.graph.node[0], next(a.g for a in model.graph.node[0].attribute if a.name == "score_mod")
    names = {a.name for a in node.attribute}
    assert node.op_type == "PagedAttention" and "score_mod" not in names
    assert (PROGRAM_ATTR in names) != plain_mask(mod)  # a plain mask runs as the kernel's attributes alone
    options = ort.SessionOptions()
    options.register_custom_ops_library(kernels.library_path())
    s = ort.InferenceSession(compiled.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return s.run(None, feeds(inputs))


def run_in_place(model, inputs):
    s = session(model)
    caches = {name: inputs[name].copy() for name in CACHES}
    for name, array in caches.items():
        s.set_cache(name, array)
    out = s.run({k: v for k, v in feeds(inputs).items() if k not in CACHES})["output"]
    return out, caches["key_cache"], caches["value_cache"]


def longest(inputs):
    return int((inputs["past_seqlens"] + np.diff(inputs["cumulative_sequence_length"])).max())


def check(inputs, attrs, mod, want, tol=1e-4):
    want_k, want_v = expected_caches(inputs)
    model = single_node_model("PagedAttention", inputs, OUTPUTS, score_mod=mod, **attrs)
    for run in (run_compiled, run_in_place):
        out, k, v = run(model, inputs)
        np.testing.assert_allclose(out.astype(np.float32), want, rtol=tol, atol=tol, err_msg=f"{mod.name}: {run.__name__}")
        np.testing.assert_array_equal(k, want_k)
        np.testing.assert_array_equal(v, want_v)


@pytest.mark.parametrize("block_size", [1, 16])
def test_library_matches_flex_attention(rng, block_size):
    inputs, attrs = random_batch(rng, batch=4, block_size=block_size, group=2, mode="mixed", max_len=24)
    attrs["is_causal"] = 0
    for name, mod, torch_mod in library(rng, attrs["num_heads"], 4, longest(inputs)):
        check(inputs, attrs, mod, torch_paged(inputs, torch_mod, **attrs))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), picks=st.lists(st.integers(0, 9), min_size=1, max_size=3),
       block_size=st.sampled_from([1, 3, 16]), group=st.sampled_from([1, 4]), causal=st.sampled_from([0, 1]),
       window=st.sampled_from([-1, 5]), softcap=st.sampled_from([0.0, 2.0]), mode=st.sampled_from(["mixed", "decode"]))
def test_random_compositions(seed, picks, block_size, group, causal, window, softcap, mode):
    rng = np.random.default_rng(seed)
    inputs, attrs = random_batch(rng, batch=3, block_size=block_size, group=group, mode=mode, max_len=20)
    cases = library(rng, attrs["num_heads"], 3, longest(inputs))
    mod = sm.compose(*(cases[i][1] for i in picks))
    torch_mod = t_compose(*(cases[i][2] for i in picks))
    attrs.update(is_causal=causal, local_window_size=window, softcap=softcap)
    if softcap:  # the attribute's soft cap comes before score_mod
        torch_mod = t_compose(lambda s, b, h, q, kv: softcap * (s / softcap).tanh(), torch_mod)
    check(inputs, attrs, mod, torch_paged(inputs, torch_mod, **{**attrs, "softcap": 0.0}))


def test_a_window_in_the_mask_becomes_the_kernels_window(rng):
    """The final mask's ``kv >= q - W`` also sets local_window_size (the smaller where the node
    has one), so the kernel skips the blocks it hides; the output is torch's all the same."""
    from flex_cases import t_sliding_window, t_softcap
    inputs, attrs = random_batch(rng, batch=2, block_size=4, group=2, mode="mixed", max_len=60)
    mod = sm.compose(sm.softcap(5.0), sm.sliding_window(7, causal=False))
    for node_window, want in ((-1, 7), (3, 3), (20, 7)):
        model = single_node_model("PagedAttention", inputs, OUTPUTS, score_mod=mod,
                                  **{**attrs, "local_window_size": node_window})
        node = compile_score_mods(model).graph.node[0]
        assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["local_window_size"] == want
    torch_mod = t_compose(t_softcap(5.0), t_sliding_window(7, causal=False))
    check(inputs, attrs, mod, torch_paged(inputs, torch_mod, **attrs))


def test_long_sequences_across_threads_and_fp16(rng):
    for dtype, tol in ((np.float32, 1e-4), (np.float16, 4e-3)):
        inputs, attrs = random_batch(rng, batch=2, block_size=16, group=4, mode="prefill", max_len=300, dtype=dtype)
        mod = sm.compose(sm.softcap(20.0), sm.sliding_window(37), sm.alibi(attrs["num_heads"]))
        from flex_cases import t_alibi, t_sliding_window, t_softcap
        torch_mod = t_compose(t_softcap(20.0), t_sliding_window(37), t_alibi(sm.alibi_slopes(attrs["num_heads"])))
        check(inputs, attrs, mod, torch_paged(inputs, torch_mod, **attrs), tol=tol)



def test_prefill_tiles_run_programs_that_cannot_fail_over_whole_tiles(rng):
    """A prefill's query tiles run a program that cannot fail (ALiBi, softcap) once per head over
    all their rows, masked scores included; one whose Gather index varies with the positions (a
    document mask) runs over each row's visible keys only: its table covers exactly the positions
    the batch attends to, and the tiles' masked scores lie past it."""
    from flex_cases import t_alibi, t_document_mask

    while True:  # past one run of 128 positions, the second partial: masked columns lie past the table
        inputs, attrs = random_batch(rng, batch=1, block_size=16, group=4, mode="prefill", max_len=250)
        length = longest(inputs)
        if length > 140:
            break
    ids = np.repeat(np.arange(length // 50 + 1, dtype=np.int32), 50)[:length]
    for mod, torch_mod in ((sm.alibi(attrs["num_heads"]), t_alibi(sm.alibi_slopes(attrs["num_heads"]))),
                           (sm.document_mask(ids), t_document_mask(ids))):
        check(inputs, attrs, mod, torch_paged(inputs, torch_mod, **attrs))


def test_what_depends_on_positions_alone_is_shared_by_the_heads(rng):
    """The registers that depend on neither the score nor the head are computed once for all
    the heads of a tile or row, the others per head; here the result itself depends on the
    positions alone (the score is ignored), in a prefill's tiles and in the decodes' rows."""
    g = sm._Graph("distance_only")
    mod = g.finish(g.op("Mul", g.op("Cast", g.op("Sub", "kv_pos", "q_pos"), to=TensorProto.FLOAT), g.const(0.25, np.float32)))
    torch_mod = lambda s, b, h, q, kv: 0.25 * (kv - q).float()  # noqa: E731
    for mode, max_len in (("prefill", 250), ("mixed", 40)):
        inputs, attrs = random_batch(rng, batch=2, block_size=16, group=4, mode=mode, max_len=max_len)
        check(inputs, attrs, mod, torch_paged(inputs, torch_mod, **attrs))

# ---- every opcode, against onnx's reference evaluator ---------------------------------------

def every_op_graph():
    """One graph through every op the compiler knows, with uniform and varying operands."""
    g = sm._Graph("every_op")
    f = lambda v: g.const(v, np.float32)  # noqa: E731
    i = lambda v: g.const(v, np.int32)  # noqa: E731
    dist = g.op("Sub", "kv_pos", "q_pos")                                    # int, varying
    fdist = g.op("Cast", dist, to=TensorProto.FLOAT)
    x = g.op("Add", g.op("Mul", "score", f(0.5)), g.op("Div", fdist, f(7.0)))
    x = g.op("Add", x, g.op("Tanh", g.op("Neg", g.op("Abs", x))))
    x = g.op("Add", x, g.op("Log", g.op("Add", g.op("Exp", g.op("Sub", x, f(3.0))), f(1.0))))
    x = g.op("Add", x, g.op("Sqrt", g.op("Relu", x)))
    x = g.op("Add", x, g.op("Floor", g.op("Div", x, f(3.0))))
    x = g.op("Sub", x, g.op("Ceil", g.op("Reciprocal", g.op("Add", g.op("Abs", x), f(2.0)))))
    x = g.op("Add", x, g.op("Sigmoid", g.op("Pow", g.op("Abs", x), f(0.5))))
    x = g.op("Max", g.op("Min", x, f(4.0), f(5.0)), f(-4.0))
    x = g.op("Clip", x, f(-3.5), f(3.5))
    h2 = g.op("Div", g.op("Add", "head", i(3)), i(2))                       # int division, uniform
    sel = g.op("Where", g.op("Greater", h2, g.op("Relu", g.op("Neg", g.op("Abs", "batch")))), h2, i(0))
    table = g.const(np.arange(40, dtype=np.int64) % 5, np.int64)
    bucket = g.op("Gather", table, g.op("Cast", g.op("Add", g.op("Min", g.op("Max", dist, i(-19)), i(19)), i(20)),
                                          to=TensorProto.INT64))
    keep = g.op("Or", g.op("Not", g.op("Equal", g.op("Cast", bucket, to=TensorProto.INT32), i(3))),
                g.op("Xor", g.op("LessOrEqual", "kv_pos", "q_pos"), g.op("Cast", sel, to=TensorProto.BOOL)))
    keep = g.op("And", keep, g.op("GreaterOrEqual", x, f(-3.0)))
    keep = g.op("And", keep, g.op("Not", g.op("Less", fdist, g.op("Cast", g.op("Cast", x, to=TensorProto.INT32),
                                                                  to=TensorProto.FLOAT))))
    bias = g.op("Gather", g.const(np.linspace(-1, 1, 8), np.float32), g.op("Add", g.op("Max", g.op("Min", "head", i(3)), i(0)),
                                                                        g.op("Cast", g.op("Cast", x, to=TensorProto.BOOL),
                                                                             to=TensorProto.INT32)))
    x = g.op("Add", x, g.op("Mul", bias, g.op("Cast", g.op("Identity", sel), to=TensorProto.FLOAT)))
    constant = g.op("Constant", value=helper.make_tensor("c", TensorProto.FLOAT, [], [0.25]))
    x = g.op("Add", x, constant)
    return g.finish(g.op("Where", keep, x, g.const(-np.inf, np.float32)))


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_every_opcode_matches_the_reference(rng, block_size):
    inputs, attrs = random_batch(rng, batch=4, block_size=block_size, group=2, mode="mixed", max_len=20)
    mod = every_op_graph()
    program = compile_graph(mod).program
    assert program[3] > 40  # instructions
    model = single_node_model("PagedAttention", inputs, OUTPUTS, score_mod=mod, **attrs)
    want = run_reference(model, inputs)[0]
    check(inputs, attrs, mod, want)


def test_uncompilable_graph_falls_back_with_a_warning(rng):
    inputs, attrs = random_batch(rng, batch=3, block_size=4, group=1, mode="mixed")
    g = sm._Graph("erf")
    mod = g.finish(g.op("Add", "score", g.op("Erf", g.op("Cast", g.op("Sub", "kv_pos", "q_pos"), to=TensorProto.FLOAT))))
    with pytest.raises(Unsupported, match="Erf"):
        compile_graph(mod)
    model = single_node_model("PagedAttention", inputs, OUTPUTS, score_mod=mod, **attrs)
    with pytest.warns(UserWarning, match="Erf.*expanded function body"):
        out = run_in_place(model, inputs)[0]
    np.testing.assert_allclose(out, run_reference(model, inputs)[0], rtol=1e-4, atol=1e-4)


def raw_model(inputs, attrs, mod):
    """A PagedAttention model made without onnx's checks (they refuse bad score graphs too)."""
    names = [n for n, a in inputs.items() if a is not None]
    node = helper.make_node("PagedAttention", names, OUTPUTS, domain="onnxgen.preview", name="layer3.attn",
                            score_mod=mod, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(inputs[n].dtype),
                                                                          [None] * inputs[n].ndim) for n in names],
                              [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in OUTPUTS])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25), helper.make_opsetid("onnxgen.preview", 1)])


@pytest.mark.parametrize("use_kernels", [True, False])
def test_bad_graph_fails_at_session_creation_naming_node_and_op(rng, use_kernels):
    inputs, attrs = random_batch(rng, batch=2, block_size=4, group=1, mode="decode")
    g = sm._Graph("bad")
    mod = g.finish(g.op("ReduceMax", "score"))
    mod.node[0].name = "rmax"
    with pytest.raises(ScoreModError, match="PagedAttention node 'layer3.attn'.*ReduceMax node 'rmax'.*not pointwise"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            session(raw_model(inputs, attrs, mod), use_kernels=use_kernels)
    bad_arity = helper.make_graph([helper.make_node("Identity", ["s"], ["o"])], "arity",
                                  [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
                                  [helper.make_tensor_value_info("o", TensorProto.FLOAT, [])])
    with pytest.raises(ScoreModError, match="'layer3.attn'.*5 inputs"):
        session(raw_model(inputs, attrs, bad_arity))


def test_gather_out_of_range_is_an_onnxruntime_error(rng):
    inputs, attrs = random_batch(rng, batch=2, block_size=4, group=1, mode="decode", max_len=30)
    while inputs["past_seqlens"].max() < 3:  # some query must lie past the table
        inputs, attrs = random_batch(rng, batch=2, block_size=4, group=1, mode="decode", max_len=30)
    mod = sm.document_mask(np.zeros(3, np.int32))  # covers positions 0-2 only
    model = single_node_model("PagedAttention", inputs, OUTPUTS, score_mod=mod, **attrs)
    with pytest.raises(Exception, match="Gather index .* outside its table of 3"):
        run_compiled(model, inputs)


def test_program_is_checked_by_the_kernel(rng):
    inputs, attrs = random_batch(rng, batch=1, block_size=4, group=1, mode="decode")
    model = compile_score_mods(single_node_model("PagedAttention", inputs, OUTPUTS, score_mod=sm.alibi(attrs["num_heads"]), **attrs))
    program = next(a for a in model.graph.node[0].attribute if a.name == PROGRAM_ATTR)
    program.ints[5] = 1  # the first instruction writes an input register
    options = ort.SessionOptions()
    options.register_custom_ops_library(kernels.library_path())
    with pytest.raises(Exception, match="score_program: instruction 0 writes register 1"):
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
            None, feeds(inputs))


def test_check_is_shared_by_every_path():
    assert flex_score.POINTWISE_OPS >= {"Add", "Gather", "Where", "Tanh"}
