"""fuse_attention: exported scaled-dot-product attention -> the standard ONNX ``Attention`` (opset 23).

torch.onnx (opset < 23) writes ``F.scaled_dot_product_attention`` and transformers' eager attention as

    scores = MatMul(q [* sq], kᵀ [* sk]) [* s]     q [B, H, S, D]; kᵀ = Transpose(k, [0,1,3,2]) of k [B, H, L, D]
                                                    or Transpose(k, [0,2,3,1]) of k [B, L, H, D]
    scores = scores [+ mask]
    out    = MatMul(Softmax(scores, axis=-1), v)    v [B, H, L, Dv]

(diffusers' UNet and VAE scale q and kᵀ each by ``Sqrt(1 / Sqrt(head_size))``, computed from q's
shape; CLIP's text encoder scales them by constants and adds a causal mask).  The dynamo
exporter writes kᵀ as ``Reshape(Transpose(Reshape(k, [-1, L, D]), [0, 2, 1]), [B, H, D, L])``,
matched when shape inference shows those reshape shapes; its masked attention (CLIP) guards the
softmax with ``Where(IsNaN(p), 0, p)``, which is not matched: a fully masked row gives 0 there and
NaN from ``Attention``.  Each match becomes one ``Attention`` node:

- scale: constant scale factors are folded into the ``scale`` attribute; the diffusers form
  ``Sqrt(1/Sqrt(Shape(q)[-1]))`` on both sides is the op's default ``1/sqrt(head_size)`` and
  leaves no attribute; any other scalar factor stays a Mul/Div on q or k in front of the node
  (``scale`` 1.0 then), which is the same arithmetic as before.
- mask: an added float mask becomes ``attn_mask`` (the op adds it to the scaled scores, as the
  graph did) when its shape provably broadcasts as ``[.., S, L]``: its last two dims are q's and
  k's sequence dims and the others 1 or equal to batch/heads.  Otherwise the attention is left
  as it is (and the reason logged).  The mask's values are not inspected, so a causal mask is
  passed as a mask, not turned into ``is_causal``.
- layout: when q, k and v are each ``Transpose([0,2,1,3])`` of a ``[B, S, H, D]`` tensor (or k the
  ``[0,2,3,1]`` one) with H known, the node takes the 3-D form ``[B, S, H*D]`` (``q_num_heads``,
  ``kv_num_heads``; reshapes of those tensors, which cost nothing on onnxruntime) and its output
  is reshaped back, so the transposes on both sides disappear; otherwise the 4-D form.
- shapes: batch and heads of q, k and v must provably agree (MatMul would broadcast them,
  Attention does not), else the match is refused.  Shapes come from ONNX shape inference, with
  the heads of a ``Reshape(x [B, S, E], [B, S, -1, D])`` worked out as ``E / D``.

When anything was fused, the model's default opset is raised to 23 with onnxscript's version
converter, transposes that now cancel are dropped, and so are Identity nodes and dead code.
The number of fused nodes is in the model's metadata (``onnxgen.fused_attention``) and the log
(logger ``onnxgen.passes.fuse_attention``).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter.rules import common as common_rules

ATTENTION_OPSET = 23
METADATA_KEY = "onnxgen.fused_attention"
logger = logging.getLogger(__name__)


class _Plan:
    """What check() worked out for rewrite()."""

    def __init__(self):
        self.attrs: dict = {}
        self.q_ops: list[tuple[str, ir.Value]] = []  # Mul/Div kept in front of the node
        self.k_ops: list[tuple[str, ir.Value]] = []
        self.sources: tuple[ir.Value, ir.Value, ir.Value] | None = None  # [B, S, H, D] q, k, v for the 3-D form
        self.heads: int | None = None


class ScaledDotProductAttention(pattern.RewriteRuleClassBase):
    """softmax(q·kᵀ·scale [+ mask])·v over 4-D q, k, v (module doc) -> ``Attention``."""

    def __init__(self, name: str, failures: list[str], three_d: bool):
        super().__init__(name)
        self.failures, self.three_d = failures, three_d

    def pattern(self, op, q, k, v, q_scale, k_scale, qk_scale, mask):
        q = pattern.OrValue([op.Mul(q, q_scale), op.Div(q, q_scale), q], tag_var="q_scaling",
                            tag_values=["Mul", "Div", None])
        k_t = pattern.OrValue([op.Transpose(k, perm=[0, 1, 3, 2]), op.Transpose(k, perm=[0, 2, 3, 1]),
                               op.Reshape(op.Transpose(op.Reshape(k, pattern.ANY_VALUE), perm=[0, 2, 1]),
                                          pattern.ANY_VALUE)],
                              tag_var="key_layout", tag_values=["BHLD", "BLHD", "BHLD-3d"])
        k_t = pattern.OrValue([op.Mul(k_t, k_scale), op.Div(k_t, k_scale), k_t], tag_var="k_scaling",
                              tag_values=["Mul", "Div", None])
        scores = op.MatMul(q, k_t)
        scores = pattern.OrValue([op.Mul(scores, qk_scale), op.Div(scores, qk_scale), scores],
                                 tag_var="qk_scaling", tag_values=["Mul", "Div", None])
        scores = pattern.OrValue([op.Add(scores, mask), scores], tag_var="masked", tag_values=[True, False])
        return op.MatMul(op.Softmax(scores, _allow_other_attributes=True), v)

    def _fail(self, result: pattern.MatchResult, reason: str, *where) -> pattern.MatchResult:
        self.failures.append(reason)
        return result.fail(reason, *where)

    def check(self, context, q, k, v, mask=None, key_layout="BHLD", masked=False, **bindings):
        result = pattern.MatchResult()
        softmax = next(n for n in context.nodes if n.op_type == "Softmax")
        axis = softmax.attributes["axis"].as_int() if "axis" in softmax.attributes else -1
        if axis not in (-1, 3):
            return self._fail(result, f"Softmax over axis {axis}, not the last", softmax.outputs[0])
        qd, vd = _dims(q), _dims(v)
        kd = _dims(k)
        if qd is None or kd is None or vd is None:
            return self._fail(result, "q, k or v is not known to be 4-D (shape inference gave no rank 4)", q)
        if key_layout == "BLHD":
            kd = [kd[0], kd[2], kd[1], kd[3]]
        elif key_layout == "BHLD-3d":  # dynamo: kᵀ through [X, L, D] -> [X, D, L] -> [B, H, D, L]
            failure = _three_d_round_trip_failure(context, k, kd)
            if failure:
                return self._fail(result, failure, k)
            key_layout = "BHLD"
        if q.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE):
            return self._fail(result, f"q of type {q.dtype}", q)
        # MatMul broadcasts batch and heads; Attention wants them equal (a single shared kv head is GQA's
        # kv_num_heads 1, the same thing).
        if not (_same(qd[0], kd[0]) and _same(kd[0], vd[0])):
            return self._fail(result, f"cannot tell that q, k and v have the same batch ({qd[0]}, {kd[0]}, {vd[0]})")
        if not (_same(kd[1], vd[1]) and (_same(qd[1], kd[1]) or kd[1] == 1)):
            return self._fail(result, f"cannot tell that q, k and v have the same heads ({qd[1]}, {kd[1]}, {vd[1]})")

        plan = _Plan()
        failure = self._scale(plan, q, bindings)
        if failure:
            return self._fail(result, failure)
        if masked:
            failure = _mask_failure(mask, q.dtype, [qd[0], qd[1], qd[2], kd[2]])
            if failure:
                return self._fail(result, failure, mask)
        if self.three_d:
            plan.sources, plan.heads = _three_d_sources(q, k, v, key_layout)
        self._plan = plan
        return result

    def _scale(self, plan: _Plan, q: ir.Value, bindings: dict) -> str | None:
        """Fill plan.attrs["scale"] and plan.q_ops/k_ops; a reason when the scaling is not usable."""
        kinds = {name: (bindings.get(f"{name}_scaling"), bindings.get(f"{name}_scale")) for name in ("q", "k", "qk")}
        (q_kind, q_scale), (k_kind, k_scale), qk_kind = kinds["q"], kinds["k"], kinds["qk"][0]
        if (q_kind == "Mul" and k_kind == "Mul" and qk_kind is None
                and _default_scale_root(q_scale, q) is not None
                and _default_scale_root(q_scale, q) is _default_scale_root(k_scale, q)):
            return None  # Sqrt(1/sqrt(D)) on both sides: the op's default scale
        scale = 1.0
        for name, (kind, value) in kinds.items():
            if kind is None:
                continue
            c = _scalar(value)
            if c is not None:
                scale *= c if kind == "Mul" else 1.0 / c
            elif name == "qk":
                return "a scale on the scores that is not a constant scalar"
            elif not _is_scalar_shaped(value):
                return f"the {name} scale is not a scalar"
            else:
                (plan.q_ops if name == "q" else plan.k_ops).append((kind, value))
        plan.attrs["scale"] = float(scale)
        return None

    def rewrite(self, op, q, k, v, mask=None, key_layout="BHLD", masked=False, **_):
        plan = self._plan
        attrs = dict(plan.attrs)
        if plan.sources is not None:
            flat = op.Constant(value=ir.tensor(np.array([0, 0, -1], np.int64)))
            q_in, k_in, v_in = (op.Reshape(x, flat) for x in plan.sources)
            attrs["q_num_heads"], attrs["kv_num_heads"] = plan.heads
        else:
            q_in, k_in, v_in = q, (op.Transpose(k, perm=[0, 2, 1, 3]) if key_layout == "BLHD" else k), v
        for kind, value in plan.q_ops:
            q_in = getattr(op, kind)(q_in, value)
        for kind, value in plan.k_ops:
            k_in = getattr(op, kind)(k_in, value)
        inputs = [q_in, k_in, v_in] + ([mask] if masked else [])
        out = op.Attention(*inputs, **attrs)  # opset 23: the model is converted after the rewrite
        if plan.sources is not None:  # [B, S, H*Dv] -> [B, H, S, Dv] as the graph had it
            split = op.Constant(value=ir.tensor(np.array([0, 0, plan.heads[0], -1], np.int64)))
            out = op.Transpose(op.Reshape(out, split), perm=[0, 2, 1, 3])
        return out


# ---- shapes ----------------------------------------------------------------------------------

def _dim(d) -> int | str | None:
    if isinstance(d, int):
        return d
    return d.value if isinstance(d, ir.SymbolicDim) else None


def _dims(value: ir.Value, depth: int = 0) -> list | None:
    """Rank-4 dims of ``value`` (int, symbol name or None), refined through Mul/Div by a scalar,
    Transpose, and a Reshape that splits a known last axis (``[B, S, E] -> [B, S, -1, D]``)."""
    shape = value.shape
    dims = [_dim(d) for d in shape] if shape is not None else None
    if dims is not None and len(dims) != 4:
        return None
    node = value.producer()
    if depth > 8 or node is None or (dims is not None and all(isinstance(d, int) for d in dims)):
        return dims
    source = None
    if node.op_type in ("Mul", "Div") and node.inputs[0] is not None and _is_scalar_shaped(node.inputs[1]):
        source = _dims(node.inputs[0], depth + 1)
    elif node.op_type == "Transpose" and "perm" in node.attributes:
        inner = _dims(node.inputs[0], depth + 1)
        if inner is not None:
            source = [inner[p] for p in node.attributes["perm"].as_ints()]
    elif node.op_type == "Reshape" and dims is not None:
        source = _reshape_dims(node.inputs[0], dims)
    if dims is None:
        return source
    if source is not None:
        dims = [d if isinstance(d, int) or s is None else (s if isinstance(s, int) or d is None else d)
                for d, s in zip(dims, source)]
    return dims


def _reshape_dims(x: ir.Value, out: list) -> list | None:
    """A Reshape's one unknown output dim (None, or a symbol the input lacks) from the element
    count, when the input's symbolic dims cancel against the output's and the rest are static."""
    if x.shape is None:
        return None
    left = [_dim(d) for d in x.shape]
    if any(d is None for d in left):
        return None
    unknown, right = [], []
    for i, d in enumerate(out):
        if isinstance(d, str) and d in left:
            left.remove(d)
        elif isinstance(d, int):
            right.append(d)
        else:
            unknown.append(i)
    if len(unknown) != 1 or any(isinstance(d, str) for d in left):
        return None
    numerator, denominator = math.prod(left), math.prod(right)
    if denominator == 0 or numerator % denominator:
        return None
    return [numerator // denominator if i == unknown[0] else d for i, d in enumerate(out)]


def _same(a, b) -> bool:
    return a is not None and a == b


def _is_scalar_shaped(value: ir.Value | None) -> bool:
    if value is None or value.shape is None:
        return False
    return value.shape.rank() <= 1 and all(_dim(d) == 1 for d in value.shape)


def _scalar(value: ir.Value | None) -> float | None:
    array = _ir_utils.get_numpy_value(value)
    if array is None or array.size != 1 or array.ndim > 4:
        return None
    return float(array.reshape(()))


def _mask_failure(mask: ir.Value, dtype, scores: list) -> str | None:
    """None when ``mask`` can be Attention's attn_mask for scores [B, H, S, L]; else the reason."""
    if mask.dtype != dtype:
        return f"a mask of type {mask.dtype} added to {dtype} scores"
    if mask.shape is None or mask.shape.rank() < 2 or mask.shape.rank() > 4:
        return "an added mask of unknown rank, or of rank below 2 or above 4"
    dims = [_dim(d) for d in mask.shape]
    if not (_same(dims[-1], scores[3]) and _same(dims[-2], scores[2])):
        return (f"an added mask of shape {dims} whose last two dims are not provably the scores' "
                f"[{scores[2]}, {scores[3]}]")
    for d, s in zip(dims[:-2][::-1], [scores[1], scores[0]]):
        if d != 1 and not _same(d, s):
            return f"an added mask of shape {dims} that does not broadcast over batch and heads as {scores}"
    return None


