"""Ready score mods: the graphs for PagedAttention's ``score_mod`` (and FlexAttention's).

Each builder returns a pointwise ONNX graph ``(score, batch, head, q_pos, kv_pos) -> score``
(float32 score, int32 indices; see PagedAttention's doc) that PyTorch's ``flex_attention`` would
write as a ``score_mod`` Python function, masks included (−inf).  ``compose`` chains mods,
and ``flex_score_mod`` turns one into the whole-tensor ``score_mod`` of
``ai.onnx.preview.FlexAttention`` (index tensors from Shape/Range, positions from 0), and
``pointwise_of`` recovers the pointwise mod from such a graph (onnxgen's session then runs the
node on the compiled kernel).  ``onnxgen.export.flex`` writes these graphs from PyTorch
``flex_attention`` calls (score_mod functions, BlockMask mask_mods)::

    from onnxgen.ops import score_mods as sm
    mod = sm.compose(sm.softcap(30.0), sm.sliding_window(4096))    # Gemma 2's local layers
    node = helper.make_node("PagedAttention", ..., domain="onnxgen.preview", score_mod=mod,
                            is_causal=0, num_heads=8, kv_num_heads=4)

| builder | PyTorch `score_mod` it equals |
|---|---|
| `causal()` | `where(kv <= q, s, -inf)` |
| `sliding_window(W, causal=True)` | `where((q - W <= kv) & (kv <= q), s, -inf)` |
| `softcap(c)` | `c * tanh(s / c)` |
| `alibi(slopes)` | `s + slopes[h] * (kv - q)` |
| `relative_position_bias(table, M)` | `s + table[h, clamp(kv - q, -M, M) + M]` |
| `prefix_lm(P, causal=True)` | `where((kv < P[b]) \\| (kv <= q), s, -inf)` |
| `document_mask(ids, causal=True)` | `where((ids[b, q] == ids[b, kv]) & (kv <= q), s, -inf)` |
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .flex_score import INPUT_NAMES, INPUT_TYPES

OUTPUT = "score_out"
_NEG_INF = -np.inf


class _Graph:
    """A tiny graph writer: ``g.op("Add", a, b)`` returns the output's name."""

    def __init__(self, name: str):
        self.name, self.nodes, self.initializers, self.count = name, [], [], 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{self.name}_{hint}_{self.count}"

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, value, dtype) -> str:
        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def finish(self, result: str) -> onnx.GraphProto:
        self.nodes.append(helper.make_node("Identity", [result], [OUTPUT], name=f"{self.name}_out"))
        inputs = [helper.make_tensor_value_info(n, t, []) for n, t in zip(INPUT_NAMES, INPUT_TYPES)]
        return helper.make_graph(self.nodes, self.name, inputs,
                                 [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [])],
                                 initializer=self.initializers)

    def mask(self, keep: str) -> str:
        return self.op("Where", keep, "score", self.const(_NEG_INF, np.float32))

    def causal(self) -> str:
        return self.op("LessOrEqual", "kv_pos", "q_pos")


def causal() -> onnx.GraphProto:
    """Bottom-right causal mask: a query at position ``q_pos`` sees keys ``kv_pos <= q_pos``."""
    g = _Graph("causal")
    return g.finish(g.mask(g.causal()))


def sliding_window(window: int, causal: bool = True) -> onnx.GraphProto:
    """Local attention: keys ``kv_pos >= q_pos - window`` (``window + 1`` keys with the query's
    own), as PagedAttention's ``local_window_size`` and Attention-25's ``left_window_size``;
    ``causal`` also hides keys after the query (Mistral, Gemma 2 local layers)."""
    if window < 0:
        raise ValueError(f"sliding_window: window must be >= 0, got {window}")
    g = _Graph("sliding_window")
    keep = g.op("GreaterOrEqual", "kv_pos", g.op("Sub", "q_pos", g.const(window, np.int32)))
    if causal:
        keep = g.op("And", keep, g.causal())
    return g.finish(g.mask(keep))


