"""PyTorch flex_attention -> ONNX (onnxgen.export.flex) against PyTorch itself.

Small torch modules call ``flex_attention`` with score_mod Python functions (softcap, ALiBi
from a buffer, a relative-position table indexed [h, d], captured scalars) and BlockMasks
(causal, sliding window, documents); ``torch.onnx.export(dynamo=True)`` lowers the call through
``custom_translation_table`` to ``ai.onnx.preview.FlexAttention``.  The exported model runs on
``onnxgen.backends.ort.session`` (the compiled kernel, passes.flex_kernel) and, expanded, on
stock onnxruntime; both are compared with the module's eager output.  ``score_mod_graph``
traces the same Python mods into PagedAttention's score_mod, checked on random paged batches
against flex_attention over the gathered sequences.  Tolerances: 1e-4 abs and rel (fp32).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from flex_cases import torch_paged
from paged_cases import OUTPUTS, random_batch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from onnxgen.backends.ort import session
from onnxgen.export import flex
from onnxgen.ops import score_mods as sm
from onnxgen.ops.flex_score import POINTWISE_OPS
from onnxgen.passes.flex_kernel import flex_to_kernel
from onnxgen.testing import run_expanded_on_ort, single_node_model

TOL = 1e-4


def causal(b, h, q, kv):
    return kv <= q


def sliding(window):
    def mask(b, h, q, kv):
        return (kv <= q) & (q - kv <= window)
    return mask


class Attention(torch.nn.Module):
    """flex_attention with a score_mod over module state and a BlockMask built outside forward."""

    def __init__(self, heads, score="alibi+softcap", block_mask=None, enable_gqa=False):
        super().__init__()
        self.register_buffer("slopes", torch.as_tensor(sm.alibi_slopes(heads)))
        self.register_buffer("table", torch.randn(heads, 9))
        self.score, self.block_mask, self.enable_gqa = score, block_mask, enable_gqa

    def forward(self, q, k, v):
        slopes, table = self.slopes, self.table

        def alibi_softcap(s, b, h, qi, kv):
            return 20.0 * torch.tanh(s / 20.0) + slopes[h] * (kv - qi).float()

        def relative(s, b, h, qi, kv):
            return s + table[h, torch.clamp(kv - qi, -4, 4) + 4]

        def plain(s, b, h, qi, kv):
            return s

        mod = {"alibi+softcap": alibi_softcap, "relative": relative, "none": None, "plain": plain}[self.score]
        return flex_attention(q, k, v, score_mod=mod, block_mask=self.block_mask, enable_gqa=self.enable_gqa)


def qkv(batch, heads, kv_heads, q_len, kv_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, q_len, 16, generator=g), torch.randn(batch, kv_heads, kv_len, 16, generator=g),
            torch.randn(batch, kv_heads, kv_len, 16, generator=g))


def check(module, args, *, kernel=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = module(*args).numpy()
    model = flex.export(module, args)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node if n.domain == "ai.onnx.preview"] == ["FlexAttention"]
    feeds = {i.name: a.numpy() for i, a in zip(model.graph.input, args)}
    rewritten = [n.op_type for n in flex_to_kernel(model).graph.node if n.op_type.endswith("Attention")]
    assert rewritten == (["PagedAttention"] if kernel else ["FlexAttention"])
    got = session(model, threads=2).run(feeds)
    np.testing.assert_allclose(next(iter(got.values())), want, rtol=TOL, atol=TOL, err_msg="onnxgen session")
    np.testing.assert_allclose(run_expanded_on_ort(model, feeds)[0], want, rtol=TOL, atol=TOL,
                               err_msg="expanded on onnxruntime")
    return model


@pytest.mark.parametrize("score", ["alibi+softcap", "relative", "none", "plain"])
def test_score_mods_with_a_causal_block_mask(score):
    block_mask = create_block_mask(causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    check(Attention(4, score, block_mask), qkv(2, 4, 4, 64, 64))


def test_sliding_window_block_mask_gqa_and_detected_masks():
    block_mask = create_block_mask(sliding(10), None, None, 48, 48, device="cpu", BLOCK_SIZE=16)
    model = check(Attention(8, "alibi+softcap", block_mask, enable_gqa=True), qkv(1, 8, 2, 48, 48))
    paged = next(n for n in flex_to_kernel(model).graph.node if n.op_type == "PagedAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in paged.attribute}
    assert attrs["is_causal"] == 1 and attrs["num_heads"] == 8 and attrs["kv_num_heads"] == 2


def test_no_block_mask_and_queries_shorter_than_keys():
    check(Attention(4, "relative"), qkv(2, 4, 4, 5, 19))


def test_dynamic_sequence_length():
    module = Attention(4, "alibi+softcap")
    length = torch.export.Dim("L", min=2, max=4096)
    model = flex.export(module, qkv(1, 4, 4, 8, 8), dynamic_shapes=({2: length}, {2: length}, {2: length}))
    s = session(model)
    for n in (8, 37, 130):
        args = qkv(1, 4, 4, n, n, seed=n)
        got = s.run({i.name: a.numpy() for i, a in zip(model.graph.input, args)})
        np.testing.assert_allclose(next(iter(got.values())), module(*args).numpy(), rtol=TOL, atol=TOL)


def test_document_mask_from_a_captured_table():
    ids = torch.tensor([[0] * 10 + [1] * 14 + [2] * 8, [0] * 30 + [1] * 2])

    def documents(b, h, q, kv):
        return (ids[b, q] == ids[b, kv]) & (kv <= q)

    block_mask = create_block_mask(documents, 2, None, 32, 32, device="cpu", BLOCK_SIZE=16)
    check(Attention(2, "alibi+softcap", block_mask), qkv(2, 2, 2, 32, 32))


def test_direct_torch_onnx_export_with_the_table():
    module, args = Attention(4, "alibi+softcap"), qkv(1, 4, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with flex.constant_default_block_mask():  # no BlockMask: torch's default one is built in forward
            program = torch.export.export(module, args)
        model = torch.onnx.export(program, args, dynamo=True, opset_version=25,
                                  custom_translation_table=flex.translation_table(program)).model_proto
        want = module(*args).numpy()
    model = flex.own_constants(model)
    feeds = {i.name: a.numpy() for i, a in zip(model.graph.input, args)}
    np.testing.assert_allclose(next(iter(session(model).run(feeds).values())), want, rtol=TOL, atol=TOL)


def test_unsupported_calls_are_refused_clearly():
    class Lse(torch.nn.Module):
        def forward(self, q, k, v):
            return flex_attention(q, k, v, return_lse=True)[1]

    with pytest.raises(Exception, match="return_lse"):
        flex.export(Lse(), qkv(1, 2, 2, 4, 4))

    class FromInput(torch.nn.Module):
        def forward(self, q, k, v, bias):
            return flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + bias[h])

    with pytest.raises(Exception, match="captures .* not a constant"):
        flex.export(FromInput(), (*qkv(1, 2, 2, 4, 4), torch.randn(2)))

    class Erf(torch.nn.Module):  # torchlib writes erf as a call of its own function
        def forward(self, q, k, v):
            return flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + torch.erf(s))

    with pytest.raises(Exception, match="score_mod 'sdpa_score0': aten_special_erf node .* only standard ops"):
        flex.export(Erf(), qkv(1, 2, 2, 4, 4))


# ---- PagedAttention's score_mod from Python mods --------------------------------------------

def test_score_mod_graph_for_paged_attention(rng):
    inputs, attrs = random_batch(rng, batch=3, block_size=4, group=2, mode="mixed", max_len=20)
    heads = attrs["num_heads"]
    slopes = torch.as_tensor(sm.alibi_slopes(heads))

    def score_mod(s, b, h, q, kv):
        return 5.0 * torch.tanh(s / 5.0) + slopes[h] * (kv - q).float()

    graph = flex.score_mod_graph(score_mod, sliding(6), num_heads=heads)
    assert {n.op_type for n in graph.node} <= set(POINTWISE_OPS)
    model = single_node_model("PagedAttention", inputs, OUTPUTS, score_mod=graph, **{**attrs, "is_causal": 0})
    s = session(model)
    for name in ("key_cache", "value_cache"):
        s.set_cache(name, inputs[name].copy())
    out = s.run({k: v for k, v in inputs.items() if v is not None and k not in ("key_cache", "value_cache")})["output"]

    def both(s_, b, h, q, kv):
        return torch.where(sliding(6)(b, h, q, kv), score_mod(s_, b, h, q, kv), -float("inf"))

    want = torch_paged(inputs, both, **{**attrs, "is_causal": 0})
    np.testing.assert_allclose(out, want, rtol=TOL, atol=TOL)