def _strip_casts(value: ir.Value | None) -> ir.Value | None:
    while value is not None and value.producer() is not None and value.producer().op_type in ("Cast", "Identity"):
        value = value.producer().inputs[0]
    return value


def _default_scale_root(scale: ir.Value | None, q: ir.Value) -> ir.Value | None:
    """For ``scale = Sqrt(x)`` with ``x = 1 / Sqrt(q's last dim)`` computed from q's shape: x."""
    node = _strip_casts(scale).producer() if scale is not None else None
    if node is None or node.op_type != "Sqrt":
        return None
    root = _strip_casts(node.inputs[0])
    div = root.producer()
    if div is None:
        return None
    if div.op_type == "Div" and _scalar(div.inputs[0]) == 1.0:
        denominator = div.inputs[1]
    elif div.op_type == "Reciprocal":
        denominator = div.inputs[0]
    else:
        return None
    sqrt = _strip_casts(denominator).producer()
    if sqrt is None or sqrt.op_type != "Sqrt" or not _is_last_dim_of(_strip_casts(sqrt.inputs[0]), q):
        return None
    return root


def _is_last_dim_of(value: ir.Value, q: ir.Value) -> bool:
    node = value.producer()
    if node is None:
        return False
    if node.op_type == "Shape":
        start = node.attributes["start"].as_int() if "start" in node.attributes else 0
        return node.inputs[0] is q and start == -1 and "end" not in node.attributes
    if node.op_type == "Slice":
        shape = node.inputs[0].producer() if node.inputs[0] is not None else None
        if shape is None or shape.op_type != "Shape" or shape.inputs[0] is not q or shape.attributes:
            return False
        starts, ends = _ir_utils.get_numpy_value(node.inputs[1]), _ir_utils.get_numpy_value(node.inputs[2])
        extra = [_ir_utils.get_numpy_value(x) if x is not None else None for x in node.inputs[3:]]
        axes_ok = len(extra) < 1 or extra[0] is None or extra[0].tolist() in ([0], [-1])
        steps_ok = len(extra) < 2 or extra[1] is None or extra[1].tolist() == [1]
        return (starts is not None and ends is not None and starts.tolist() == [-1] and ends.size == 1
                and int(ends.reshape(())) >= 4 and axes_ok and steps_ok)
    if node.op_type == "Gather":
        shape = node.inputs[0].producer()
        index = _ir_utils.get_numpy_value(node.inputs[1])
        return (shape is not None and shape.op_type == "Shape" and shape.inputs[0] is q and not shape.attributes
                and index is not None and index.size == 1 and int(index.reshape(())) in (-1, 3))
    return False


