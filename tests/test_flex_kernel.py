"""Non-paged FlexAttention on the compiled kernel (passes.flex_kernel) vs expansion and PyTorch.

A FlexAttention node whose score_mod is pointwise in (b, h, q_idx, kv_idx) is rewritten at
session creation into PagedAttention (cache_only, compiled score program).  Oracles: PyTorch's
flex_attention (eager, CPU) and the expanded model on stock onnxruntime.  Tolerances: fp32
1e-4 abs and rel (kernel vs torch and vs expansion), fp16 5e-3.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from flex_cases import library, t_alibi, t_compose, t_sliding_window, t_softcap, torch_flex
from onnx import TensorProto, helper
from test_flex_attention import flex_model, random_qkv

from onnxgen import kernels
from onnxgen.backends.ort import session
from onnxgen.ops import score_mods as sm
from onnxgen.passes.compile_score_mod import Masks, compile_graph, implied_masks, kernel_program, plain_mask
from onnxgen.passes.flex_kernel import flex_to_kernel
from onnxgen.testing import run_expanded_on_ort


@pytest.fixture(scope="module", autouse=True)
def library_built():
    if kernels.library_path() is None:
        pytest.fail("the kernel library is not built (pip install -e . builds it)")


def kernel_ops(model):
    return [n.op_type for n in flex_to_kernel(model).graph.node if n.op_type in ("FlexAttention", "PagedAttention")]


def run_kernel(model, feeds, threads=2):
    return session(model, threads=threads).run(feeds)["Y"]


@pytest.mark.parametrize("index", range(10))
@pytest.mark.parametrize("lengths", [(6, 6), (3, 9), (9, 4)])
def test_library_on_the_kernel(rng, index, lengths):
    feeds = random_qkv(rng, 2, 4, 2, *lengths)
    name, mod, torch_mod = library(rng, 4, 2, max(lengths))[index]
    model = flex_model(sm.flex_score_mod(mod), 4, 2)
    assert kernel_ops(model) == ["PagedAttention"], name
    want = torch_flex(feeds["Q"], feeds["K"], feeds["V"], torch_mod)
    got = run_kernel(model, feeds)
    expanded = run_expanded_on_ort(model, feeds)[0]
    # a row the mod masks completely: 0 in torch and on the kernel, NaN in onnx's softmax
    seen = np.abs(want).sum(-1) > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(got[seen], expanded[seen], rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
def test_long_sequences_blocks_split_and_causal_skip(rng, heads):
    """S = 300 > the kernel's 128-position segments; causal and window detected from the graph."""
    feeds = random_qkv(rng, 2, *heads, 300, 300)
    mod = sm.compose(sm.softcap(20.0), sm.alibi(heads[0]), sm.sliding_window(37))
    masks = implied_masks(mod)
    assert (masks.causal, masks.window) == (True, 37) and masks.kept is not None
    torch_mod = t_compose(t_softcap(20.0), t_alibi(sm.alibi_slopes(heads[0])), t_sliding_window(37))
    model = flex_model(sm.flex_score_mod(mod), *heads, scale=0.3)
    paged = next(n for n in flex_to_kernel(model).graph.node if n.op_type == "PagedAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in paged.attribute}
    assert attrs["is_causal"] == 1 and attrs["local_window_size"] == 37 and attrs["cache_only"] == 1
    want = torch_flex(feeds["Q"], feeds["K"], feeds["V"], torch_mod, scale=0.3)
    np.testing.assert_allclose(run_kernel(model, feeds), want, rtol=1e-4, atol=1e-4)


def test_masks_only_from_a_final_where():
    assert implied_masks(sm.causal()) == Masks(True, -1, "score")
    assert implied_masks(sm.sliding_window(5, causal=False)) == Masks(False, 5, "score")
    assert implied_masks(sm.compose(sm.causal(), sm.alibi(4))) == Masks()  # a bias after the mask
    assert implied_masks(sm.prefix_lm(3)) == Masks()  # Or: not a conjunct
    doc = sm.document_mask(np.array([0, 0, 1, 1], np.int32))  # same document AND causal
    assert implied_masks(doc) == Masks(True, -1, None)  # the document conjunct stays in the program
    windowed = sm.compose(doc, sm.sliding_window(2))  # the window layer peels off, the document one stays
    masks = implied_masks(windowed)
    assert masks.causal and masks.window == 2 and masks.kept is not None and not plain_mask(windowed)


def test_plain_masks_need_no_program_and_bounds_leave_the_program():
    """Causal and window bounds become the kernel's attributes: no program for a plain mask, and
    a program without the mask's instructions for a bias under one."""
    assert kernel_program(sm.causal()) is None and kernel_program(sm.sliding_window(9)) is None
    assert plain_mask(sm.compose(sm.causal(), sm.sliding_window(9, causal=False)))
    biased = sm.compose(sm.alibi(4), sm.sliding_window(9))
    assert not plain_mask(biased)
    whole, stripped = compile_graph(biased), kernel_program(biased)
    assert 4 < stripped.program[3] < whole.program[3]  # instructions: the bias's only


def test_fp16_and_no_score_mod(rng):
    feeds = random_qkv(rng, 1, 2, 2, 5, 9, np.float16)
    f32 = [feeds[n].astype(np.float32) for n in "QKV"]
    model = flex_model(sm.flex_score_mod(sm.softcap(50.0)), 2, 2, TensorProto.FLOAT16)
    assert kernel_ops(model) == ["PagedAttention"]
    got = run_kernel(model, feeds)
    assert got.dtype == np.float16
    want = torch_flex(*f32, lambda s, b, h, q, kv: 50 * (s / 50).tanh())
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=5e-3, atol=5e-3)
    model = flex_model(None, 2, 2, TensorProto.FLOAT16)
    assert kernel_ops(model) == ["PagedAttention"]
    np.testing.assert_allclose(run_kernel(model, feeds).astype(np.float32), torch_flex(*f32, None), rtol=5e-3,
                               atol=5e-3)