def softcap(cap: float) -> onnx.GraphProto:
    """Soft cap of the logits: ``cap * tanh(score / cap)`` (Gemma 2, Grok)."""
    if not cap > 0:
        raise ValueError(f"softcap: cap must be positive, got {cap}")
    g = _Graph("softcap")
    c = g.const(cap, np.float32)
    return g.finish(g.op("Mul", g.op("Tanh", g.op("Div", "score", c)), c))


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes (Press et al.; the BLOOM/MPT recipe for head counts that are not
    powers of two)."""
    closest = 2 ** int(np.floor(np.log2(num_heads)))
    base = 2.0 ** (-8.0 / closest)
    slopes = base ** np.arange(1, closest + 1)
    if closest < num_heads:
        extra = (2.0 ** (-4.0 / closest)) ** np.arange(1, 2 * (num_heads - closest) + 1, 2)
        slopes = np.concatenate([slopes, extra])
    return slopes.astype(np.float32)


def alibi(slopes: int | Sequence[float] | np.ndarray) -> onnx.GraphProto:
    """ALiBi: ``score + slopes[head] * (kv_pos - q_pos)``, a linear penalty on distance.
    ``slopes`` is one slope per query head, or the head count for the standard slopes."""
    slopes = alibi_slopes(slopes) if isinstance(slopes, int) else np.asarray(slopes, np.float32).reshape(-1)
    g = _Graph("alibi")
    slope = g.op("Gather", g.const(slopes, np.float32), "head")
    distance = g.op("Cast", g.op("Sub", "kv_pos", "q_pos"), to=TensorProto.FLOAT)
    return g.finish(g.op("Add", "score", g.op("Mul", slope, distance)))


def relative_position_bias(table, max_distance: int) -> onnx.GraphProto:
    """A learned bias per head and clipped relative distance:
    ``score + table[head, clip(kv_pos - q_pos, -max_distance, max_distance) + max_distance]``;
    ``table`` is ``[num_heads, 2 * max_distance + 1]`` (one row shared by every head when 1-D)."""
    table = np.asarray(table, np.float32)
    width = 2 * max_distance + 1
    if table.ndim == 1:
        table = table[None]
    if table.ndim != 2 or table.shape[1] != width:
        raise ValueError(f"relative_position_bias: table must be [num_heads, {width}], got {list(table.shape)}")
    g = _Graph("relative_position_bias")
    lo, hi = g.const(-max_distance, np.int32), g.const(max_distance, np.int32)
    column = g.op("Add", g.op("Min", g.op("Max", g.op("Sub", "kv_pos", "q_pos"), lo), hi), hi)
    index = column if table.shape[0] == 1 else g.op("Add", g.op("Mul", "head", g.const(width, np.int32)), column)
    return g.finish(g.op("Add", "score", g.op("Gather", g.const(table.reshape(-1), np.float32), index)))


def prefix_lm(prefix_length: int | Sequence[int] | np.ndarray, causal: bool = True) -> onnx.GraphProto:
    """Prefix-LM: every query sees the first ``prefix_length`` keys (bidirectional prefix) and,
    when ``causal``, the keys up to itself.  ``prefix_length`` is one length, or one per
    sequence of the batch (read at ``batch``)."""
    g = _Graph("prefix_lm")
    if np.ndim(prefix_length) == 0:
        prefix = g.const(int(prefix_length), np.int32)
    else:
        prefix = g.op("Gather", g.const(np.asarray(prefix_length, np.int32).reshape(-1), np.int32), "batch")
    keep = g.op("Less", "kv_pos", prefix)
    if causal:
        keep = g.op("Or", keep, g.causal())
    return g.finish(g.mask(keep))


def document_mask(document_ids, causal: bool = True) -> onnx.GraphProto:
    """Packed sequences: a query sees only keys of its own document (and, when ``causal``, not
    after itself).  ``document_ids`` gives the document of each position, ``[max_len]`` for
    every sequence of the batch or ``[batch, max_len]`` one row per sequence; it must cover every
    position the batch attends to."""
    ids = np.asarray(document_ids, np.int32)
    if ids.ndim not in (1, 2):
        raise ValueError(f"document_mask: document_ids must be [max_len] or [batch, max_len], got {list(ids.shape)}")
    g = _Graph("document_mask")
    table = g.const(ids.reshape(-1), np.int32)

    def doc(position):
        if ids.ndim == 2:
            position = g.op("Add", g.op("Mul", "batch", g.const(ids.shape[1], np.int32)), position)
        return g.op("Gather", table, position)

    keep = g.op("Equal", doc("q_pos"), doc("kv_pos"))
    if causal:
        keep = g.op("And", keep, g.causal())
    return g.finish(g.mask(keep))


def compose(*mods: onnx.GraphProto) -> onnx.GraphProto:
    """Apply ``mods`` in order: the score each returns is the next one's ``score``."""
    if not mods:
        raise ValueError("compose: give at least one score mod")
    nodes, initializers, score = [], [], "score"
    for i, mod in enumerate(mods):
        rename = {v.name: n for v, n in zip(mod.input, INPUT_NAMES)}
        rename[mod.input[0].name] = score

        def name(x, i=i):
            return rename.get(x, f"c{i}_{x}") if x else x

        _copy_renamed(mod, name, initializers, nodes)
        score = name(mod.output[0].name)
    nodes.append(helper.make_node("Identity", [score], [OUTPUT], name="compose_out"))
    inputs = [helper.make_tensor_value_info(n, t, []) for n, t in zip(INPUT_NAMES, INPUT_TYPES)]
    return helper.make_graph(nodes, "_".join(m.name for m in mods), inputs,
                             [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [])], initializer=initializers)


