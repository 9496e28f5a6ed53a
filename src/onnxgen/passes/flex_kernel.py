"""flex_kernel: non-paged ``ai.onnx.preview.FlexAttention`` -> onnxgen's PagedAttention kernel.

onnxruntime cannot run FlexAttention, and its expansion materialises the ``[B, H, L, S]``
scores and every index tensor of the ``score_mod`` graph.  Where the node's whole-tensor
``score_mod`` is recognisably pointwise in ``(b, h, q_idx, kv_idx)``
(``score_mods.pointwise_of``: index tensors from Shape/Range/Unsqueeze, as
``score_mods.flex_score_mod`` and ``onnxgen.export.flex`` write them) and compiles to a score
program (``passes.compile_score_mod``), the node becomes one PagedAttention run by the kernel:

- queries ``[B, Hq, L, D]`` reshaped (not transposed) to ``[B*L, Hq*D]``, ``B`` sequences of
  ``L`` rows each, with the kernel's private ``heads_first=1``: it reads them, and writes the
  output, in the ``[B, H, L, ·]`` memory order;
- ``K``/``V`` ``[B, Hkv, S, D]`` as they are: a heads-first cache of one block of ``S``
  positions per sequence (block table ``[[0], [1], …]``, ``past_seqlens = S``), read in place;
- the kernel's private ``cache_only=1``: caches heads first, attention over the cache only,
  query positions from 0 (``q_pos = q_idx``), no new keys, nothing written;
- ``score_program``/``score_constants`` from the pointwise graph, ``is_causal=0`` unless the
  graph's last op is ``Where(keep, x, -inf)`` with ``kv <= q`` among ``keep``'s conjuncts
  (then ``is_causal=1``; ``kv >= q - W`` gives ``local_window_size=W``: the kernel skips the
  blocks they hide); where those are all the conjuncts the program computes only x, and none
  is needed for a plain mask (``compile_score_mod.kernel_program``);
- the output: the kernel's own, ``[B, Hq, L, Dv]`` (``heads_first``).

Other nodes (a ``prob_mod``, a non-pointwise ``score_mod``, an op without bytecode, double
precision, head counts or sizes unknown at session creation) are left for the expansion; an op
without bytecode is named in a warning.  One difference: a row that the score_mod masks
completely gives 0 here (as PyTorch's flex_attention) where onnx's softmax gives NaN.

This is a session-time rewrite for onnxgen's kernel library (``cache_only`` is not part of
PagedAttention's schema); ``onnxgen.backends.ort.session`` runs it.  It is two halves:
``plan_rewrite`` (shape inference's sizes, the masks, the compiled program: a ``FlexPlan`` of
plain numbers) and ``emit_rewrite`` (the nodes, from the node and its plan alone), so that
``onnxgen.context`` can store plans in an onnxgen-kernels blob and emit them at load without
shape inference or compilation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ops.domain import DOMAIN
from ..ops.score_mods import pointwise_of
from .compile_score_mod import CONSTANTS_ATTR, PROGRAM_ATTR, CompiledScore, Unsupported, implied_masks, kernel_program

FLEX_DOMAIN = "ai.onnx.preview"
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _static_dims(value: onnx.ValueInfoProto | None) -> list[int | None] | None:
    if value is None or not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


class _Writer:
    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.initializers, self.count = prefix, [], [], 0

    def name(self, hint):
        self.count += 1
        return f"{self.prefix}/{hint}_{self.count}"

    def op(self, op_type, *inputs, outputs=None, domain="", **attrs):
        outputs = outputs or [self.name(op_type.lower())]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=self.name(op_type), domain=domain,
                                           **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def const(self, array):
        name = self.name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name


def flex_to_kernel(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` with each FlexAttention node that the kernel can run rewritten
    to PagedAttention (see the module doc); the others are kept as they are."""
    flex = [n for n in model.graph.node if n.domain == FLEX_DOMAIN and n.op_type == "FlexAttention"]
    if not flex:
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - without shapes nothing is rewritten
        return model
    infos = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    rewritten = 0
    for index, node in enumerate(out.graph.node):
        plan = None
        if node.domain == FLEX_DOMAIN and node.op_type == "FlexAttention":
            plan = plan_rewrite(node, infos)
        if plan is None:
            nodes.append(node)
            continue
        new_nodes, initializers = emit_rewrite(node, plan, f"flex_kernel_{index}")
        nodes.extend(new_nodes)
        out.graph.initializer.extend(initializers)
        rewritten += 1
    if rewritten:
        del out.graph.node[:]
        out.graph.node.extend(nodes)
        if not any(o.domain == DOMAIN for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return out


@dataclass
class FlexPlan:
    """What the rewrite of one FlexAttention node needs beyond the node itself: the static sizes
    read from shape inference, the masks and the compiled score program.  Plain numbers, so a
    plan can be stored (``onnxgen.context``'s onnxgen-kernels blobs) and emitted later without
    shape inference or compilation."""

    num_heads: int
    head_size: int
    kv_num_heads: int
    v_head_size: int
    elem_type: int
    is_causal: int = 0
    local_window_size: int = -1
    program: CompiledScore | None = None


def static_sizes(node: onnx.NodeProto, infos) -> tuple[int, int, int, int, int] | None:
    """``(elem_type, num_heads, head_size, kv_num_heads, v_head_size)`` of a FlexAttention node
    from the value infos of its inputs, or None when they are not all known and usable."""
    q_info, k_info, v_info = (infos.get(x) for x in node.input)
    types = {i.type.tensor_type.elem_type for i in (q_info, k_info, v_info) if i is not None}
    if len(types) != 1:
        return None
    elem_type = types.pop()
    if elem_type not in _FLOATS:
        return None
    q_dims, k_dims, v_dims = _static_dims(q_info), _static_dims(k_info), _static_dims(v_info)
    if not q_dims or not k_dims or not v_dims or not (len(q_dims) == len(k_dims) == len(v_dims) == 4):
        return None
    heads, head_size, kv_heads, v_head_size = q_dims[1], q_dims[3], k_dims[1], v_dims[3]
    if None in (heads, head_size, kv_heads, v_head_size) or kv_heads == 0 or heads % kv_heads:
        return None
    return elem_type, heads, head_size, kv_heads, v_head_size


def rewritable(node: onnx.NodeProto) -> bool:
    """The node-level conditions of the rewrite (shapes and score_mod aside)."""
    attrs = {a.name: a for a in node.attribute}
    if "prob_mod" in attrs or len(node.input) != 3 or not all(node.input) or len(node.output) != 1:
        return False
    return "softmax_precision" not in attrs or attrs["softmax_precision"].i == TensorProto.FLOAT


def plan_rewrite(node: onnx.NodeProto, infos, *, stacklevel: int = 4) -> FlexPlan | None:
    """The plan for rewriting ``node`` onto the kernel, or None where it is left for the expansion
    (warning where the score_mod has an op without bytecode)."""
    label = f"FlexAttention node {node.name or node.output[0]!r}"
    if not rewritable(node):
        return None
    sizes = static_sizes(node, infos)
    if sizes is None:
        return None
    elem_type, heads, head_size, kv_heads, v_head_size = sizes
    attrs = {a.name: a for a in node.attribute}
    plan = FlexPlan(heads, head_size, kv_heads, v_head_size, elem_type)
    if "score_mod" in attrs:
        pointwise, _ = pointwise_of(attrs["score_mod"].g)
        if pointwise is None:
            return None
        try:
            plan.program = kernel_program(pointwise, label)
        except Unsupported as reason:
            warnings.warn(f"{label}: score_mod uses {reason}, which onnxgen's kernel cannot run compiled; "
                          "this node runs expanded (slow)", stacklevel=stacklevel)
            return None
        masks = implied_masks(pointwise)
        plan.is_causal, plan.local_window_size = int(masks.causal), masks.window
    return plan


def emit_rewrite(node: onnx.NodeProto, plan: FlexPlan, prefix: str) -> tuple[list[onnx.NodeProto],
                                                                          list[onnx.TensorProto]]:
    """The nodes (and constants) that replace ``node``: every new value is named under ``prefix``,
    the last node makes the node's output."""
    attrs = {a.name: a for a in node.attribute}
    heads, head_size, kv_heads, v_head_size = plan.num_heads, plan.head_size, plan.kv_num_heads, plan.v_head_size
    q, k, v = node.input
    dtype = helper.tensor_dtype_to_np_dtype(plan.elem_type)
    w = _Writer(prefix)
    i64 = lambda x: w.const(np.asarray(x, np.int64))  # noqa: E731
    q_shape, k_shape = w.op("Shape", q), w.op("Shape", k)
    batch = w.op("Slice", q_shape, i64([0]), i64([1]))    # [1]
    length = w.op("Slice", q_shape, i64([2]), i64([3]))   # [1]
    past = w.op("Slice", k_shape, i64([2]), i64([3]))     # [1]
    batch_scalar = w.op("Squeeze", batch, i64([0]))
    # heads_first: the kernel reads the queries in FlexAttention's [B, H, L, D] memory order
    # under the 2-D shape PagedAttention takes, and writes the [B, H, L, Dv] output: no copies.
    queries = w.op("Reshape", q, i64([-1, heads * head_size]))
    no_key = w.const(np.zeros((0, kv_heads * head_size), dtype))
    no_value = w.const(np.zeros((0, kv_heads * v_head_size), dtype))
    zero, one = i64(0), i64(1)
    cu = w.op("Cast", w.op("Mul", w.op("Range", zero, w.op("Add", batch_scalar, one), one), length), to=TensorProto.INT32)
    past_seqlens = w.op("Cast", w.op("Expand", past, batch), to=TensorProto.INT32)
    table = w.op("Cast", w.op("Unsqueeze", w.op("Range", zero, batch_scalar, one), i64([1])), to=TensorProto.INT32)
    paged_attrs = dict(num_heads=heads, kv_num_heads=kv_heads, is_causal=int(plan.is_causal),
                       local_window_size=plan.local_window_size,
                       cache_only=1, heads_first=1)
    if "scale" in attrs:
        paged_attrs["scale"] = attrs["scale"].f
    if plan.program is not None:
        paged_attrs[PROGRAM_ATTR] = plan.program.program.tolist()
        if plan.program.constants.size:
            paged_attrs[CONSTANTS_ATTR] = plan.program.constants.tolist()
    w.op("PagedAttention", queries, no_key, no_value, k, v, cu, past_seqlens, table,
         outputs=[node.output[0], w.name("key_cache_unused"), w.name("value_cache_unused")], domain=DOMAIN,
         **paged_attrs)
    return w.nodes, w.initializers