def test_not_pointwise_or_not_compilable_falls_back(rng):
    feeds = random_qkv(rng, 1, 2, 2, 4, 6)
    # a score_mod reading the row maximum: not pointwise, expanded
    s = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None] * 4)
    o = helper.make_tensor_value_info("out", TensorProto.FLOAT, [None] * 4)
    rowmax = helper.make_graph([helper.make_node("ReduceMax", ["scores"], ["m"], keepdims=1),
                                helper.make_node("Sub", ["scores", "m"], ["out"])], "rowmax", [s], [o])
    model = flex_model(rowmax, 2, 2)
    assert kernel_ops(model) == ["FlexAttention"]
    want = torch_flex(feeds["Q"], feeds["K"], feeds["V"], None)
    np.testing.assert_allclose(run_kernel(model, feeds), want, rtol=1e-4, atol=1e-4)
    # pointwise, but Erf has no opcode: a warning naming it, then expansion
    g = sm._Graph("erf")
    erf = g.finish(g.op("Add", "score", g.op("Erf", g.op("Cast", g.op("Sub", "kv_pos", "q_pos"), to=TensorProto.FLOAT))))
    model = flex_model(sm.flex_score_mod(erf), 2, 2)
    with pytest.warns(UserWarning, match="Erf.*expanded"):
        got = run_kernel(model, feeds)
    np.testing.assert_allclose(got, run_expanded_on_ort(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_dynamic_head_count_is_expanded(rng):
    model = flex_model(sm.flex_score_mod(sm.causal()), 2, 2)
    for value in model.graph.input:
        value.type.tensor_type.shape.dim[1].dim_param = "heads"
    model.graph.ClearField("value_info")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert kernel_ops(model) == ["FlexAttention"]
    feeds = random_qkv(rng, 1, 2, 2, 4, 4)
    want = torch_flex(feeds["Q"], feeds["K"], feeds["V"], lambda s, b, h, q, kv: s.where(kv <= q, -float("inf")))
    np.testing.assert_allclose(run_kernel(model, feeds), want, rtol=1e-4, atol=1e-4)


def test_rewrite_is_kernel_only(rng):
    """The rewritten node carries the kernel's private attributes (not PagedAttention's schema)."""
    model = flex_model(sm.flex_score_mod(sm.alibi(4)), 4, 2)
    rewritten = flex_to_kernel(model)
    ops = {n.op_type for n in rewritten.graph.node}
    assert ops >= {"PagedAttention", "Reshape"} and "Transpose" not in ops  # heads_first: no copies around it
    paged = next(n for n in rewritten.graph.node if n.op_type == "PagedAttention")
    assert {a.name for a in paged.attribute} >= {"cache_only", "heads_first", "score_program", "score_constants"}
    with pytest.raises(onnx.checker.ValidationError, match="cache_only"):
        onnx.checker.check_model(rewritten)
    onnx.checker.check_model(model)  # the model itself is untouched


def test_heads_first_without_cache_only_is_refused(rng):
    """heads_first is FlexAttention's layout for the cache-only mode; on a paged call it is an error."""
    import onnxruntime as ort
    from paged_cases import OUTPUTS, random_batch

    from onnxgen.testing import feeds, single_node_model
    inputs, attrs = random_batch(rng, batch=2, block_size=4, group=2, mode="mixed")
    model = single_node_model("PagedAttention", inputs, OUTPUTS, heads_first=1, **attrs)
    options = ort.SessionOptions()
    options.register_custom_ops_library(kernels.library_path())
    with pytest.raises(Exception, match="heads_first needs cache_only"):
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
            None, feeds(inputs))


def test_vector_tanh_exp_sigmoid_match_numpy(rng):
    """The interpreter's 8-lane tanh/exp/sigmoid (polynomials) against numpy, through attention
    outputs: scores spread over [-40, 40] so every branch (small/large |x|) is taken."""
    feeds = random_qkv(rng, 1, 2, 2, 16, 40)
    feeds["Q"] *= 12.0
    g = sm._Graph("transcendental")
    x = g.op("Tanh", g.op("Mul", "score", g.const(0.3, np.float32)))
    y = g.op("Exp", g.op("Div", "score", g.const(8.0, np.float32)))
    z = g.op("Sigmoid", "score")
    mod = g.finish(g.op("Add", g.op("Add", g.op("Mul", x, g.const(4.0, np.float32)), g.op("Log", y)), z))
    model = flex_model(sm.flex_score_mod(mod), 2, 2)
    assert kernel_ops(model) == ["PagedAttention"]
    q, k, v = (feeds[n].astype(np.float64) for n in "QKV")
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(8)
    s = 4 * np.tanh(0.3 * s) + s / 8 + 1 / (1 + np.exp(-s))
    p = np.exp(s - s.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ v
    assert np.abs(q @ k.transpose(0, 1, 3, 2) / np.sqrt(8)).max() > 20
    np.testing.assert_allclose(run_kernel(model, feeds), want, rtol=1e-5, atol=1e-5)