def _copy_renamed(mod: onnx.GraphProto, name, initializers: list, nodes: list) -> None:
    """Append copies of ``mod``'s initializers and nodes, every value renamed by ``name``."""
    for t in mod.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        copy.name = name(t.name)
        initializers.append(copy)
    for node in mod.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [name(x) for x in node.input]
        copy.output[:] = [name(x) for x in node.output]
        copy.name = name(node.name or node.output[0])
        nodes.append(copy)


def flex_score_mod(mod: onnx.GraphProto) -> onnx.GraphProto:
    """The whole-tensor ``score_mod`` of ``ai.onnx.preview.FlexAttention`` that applies the
    pointwise ``mod`` at every ``(b, h, q_idx, kv_idx)`` of its ``[B, H, L, S]`` scores
    (positions from 0, as PyTorch's ``flex_attention``), its index tensors built with
    Shape/Range/Unsqueeze as torch.onnx writes them."""
    g = _Graph("flex")
    shape = g.op("Shape", "scores")
    zero, one = g.const(0, np.int64), g.const(1, np.int64)
    index = {}
    for axis, name in enumerate(INPUT_NAMES[1:]):
        size = g.op("Squeeze", g.op("Slice", shape, g.const([axis], np.int64), g.const([axis + 1], np.int64)))
        axes = g.const([a for a in range(4) if a != axis], np.int64)
        index[name] = g.op("Cast", g.op("Unsqueeze", g.op("Range", zero, size, one), axes), to=TensorProto.INT32)
    rename = {v.name: n for v, n in zip(mod.input, INPUT_NAMES)}
    rename.update({v.name: index[n] for v, n in zip(mod.input[1:], INPUT_NAMES[1:])})
    rename[mod.input[0].name] = "scores"

    def name(x):
        return rename.get(x, f"m_{x}") if x else x

    nodes = list(g.nodes)
    _copy_renamed(mod, name, g.initializers, nodes)
    nodes.append(helper.make_node("Expand", [name(mod.output[0].name), shape], ["scores_out"], name="flex_expand"))
    four_d = [None] * 4
    return helper.make_graph(nodes, f"flex_{mod.name}",
                             [helper.make_tensor_value_info("scores", TensorProto.FLOAT, four_d)],
                             [helper.make_tensor_value_info("scores_out", TensorProto.FLOAT, four_d)],
                             initializer=g.initializers)


