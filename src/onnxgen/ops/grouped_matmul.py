"""GroupedMatMul: each token multiplied by the k expert matrices it selects (onnx RFC 0010).

``output[m, j] = input[m] @ weights[group_indices[m, j]] (+ bias[group_indices[m, j]])``,
indices in ``[-G, G)`` following Gather.  The primitive under MoE.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto
from onnx.reference.op_run import OpRun

from . import _schema as S
from .domain import DOMAIN, DOMAIN_VERSION

NAME = "GroupedMatMul"

DOC = """\
Multiplies each of `M` token rows by the `k` weight matrices (groups, experts) it selects:
`output[m, j, :] = input[m, :] @ weights[group_indices[m, j]] + bias[group_indices[m, j]]`.
Indices lie in `[-G, G)`; negative ones count from the end, as in `Gather`. This is the
operator of the onnx RFC "GroupedMatMul" (proposal 0010), in the onnxgen.preview domain.
fp16/bf16 inputs accumulate in fp32."""

SCHEMA = S.Schema(
    NAME, DOMAIN, DOMAIN_VERSION, DOC,
    inputs=[
        S.param("input", "T", "Token rows `[M, K]`."),
        S.param("weights", "T", "Stack of G matrices `[G, K, N]`."),
        S.param("group_indices", "tensor(int64)", "Groups chosen per token `[M, k]`."),
        S.param("bias", "T", "Per-group bias `[G, N]`.", optional=True),
    ],
    outputs=[S.param("output", "T", "Per-group results `[M, k, N]`.")],
    type_constraints=[("T", S.FLOATS, "Float tensors.")],
)


def infer(ctx) -> None:
    c = S.Inference(ctx, NAME)
    x = c.rank(0, 2, "input")
    w = c.rank(1, 3, "weights")
    idx = c.rank(2, 2, "group_indices")
    bias = c.rank(3, 2, "bias") if c.has(3) else None
    if x and w and S.static(x[1]) and S.static(w[1]) and x[1] != w[1]:
        c.fail(f"input has K={x[1]} but weights have K={w[1]}")
    if x and idx and S.static(x[0]) and S.static(idx[0]) and x[0] != idx[0]:
        c.fail(f"input has M={x[0]} rows but group_indices has {idx[0]}")
    if bias and w:
        for got, want, what in ((bias[0], w[0], "G"), (bias[1], w[2], "N")):
            if S.static(got) and S.static(want) and got != want:
                c.fail(f"bias has {what}={got} but weights have {what}={want}")
    c.set_output(0, c.elem_type(0), [x and x[0], idx and idx[1], w and w[2]])


def grouped_matmul(input, weights, group_indices, bias=None):
    """The math, in numpy: ``[M, K] x [G, K, N] by [M, k] -> [M, k, N]``."""
    if input.ndim != 2 or weights.ndim != 3 or group_indices.ndim != 2:
        raise ValueError(
            f"GroupedMatMul: expected input [M, K], weights [G, K, N], group_indices [M, k]; got "
            f"{input.shape}, {weights.shape}, {group_indices.shape}"
        )
    groups = weights.shape[0]
    if input.shape[1] != weights.shape[1] or group_indices.shape[0] != input.shape[0]:
        raise ValueError(
            f"GroupedMatMul: shapes do not agree: input {input.shape}, weights {weights.shape}, "
            f"group_indices {group_indices.shape}"
        )
    if group_indices.size and (group_indices.min() < -groups or group_indices.max() >= groups):
        raise ValueError(f"GroupedMatMul: group_indices must lie in [-{groups}, {groups}); got "
                         f"values from {group_indices.min()} to {group_indices.max()}")
    x = input.astype(np.float32)
    chosen = weights[group_indices].astype(np.float32)  # [M, k, K, N]
    out = np.einsum("mc,mjcn->mjn", x, chosen)
    if bias is not None:
        out = out + bias[group_indices].astype(np.float32)
    return out.astype(input.dtype)


class GroupedMatMul(OpRun):
    op_domain = DOMAIN
    op_schema = SCHEMA

    def _run(self, input, weights, group_indices, bias=None):
        return (grouped_matmul(input, weights, group_indices, bias),)


def body(op, inputs, attrs):
    """Every group's product at once (one GEMM), then pick each token's k results.

    Computing all G groups costs G/k times the flops of the fused op but never materialises
    per-token weight copies (`[M*k, K, N]`), so the portable path stays within memory.
    """
    x, weights, indices, bias = (list(inputs) + [None])[:4]
    w = op.Transpose(weights, perm=[1, 0, 2])  # [K, G, N]
    shape_w = op.Shape(weights)
    groups_n = op.Mul(op.Gather(shape_w, op.ints(0)), op.Gather(shape_w, op.ints(2)))
    w = op.Reshape(w, op.Concat(op.Gather(shape_w, op.ints(1)), groups_n, axis=0))
    dtype = x.type.dtype if x.type is not None else None
    cast_to_float = dtype is not None and dtype.name != "FLOAT"
    if cast_to_float:  # accumulate fp16/bf16 in fp32, as the reference does
        x, w = op.Cast(x, to=TensorProto.FLOAT), op.Cast(w, to=TensorProto.FLOAT)
    every = op.MatMul(x, w)  # [M, G*N]
    every = op.Reshape(every, op.Concat(op.ints(0), op.Gather(shape_w, op.ints(0, 2)), axis=0))  # [M, G, N]
    out_shape = op.Concat(op.Shape(indices), op.Gather(shape_w, op.ints(2)), axis=0)  # [M, k, N]
    picks = op.Expand(op.Unsqueeze(indices, op.ints(-1)), out_shape)
    out = op.GatherElements(every, picks, axis=1)
    if bias is not None:
        b = op.Cast(bias, to=TensorProto.FLOAT) if cast_to_float else bias
        out = op.Add(out, op.Gather(b, indices, axis=0))
    if cast_to_float:
        out = op.Cast(out, to=dtype.value)
    return [out]


EXAMPLE = '''\
import numpy as np
import onnxgen
from onnxgen.testing import single_node_model, run_reference, run_expanded_on_ort

rng = np.random.default_rng(0)
inputs = {
    "input": rng.standard_normal((4, 8)).astype(np.float32),           # M=4 tokens, K=8
    "weights": rng.standard_normal((3, 8, 5)).astype(np.float32),      # G=3 groups, N=5
    "group_indices": np.array([[0, 2], [1, 1], [2, 0], [0, 1]]),       # k=2 per token
    "bias": rng.standard_normal((3, 5)).astype(np.float32),
}
model = single_node_model("GroupedMatMul", inputs, ["output"])
(out,) = run_reference(model, inputs)                 # onnx.reference with onnxgen's ops
(ort_out,) = run_expanded_on_ort(model, inputs)       # standard ops on stock onnxruntime
assert out.shape == (4, 2, 5) and np.allclose(out, ort_out, atol=1e-5)
'''