def _three_d_round_trip_failure(context, k: ir.Value, kd: list) -> str | None:
    """None when Reshape(Transpose(Reshape(k, .), [0, 2, 1]), .) provably is k [B, H, L, D] transposed
    to [B, H, D, L]: the first reshape keeps [L, D] last, the second gives [B, H, D, L]."""
    first = next((n for n in context.nodes if n.op_type == "Reshape" and n.inputs[0] is k), None)
    transpose = next(iter(first.outputs[0].uses())).node if first is not None else None
    second = next(iter(transpose.outputs[0].uses())).node if transpose is not None else None
    if second is None or second.op_type != "Reshape":
        return "kᵀ through reshapes that were not found"
    flat, back = first.outputs[0].shape, second.outputs[0].shape
    if flat is None or back is None or flat.rank() != 3 or back.rank() != 4:
        return "kᵀ through reshapes of unknown rank"
    flat, back = [_dim(d) for d in flat], [_dim(d) for d in back]
    if not (_same(flat[1], kd[2]) and _same(flat[2], kd[3])
            and all(_same(a, b) for a, b in zip(back, [kd[0], kd[1], kd[3], kd[2]]))):
        return f"kᵀ through reshapes to {flat} and {back}, not provably k {kd} transposed"
    return None


def _three_d_sources(q, k, v, key_layout):
    """The [B, S, H, D] tensors under q, k and v and (q heads, kv heads), or (None, None)."""
    def under(x):  # x = Transpose(s, [0, 2, 1, 3])
        node = x.producer()
        if (node is None or node.op_type != "Transpose" or "perm" not in node.attributes
                or list(node.attributes["perm"].as_ints()) != [0, 2, 1, 3]):
            return None
        return node.inputs[0]

    sq, sv = under(q), under(v)
    sk = k if key_layout == "BLHD" else under(k)  # (BHLD-3d: k is BHLD)
    if sq is None or sk is None or sv is None:
        return None, None
    dq, dk, dv = _dims(sq), _dims(sk), _dims(sv)
    if dq is None or dk is None or dv is None:
        return None, None
    heads, kv_heads = dq[2], dk[2]
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or dv[2] != kv_heads:
        return None, None
    return (sq, sk, sv), (heads, kv_heads)