def pointwise_of(score_mod: onnx.GraphProto) -> tuple[onnx.GraphProto | None, str]:
    """The pointwise ``(score, batch, head, q_pos, kv_pos) -> score`` graph that a whole-tensor
    FlexAttention ``score_mod`` applies at every ``(b, h, q_idx, kv_idx)``, or ``(None, reason)``.

    The inverse of ``flex_score_mod``, on any graph of that form: index tensors are
    ``Range(0, dim, 1)`` over a dimension of ``Shape(scores)`` (taken with Slice, Gather or
    Shape's start/end, Squeezed or not), Unsqueezed so the range lies on that axis of the
    ``[B, H, L, S]`` scores (right-aligned broadcasting), and everything else is a pointwise op
    (``flex_score.POINTWISE_OPS``) on the scores, those indices, scalar constants and constant
    1-D tables read with Gather; the output may be Expanded to ``Shape(scores)``.  The result is
    checked with ``flex_score.check``.
    """
    from .flex_score import POINTWISE_OPS, ScoreModError, check, constant_arrays

    if len(score_mod.input) != 1 or len(score_mod.output) != 1:
        return None, "score_mod must take and return one tensor"
    scores = score_mod.input[0]
    if scores.type.tensor_type.elem_type != TensorProto.FLOAT:
        return None, "the scores are not float32"
    constants = constant_arrays(score_mod)
    consts_used: set[str] = set()
    SHAPE, DIM, RANGE = "shape", "dim", "range"
    kind: dict[str, tuple] = {scores.name: ("score",)}  # name -> (kind, ...)
    g = _Graph("pointwise")
    rename = {scores.name: "score"}
    index_names = INPUT_NAMES[1:]

    def scalar(name):
        return name in constants and constants[name].size == 1

    def const_int(name):
        return int(constants[name].reshape(-1)[0]) if scalar(name) else None

    for node in score_mod.node:
        op, ins = node.op_type, list(node.input)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        label = f"{op} node {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            return None, f"{label} is not a standard op"
        if op == "Constant":
            continue
        first = kind.get(ins[0], ("const",) if ins and ins[0] in constants else None) if ins else None
        if op == "Shape" and first == ("score",):
            start, end = attrs.get("start", 0), attrs.get("end", 4)
            axes = list(range(4))[start:end]
            kind[node.output[0]] = (SHAPE, axes)
            continue
        if first is not None and first[0] == SHAPE:
            axes = first[1]
            if op == "Slice" and len(ins) >= 3 and const_int(ins[1]) is not None and const_int(ins[2]) is not None:
                picked = axes[const_int(ins[1]):const_int(ins[2])]
                if len(ins) > 4 and ins[4] and const_int(ins[4]) != 1:
                    return None, f"{label} slices the shape with steps"
                kind[node.output[0]] = (SHAPE, picked) if len(picked) != 1 else (DIM, picked[0])
                continue
            if op == "Gather" and const_int(ins[1]) is not None:
                kind[node.output[0]] = (DIM, axes[const_int(ins[1])])
                continue
            if len(axes) == 1 and op in ("Squeeze", "Identity", "Reshape"):
                kind[node.output[0]] = (DIM, axes[0])
                continue
            return None, f"{label} uses the scores' shape other than for index ranges"
        if first is not None and first[0] == DIM:
            if op in ("Squeeze", "Identity", "Reshape", "Unsqueeze"):
                kind[node.output[0]] = first
                continue
            return None, f"{label} uses a dimension of the scores other than as a Range's limit"
        if op == "Range":
            limit = kind.get(ins[1])
            if limit is None or limit[0] != DIM or const_int(ins[0]) != 0 or const_int(ins[2]) != 1:
                return None, f"{label} is not Range(0, a dimension of the scores, 1)"
            kind[node.output[0]] = (RANGE, limit[1], constants[ins[0]].dtype, 1)
            continue
        if first is not None and first[0] == RANGE and op in ("Unsqueeze", "Identity"):
            _, axis, dtype, rank = first
            if op == "Unsqueeze":
                axes = attrs.get("axes")
                if axes is None and len(ins) > 1:
                    axes = constants.get(ins[1])
                if axes is None:
                    return None, f"{label} has unknown axes"
                out_rank = rank + np.asarray(axes).size
                axes = sorted(int(a) % out_rank for a in np.asarray(axes).reshape(-1))
                position = [a for a in range(out_rank) if a not in axes]
                if len(position) != 1 or out_rank > 4 or position[0] != axis - (4 - out_rank):
                    return None, f"{label} does not place the range of axis {axis} on that axis"
                rank = out_rank
            kind[node.output[0]] = (RANGE, axis, dtype, rank)
            continue
        if op == "Expand" and node.output[0] == score_mod.output[0].name and kind.get(ins[1], (None,))[0] == SHAPE \
                and kind[ins[1]][1] == [0, 1, 2, 3]:
            rename[node.output[0]] = rename.get(ins[0], ins[0])
            continue
        if op not in POINTWISE_OPS:
            return None, f"{label}: {op} is not pointwise"
        args = []
        for i, x in enumerate(ins):
            if not x:
                args.append("")
                continue
            k = kind.get(x)
            if k is not None and k[0] == RANGE:
                if not (k[3] > 1 or k[1] == 3):
                    return None, f"{label} uses a Range before it is placed on its axis"
                if x not in rename:
                    name = index_names[k[1]]
                    if np.dtype(k[2]) != np.int32:
                        name = g.op("Cast", name, to=helper.np_dtype_to_tensor_dtype(np.dtype(k[2])))
                    rename[x] = name
            elif k is not None and k[0] in (SHAPE, DIM):
                return None, f"{label} reads the scores' shape"
            elif k is None and x in constants:
                array = constants[x]
                if array.size == 1:
                    if x not in rename:
                        rename[x] = g.const(array.reshape(()), array.dtype)
                elif op == "Gather" and i == 0 and array.ndim == 1:
                    if x not in rename:
                        rename[x] = g.const(array, array.dtype)
                else:
                    return None, f"{label} reads a constant of shape {list(array.shape)}"
                consts_used.add(x)
            elif k is None:
                return None, f"{label} reads {x!r}, which is neither computed in the graph nor a constant"
            args.append(rename[x])
        out = g.fresh(op.lower())
        copy = helper.make_node(op, args, [out], name=out)
        copy.attribute.extend(node.attribute)
        g.nodes.append(copy)
        rename[node.output[0]] = out
        kind[node.output[0]] = ("value",)
    result = score_mod.output[0].name
    if result not in rename:
        return None, "the output is not computed from the scores pointwise"
    graph = g.finish(rename[result])
    try:
        check(graph, "FlexAttention score_mod")
    except ScoreModError as error:
        return None, str(error)
    return graph, ""
