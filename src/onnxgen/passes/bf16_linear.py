"""bf16_linear: linear layers with bf16 weights -> onnxgen's GroupedMatMul kernel (AMX tiles).

A model exported with ``--dtype bfloat16`` computes each linear layer as
``MatMul(X, Cast(W_bf16, to=FLOAT))``; onnxruntime folds the Cast at load, so the layer runs
as an fp32 GEMM over weights twice the size (MLAS has no bf16 GEMM on x86).  This pass rewrites
each such layer (``W`` a 2-D bf16 initializer) into one node,

    GroupedMatMul(X, W)        (onnxgen.preview, no group_indices: the kernel's dense form)

which the kernel library runs on the tile unit of an AMX CPU: ``W`` packed once into the tile
layout when the session is created, ``X``'s rows rounded to bf16, products summed in fp32, the
output fp32.  It is bf16 *compute*: each linear layer's input is rounded to bf16, as OpenVINO's
bf16 inference precision does.  Without AMX the kernel widens the weights as it goes (correct,
and no faster than MLAS), so the sessions of onnxgen's kernels (``onnxgen.backends.ort.session``
and ``onnxgen.context.load``'s onnxruntime steps) run this pass only where the CPU has AMX, unless
told otherwise (``bf16_compute``): ``bf16_linear_for_session`` is that one decision.

The dense form (a GroupedMatMul node with two inputs, weights ``[K, N]`` of another float type
than the input, output ``[..., N]``) is private to this session-time rewrite, as
``cache_only`` is to ``passes.flex_kernel``: it is never written to a model file.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..ops.domain import DOMAIN


def bf16_linear(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose bf16-weight linear layers run on GroupedMatMul (see the module doc),
    or ``model`` itself when it has none."""
    bf16 = {t.name for t in model.graph.initializer if t.data_type == TensorProto.BFLOAT16 and len(t.dims) == 2}
    widened = {n.output[0]: n.input[0] for n in model.graph.node
               if n.op_type == "Cast" and n.input[0] in bf16
               and helper.get_attribute_value(n.attribute[0]) == TensorProto.FLOAT}
    if not any(n.op_type == "MatMul" and n.domain == "" and n.input[1] in widened for n in model.graph.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        if node.op_type == "MatMul" and node.domain == "" and node.input[1] in widened:
            node = helper.make_node("GroupedMatMul", [node.input[0], widened[node.input[1]]], list(node.output),
                                    domain=DOMAIN, name=f"bf16_linear/{node.name or node.output[0]}")
        nodes.append(node)
    # The Casts that fed only rewritten layers go (onnxruntime would keep fp32 copies of the weights).
    read = {name for n in nodes for name in n.input} | {o.name for o in out.graph.output}
    nodes = [n for n in nodes if not (n.op_type == "Cast" and n.output[0] in widened and n.output[0] not in read)]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return out


def bf16_linear_for_session(model: onnx.ModelProto, bf16_compute: bool | None = None) -> onnx.ModelProto:
    """``bf16_linear(model)`` where a session of onnxgen's kernels should compute in bf16, else
    ``model``: ``bf16_compute`` True or False as told; None (the default) where the CPU has AMX,
    the only place the kernel's bf16 path is faster than onnxruntime's fp32 GEMM."""
    from .. import kernels

    wanted = kernels.has_amx() if bf16_compute is None else bf16_compute
    return bf16_linear(model) if wanted else model