# ---- the pass --------------------------------------------------------------------------------

def fuse_attention(model: onnx.ModelProto | ir.Model, *, three_d: bool = True,
                   verbose: bool = False) -> onnx.ModelProto:
    """Replace each unmasked or additively masked scaled-dot-product attention (module doc) with
    one ``Attention`` node (opset 23) and raise the model's opset to 23 if any was fused.

    ``three_d`` allows the 3-D form where the layout permits (the default: it drops the
    transposes); ``False`` always writes the 4-D form.  A model without a match is returned
    unchanged apart from the metadata entry ``onnxgen.fused_attention`` (the count, 0).
    """
    m = model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)
    # Shape inference for the checks only: the result keeps the source's annotations (inferred
    # shapes of replaced values would be stale, and onnxruntime infers its own).
    annotated = [*m.graph.inputs, *(v for n in ir.traversal.RecursiveGraphIterator(m.graph) for v in n.outputs)]
    saved = {v: (v.type, v.shape) for v in annotated}
    saved_outputs = [(v.type, v.shape) for v in m.graph.outputs]  # by position: a rewrite may replace one
    common_passes.ShapeInferencePass(strict_mode=False, data_prop=True)(m)
    failures: list[str] = []
    rules = pattern.RewriteRuleSet([ScaledDotProductAttention.rule("Attention", failures, three_d=three_d)])
    count = rules.apply_to_model(m, verbose=2 if verbose else None)
    for node in ir.traversal.RecursiveGraphIterator(m.graph):
        for v in node.outputs:
            v.type, v.shape = saved.get(v, (None, None))
    for v in m.graph.inputs:
        v.type, v.shape = saved[v]
    for v, (type_, shape) in zip(m.graph.outputs, saved_outputs):
        v.type, v.shape = type_, shape
    softmaxes = sum(1 for n in ir.traversal.RecursiveGraphIterator(m.graph) if n.op_type == "Softmax")
    if count:
        opset = m.opset_imports.get("", m.opset_imports.get("ai.onnx", 1))
        if opset < ATTENTION_OPSET:
            from onnxscript.version_converter import convert_version

            convert_version(m, ATTENTION_OPSET)
        # The 3-D form's output transpose meets the graph's own one back to [B, S, H, D].
        pattern.RewriteRuleSet([common_rules.transpose_transpose_rule,
                                common_rules.no_op_transpose_rule]).apply_to_model(m)
        common_passes.IdentityEliminationPass()(m)
        common_passes.RemoveUnusedNodesPass()(m)
    (logger.info if count or not softmaxes else logger.warning)(
        "fuse_attention: %d Attention node(s); %d other Softmax node(s)%s", count, softmaxes,
        (": " + "; ".join(sorted(set(failures)))) if softmaxes and failures else "")
    m.metadata_props[METADATA_KEY] = str(count)
    return ir.serde.serialize_model(m)
