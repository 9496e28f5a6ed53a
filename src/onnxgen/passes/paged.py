"""paged: a standard ONNX decoder with a KV cache -> onnxgen's paged signature.

The source is a decoder as torch.onnx (dynamo) or optimum export it: inputs ``input_ids`` and
``position_ids`` ``[batch, seq]``, an ``attention_mask``, and per layer a past key and value
``[batch, kv_heads, past, head_dim]`` (``past_key_values.N.key``, ``past_key_values.N.value``,
or transformers' ``input.past_key_values.layers.N.keys``); outputs ``logits`` and the presents
(``present.N.key`` …), each the ``Concat`` of the past and the new keys/values.  Attention is
an ``Attention`` node (opset 23/24) or the MatMul–Softmax–MatMul pattern torch's sdpa
decomposes into.

The result has the paged signature of docs/PagedSignature.md: flat ``input_ids`` and
``position_ids [num_tokens]``, ``cumulative_sequence_length``, ``past_seqlens``,
``block_table``, ``slot_mapping``, ``key_cache.{i}``/``value_cache.{i}`` in, ``logits`` and
``key_cache_out.{i}``/``value_cache_out.{i}`` out.  How:

- the flat tokens are the source's layout with batch 1 and seq = num_tokens: everything that
  acts token by token (embeddings, norms, RoPE from ``position_ids``, MLPs) runs unchanged;
- each attention (rules below, in onnxscript's rewriter style: a pattern, a check with reasons,
  a rewrite) becomes one ``onnxgen.preview.PagedAttention`` over the new q/k/v, taken before the
  ``Concat`` with the past and before GQA's repeat of the KV heads;
- the mask is checked, not guessed: its subgraph is evaluated on a probe (one sequence, a long
  past) and must be causal, optionally with a sliding window, which becomes
  ``local_window_size``; the mask, the past and ``attention_mask`` then fall away as dead code;
- logits are taken for the last token of each sequence (the lm_head runs on those rows only),
  or for every token with ``all_logits=True``.

A graph the rules do not match is refused with the layers and the reasons.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter.rules import common as common_rules

from ..ops.domain import DOMAIN, DOMAIN_VERSION, MIN_ONNX_OPSET

PAGED_INPUTS = ("cumulative_sequence_length", "past_seqlens", "block_table", "slot_mapping")
# Names of the past inputs: optimum and torch.onnx with names (past_key_values.3.key), transformers'
# exporter (input.past_key_values.layers.3.keys), and the underscore forms (past_key_values_3_key).
_PAST = re.compile(r"past_key_values?\D*?(\d+)\D*?(key|value)s?$")
# The probe for masks: one sequence of 2 new tokens after this many cached ones (longer than the
# sliding windows of common models, so a window shows as one).
_PROBE_PAST = 8190
# Ops through which the KV cache's concat reaches attention: GQA's repeat and layout changes.
_LAYOUT_OPS = {"Unsqueeze", "Expand", "Reshape", "Squeeze", "Identity"}


class PagedConversionError(ValueError):
    """The graph is not a decoder this pass can convert; the message says what did not match."""


@dataclass
class _Cache:
    layer: int
    past_key: ir.Value
    past_value: ir.Value
    key_cache: ir.Value
    value_cache: ir.Value
    kv_heads: int
    head_dim: int
    v_head_dim: int


class _State:
    """What the rules share: the caches by past input, the new inputs, mask windows, failures."""

    def __init__(self, graph: ir.Graph, caches: dict[int, _Cache], model: ir.Model):
        self.graph, self.caches, self.model = graph, caches, model
        self.by_past = {c.past_key: (c, "key") for c in caches.values()}
        self.by_past.update({c.past_value: (c, "value") for c in caches.values()})
        self.paged: dict[str, ir.Value] = {}
        self.windows: dict[ir.Value, int] = {}
        self.outputs: dict[int, tuple[ir.Value, ir.Value]] = {}
        self.failures: list[str] = []


# ---- the rules -------------------------------------------------------------------------------

class _PagedRule(pattern.RewriteRuleClassBase):
    """Common check and rewrite: q [1, Hq, T, D] and the new k/v behind the cache concat."""

    def __init__(self, name: str, state: _State, **kwargs):
        super().__init__(name, **kwargs)
        self.state = state

    def _fail(self, result: pattern.MatchResult, reason: str, *where) -> pattern.MatchResult:
        self.state.failures.append(f"{self.name}: {reason}")
        return result.fail(reason, *where)

    def _sources(self, result, key, value):
        k = _cache_source(key, self.state.by_past)
        v = _cache_source(value, self.state.by_past)
        if k is None or v is None:
            which = "key" if k is None else "value"
            return None, self._fail(result, f"the attention's {which} is not the Concat of a past "
                                            f"{which} input with new {which}s on the sequence axis (through GQA's repeat only; a past "
                                            "sliced to a window before the concat is not supported)")
        (kc, kkind, knew), (vc, vkind, vnew) = k, v
        if kc is not vc or (kkind, vkind) != ("key", "value"):
            return None, self._fail(result, "key and value come from different layers' caches")
        return (kc, knew, vnew), result

    def _cache_and_window(self, result, key, value, mask):
        """The checks every rule ends with: where the cache comes from, and the mask's window."""
        found, result = self._sources(result, key, value)
        if found is None:
            return result
        window, result = self._window(result, mask)
        if window is None:
            return result
        self._found, self._window_size = found, window
        return result

    def _window(self, result, mask: ir.Value | None):
        if mask is None:
            return None, self._fail(result, "no attention mask: cannot tell causal from bidirectional")
        if mask not in self.state.windows:
            try:
                self.state.windows[mask] = _mask_window(self.state, mask)
            except PagedConversionError as e:
                return None, self._fail(result, str(e), mask)
        return self.state.windows[mask], result

    def _paged(self, op, q, knew, vnew, cache: _Cache, heads: int, scale, softcap: float, window: int):
        def flat(x, h, d):  # [1, h, T, d] -> [T, h*d]
            x = op.Transpose(x, perm=[0, 2, 1, 3])
            return op.Reshape(x, op.Constant(value=ir.tensor(np.array([-1, h * d], np.int64))))

        attrs = {"num_heads": heads, "kv_num_heads": cache.kv_heads, "local_window_size": window}
        if scale is not None:
            attrs["scale"] = float(scale)
        if softcap:
            attrs["softcap"] = float(softcap)
        p = self.state.paged
        out, kc, vc = op.PagedAttention(
            flat(q, heads, cache.head_dim), flat(knew, cache.kv_heads, cache.head_dim),
            flat(vnew, cache.kv_heads, cache.v_head_dim), cache.key_cache, cache.value_cache,
            p["cumulative_sequence_length"], p["past_seqlens"], p["block_table"], p["slot_mapping"],
            _domain=DOMAIN, _version=DOMAIN_VERSION, _outputs=3, **attrs)
        self.state.outputs[cache.layer] = (kc, vc)
        out = op.Reshape(out, op.Constant(value=ir.tensor(np.array([1, -1, heads, cache.v_head_dim], np.int64))))
        return op.Transpose(out, perm=[0, 2, 1, 3])  # [1, Hq, T, Dv] as the source had it


class AttentionOp(_PagedRule):
    """``Attention`` (opset 23/24) over 4D q, k, v whose k/v are the concat of past and new."""

    def pattern(self, op, q, k, v, mask):
        return op.Attention(q, k, v, mask, _allow_other_attributes=True)

    def check(self, context, q, k, v, mask, **_):
        result = pattern.MatchResult()
        attrs = context.root.attributes
        if "is_causal" in attrs and attrs["is_causal"].as_int():
            return self._fail(result, "Attention with is_causal=1 over a KV cache is top-left aligned (opset "
                                      "23/24), not the bottom-right causal mask of a decoder")
        if len(context.root.inputs) > 4 or len(context.root.outputs) > 1:
            return self._fail(result, "Attention with past_key/past_value inputs or present outputs of its own "
                                      "is not supported yet (torch.onnx concatenates the cache outside the node)")
        self._scale = attrs["scale"].as_float() if "scale" in attrs else None
        self._softcap = attrs["softcap"].as_float() if "softcap" in attrs else 0.0
        if q.shape is None or q.shape.rank() != 4:
            return self._fail(result, "the query is not 4D [batch, heads, seq, head_dim]", q)
        if _static(q.shape[1]) is None:
            return self._fail(result, "the number of query heads is not static", q)
        return self._cache_and_window(result, k, v, mask)

    def rewrite(self, op, q, k, v, mask, **_):
        cache, knew, vnew = self._found
        return self._paged(op, q, knew, vnew, cache, _static(q.shape[1]), self._scale or None, self._softcap,
                           self._window_size)


class MatMulSoftmax(_PagedRule):
    """torch's sdpa decomposition: softmax(q·kᵀ·scale (+ softcap) + mask) · v, with the optional
    NaN guard after the softmax and the optional zeroing of fully masked rows after the product."""

    def __init__(self, name: str, state: _State, row_guard: bool):
        super().__init__(name, state)
        self.row_guard = row_guard

    def pattern(self, op, q, k, v, mask, q_scale, k_scale, qk_scale, cap, cap2, row_cond, zeros):
        k_t = pattern.OrValue([
            op.Transpose(k, perm=[0, 1, 3, 2]),
            op.Reshape(op.Transpose(op.Reshape(k, pattern.ANY_VALUE), perm=[0, 2, 1]), pattern.ANY_VALUE),
        ])
        q = pattern.OrValue([op.Mul(q, q_scale), op.Div(q, q_scale), q], tag_var="q_scaling",
                            tag_values=["Mul", "Div", "None"])
        k_t = pattern.OrValue([op.Mul(k_t, k_scale), op.Div(k_t, k_scale), k_t], tag_var="k_scaling",
                              tag_values=["Mul", "Div", "None"])
        scores = op.MatMul(q, k_t)
        scores = pattern.OrValue([op.Mul(scores, qk_scale), op.Div(scores, qk_scale), scores],
                                 tag_var="qk_scaling", tag_values=["Mul", "Div", "None"])
        scores = pattern.OrValue([op.Mul(op.Tanh(op.Div(scores, cap)), cap2), scores], tag_var="capped",
                                 tag_values=[True, False])
        probs = op.Softmax(op.Add(scores, mask), axis=-1)
        probs = pattern.OrValue([op.Where(op.IsNaN(probs), 0.0, probs), probs])
        out = op.MatMul(probs, v)
        if self.row_guard:  # rows whose mask is all -inf give 0: never the case under a causal mask
            return op.Where(row_cond, zeros, out)
        return out

    def check(self, context, q, k, v, mask, zeros=None, **bindings):
        result = pattern.MatchResult()
        if zeros is not None and not _is_zero(zeros):
            return self._fail(result, "the value selected for masked rows is not 0", zeros)
        scale = 1.0
        for tag, name in (("q_scaling", "q_scale"), ("k_scaling", "k_scale"), ("qk_scaling", "qk_scale")):
            kind = bindings.get(tag, "None")
            if kind == "None":
                continue
            c = _ir_utils.get_singleton_value(bindings.get(name))
            if c is None:
                return self._fail(result, f"{name} is not a constant scalar", bindings.get(name))
            scale *= c if kind == "Mul" else 1.0 / c
        softcap = 0.0
        if bindings.get("capped"):
            c1, c2 = (_ir_utils.get_singleton_value(bindings.get(n)) for n in ("cap", "cap2"))
            if c1 is None or c1 != c2:
                return self._fail(result, "tanh soft cap with different or non-constant divisor and factor")
            softcap = float(c1)
        if q.shape is None or q.shape.rank() != 4 or _static(q.shape[1]) is None:
            return self._fail(result, "the query is not 4D [batch, heads, seq, head_dim] with static heads", q)
        self._scale, self._softcap = scale, softcap
        return self._cache_and_window(result, k, v, mask)

    def rewrite(self, op, q, k, v, mask, **_):
        cache, knew, vnew = self._found
        scale = None if math.isclose(self._scale, cache.head_dim ** -0.5, rel_tol=1e-6) else self._scale
        return self._paged(op, q, knew, vnew, cache, _static(q.shape[1]), scale, self._softcap, self._window_size)


# ---- helpers ---------------------------------------------------------------------------------

def _is_zero(value: ir.Value) -> bool:
    tensor = ir.convenience.get_const_tensor(value)
    return tensor is not None and not np.any(tensor.numpy())


def _cache_source(value: ir.Value, by_past: dict):
    """Walk back from an attention operand through GQA's repeat to ``Concat(past, new)``.

    Returns (cache, "key"|"value", new) or None."""
    for _ in range(16):
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Concat" and len(node.inputs) == 2 and node.inputs[0] in by_past:
            axis = node.attributes["axis"].as_int()
            if axis not in (2, -2):
                return None
            cache, kind = by_past[node.inputs[0]]
            return cache, kind, node.inputs[1]
        if node.op_type not in _LAYOUT_OPS:
            return None
        value = node.inputs[0]
    return None


def _mask_window(state: _State, mask: ir.Value) -> int:
    """Evaluate the mask's subgraph on a probe and return ``local_window_size`` (−1 unbounded)."""
    import onnxruntime as ort

    nodes, inputs, initializers, stack, seen = [], [], [], [mask], set()
    graph_inputs = set(state.graph.inputs)
    while stack:
        value = stack.pop()
        if value in seen or value is None:
            continue
        seen.add(value)
        if value in graph_inputs:
            inputs.append(value)
        elif value.const_value is not None and value.producer() is None:
            initializers.append(value)
        elif value.producer() is not None:
            node = value.producer()
            if node not in nodes:
                nodes.append(node)
                stack.extend(node.inputs)
        else:
            raise PagedConversionError(f"the mask depends on {value.name!r}, which has no producer")
    order = {node: i for i, node in enumerate(state.graph)}
    nodes.sort(key=order.__getitem__)
    feeds, past, new = {}, _PROBE_PAST, 2
    for value in inputs:
        name = value.name
        if value in state.by_past:
            cache, kind = state.by_past[value]
            d = cache.head_dim if kind == "key" else cache.v_head_dim
            feeds[name] = np.zeros((1, cache.kv_heads, past, d), value.dtype.numpy())
        elif name == "attention_mask":
            feeds[name] = np.ones((1, past + new), value.dtype.numpy())
        elif name == "position_ids":
            feeds[name] = np.arange(past, past + new, dtype=value.dtype.numpy())[None]
        elif name == "input_ids":
            feeds[name] = np.zeros((1, new), value.dtype.numpy())
        else:
            raise PagedConversionError(f"the attention mask depends on the input {name!r}, which a paged model "
                                       "does not have")
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes], "mask_probe",
        [onnx.helper.make_tensor_value_info(v.name, v.dtype.value, None) for v in inputs],
        [onnx.helper.make_value_info(mask.name, onnx.TypeProto())],
        initializer=[ir.serde.serialize_tensor(v.const_value) for v in initializers])
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v)
                                                         for d, v in state.model.opset_imports.items()])
    probe.ir_version = 10
    options = ort.SessionOptions()
    options.log_severity_level = 3
    m = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    if m.ndim < 2 or m.shape[-2] != new or m.shape[-1] != past + new:
        raise PagedConversionError(f"the attention mask has shape {m.shape} on a probe of {new} new tokens after "
                                   f"{past} cached ones: not [.., new, past + new]")
    m = m.reshape((-1,) + m.shape[-2:])
    if not all(np.array_equal(m[0], other) for other in m[1:]):
        raise PagedConversionError("the attention mask differs between heads or batch rows")
    m = m[0]
    if m.dtype == bool:
        allowed = m
    else:
        allowed = m > -1e4  # additive masks: 0 where allowed, a large negative number or -inf elsewhere
        if np.any(m[allowed] != 0):
            raise PagedConversionError("the additive attention mask adds a bias (ALiBi?), not only -inf: not "
                                       "expressible without score_mod")
    window = None
    for row in range(new):
        q_pos = past + row
        seen_keys = np.flatnonzero(allowed[row])
        if len(seen_keys) == 0 or seen_keys[-1] != q_pos or len(seen_keys) != q_pos - seen_keys[0] + 1:
            raise PagedConversionError(f"the attention mask is not causal: token {q_pos} sees keys "
                                       f"{_ranges(seen_keys)}")
        w = -1 if seen_keys[0] == 0 else int(q_pos - seen_keys[0])
        if window is not None and w != window:
            raise PagedConversionError("the attention mask's window changes from one token to the next")
        window = w
    return window


def _ranges(indices: np.ndarray) -> str:
    if len(indices) == 0:
        return "none"
    return f"{indices[0]}..{indices[-1]} ({len(indices)} keys)"


def _find_caches(graph: ir.Graph) -> dict[int, _Cache]:
    pasts: dict[int, dict[str, ir.Value]] = {}
    for value in graph.inputs:
        match = _PAST.search(value.name)
        if match:
            pasts.setdefault(int(match.group(1)), {})[match.group(2)] = value
    if not pasts:
        raise PagedConversionError(
            "no past key/value inputs (named like past_key_values.0.key or past_key_values.layers.0.keys); "
            f"inputs are {[v.name for v in graph.inputs]}")
    caches = {}
    for layer in sorted(pasts):
        kv = pasts[layer]
        if set(kv) != {"key", "value"}:
            raise PagedConversionError(f"layer {layer} has a past {'key' if 'key' in kv else 'value'} but no "
                                       f"past {'value' if 'key' in kv else 'key'}")
        shapes = {}
        for kind, value in kv.items():
            shape = value.shape
            dims = [_static(shape[i]) for i in (1, 3)] if shape is not None and shape.rank() == 4 else [None]
            if None in dims:
                raise PagedConversionError(f"{value.name}: expected [batch, kv_heads, past, head_dim] with static "
                                           f"kv_heads and head_dim, got {shape}")
            shapes[kind] = [None, dims[0], None, dims[1]]
        block = ["num_blocks", "block_size"]
        make = lambda kind, d: ir.Value(  # noqa: E731
            name=f"{kind}_cache.{layer}", type=ir.TensorType(kv[kind].dtype),
            shape=ir.Shape([*block, shapes[kind][1], d]))
        caches[layer] = _Cache(layer, kv["key"], kv["value"], make("key", shapes["key"][3]),
                               make("value", shapes["value"][3]), shapes["key"][1], shapes["key"][3],
                               shapes["value"][3])
    return caches


def _static(dim) -> int | None:
    """A dimension's size if known (transformers' exporter writes some static sizes as names: '2')."""
    if isinstance(dim, int):
        return dim
    text = str(dim)
    return int(text) if text.isdigit() else None


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.register_initializer(value)
    return value


def _node(graph: ir.Graph, op_type: str, inputs, name: str, **attributes) -> ir.Value:
    node = ir.node(op_type, inputs, attributes=attributes, name=name)
    node.outputs[0].name = name
    graph.append(node)
    return node.outputs[0]


def _flat_input(graph: ir.Graph, name: str) -> ir.Value:
    """Replace the [batch, seq] input ``name`` by a [num_tokens] one, seen as batch 1 inside."""
    old = next((v for v in graph.inputs if v.name == name), None)
    if old is None:
        raise PagedConversionError(f"the model has no {name!r} input" + (
            ": its positions come from the past length, which a paged batch does not have; export with "
            "position_ids as an input" if name == "position_ids" else ""))
    if old.shape is not None and old.shape.rank() != 2:
        raise PagedConversionError(f"{name}: expected [batch, seq], got {old.shape}")
    new = ir.Value(name=name, type=ir.TensorType(old.dtype), shape=ir.Shape(["num_tokens"]))
    old.name = f"{name}.batched"
    graph.inputs[graph.inputs.index(old)] = new
    unsqueezed = _node(graph, "Unsqueeze", [new, _const(graph, f"{name}.axes", np.array([0], np.int64))],
                       f"{name}.as_batch_1")
    old.replace_all_uses_with(unsqueezed)
    return new


def _last_token_logits(graph: ir.Graph, logits: ir.Value, cu: ir.Value) -> ir.Value:
    """[1, T, V] -> [B, V] for the last token of each sequence; the lm_head MatMul sees those rows only."""
    ends = _node(graph, "Slice", [cu, _const(graph, "logits.one", np.array([1], np.int64)),
                                  _const(graph, "logits.max", np.array([2**31 - 1], np.int64))], "logits.ends")
    last = _node(graph, "Sub", [ends, _const(graph, "logits.one32", np.array(1, np.int32))], "logits.last")
    producer = logits.producer()
    if producer is not None and producer.op_type == "MatMul" and producer.inputs[1].const_value is not None \
            and len(producer.inputs[0].uses()) == 1:
        hidden = producer.inputs[0]
        producer.replace_input_with(0, _node(graph, "Gather", [hidden, last], "logits.last_rows", axis=1))
        rows = logits
    else:
        rows = _node(graph, "Gather", [logits, last], "logits.last_rows", axis=1)
    return rows


def paged(model: onnx.ModelProto | ir.Model, block_size: int | None = None, *, all_logits: bool = False,
          verbose: bool = False) -> onnx.ModelProto:
    """Convert a decoder with past_key_values/present into the paged signature (see the module doc).

    ``block_size`` fixes the caches' block dimension (symbolic otherwise) and is recorded in the
    model's metadata as ``onnxgen.block_size``.  ``all_logits`` returns logits for every new
    token ``[num_tokens, vocab]`` instead of the last token of each sequence ``[B, vocab]``.
    """
    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_ONNX_OPSET:  # PagedAttention's function body (the portable path) needs opset 24
        model = onnx.version_converter.convert_version(model, MIN_ONNX_OPSET)
    m = ir.serde.deserialize_model(model)
    graph = m.graph
    caches = _find_caches(graph)
    state = _State(graph, caches, m)
    state.paged = {
        "cumulative_sequence_length": ir.Value(name="cumulative_sequence_length", type=ir.TensorType(ir.DataType.INT32),
                                               shape=ir.Shape(["batch_plus_1"])),
        "past_seqlens": ir.Value(name="past_seqlens", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape(["batch"])),
        "block_table": ir.Value(name="block_table", type=ir.TensorType(ir.DataType.INT32),
                                shape=ir.Shape(["batch", "max_blocks"])),
        "slot_mapping": ir.Value(name="slot_mapping", type=ir.TensorType(ir.DataType.INT32),
                                 shape=ir.Shape(["num_tokens"])),
    }
    if block_size:
        for c in caches.values():
            for v in (c.key_cache, c.value_cache):
                v.shape = ir.Shape(["num_blocks", block_size, *v.shape[2:]])
    m.opset_imports[DOMAIN] = DOMAIN_VERSION
    new_inputs = [*state.paged.values()] + [v for c in caches.values() for v in (c.key_cache, c.value_cache)]
    graph.inputs.extend(new_inputs)  # the rules refer to them; the order is fixed at the end

    # One rule at a time, the larger pattern first (the smaller one would match inside it).
    for rule in (AttentionOp.rule("Attention", state),
                 MatMulSoftmax.rule("MatMulSoftmax+row_guard", state, row_guard=True),
                 MatMulSoftmax.rule("MatMulSoftmax", state, row_guard=False)):
        pattern.RewriteRuleSet([rule]).apply_to_model(m, verbose=2 if verbose else None)
    missing = sorted(set(caches) - set(state.outputs))
    if missing:
        reasons = sorted(set(state.failures)) or ["no Attention node and no Softmax between two MatMuls reads them"]
        raise PagedConversionError(
            f"paged: the attention of layer(s) {missing} was not matched (the past inputs "
            f"{[caches[i].past_key.name for i in missing]}): " + "; ".join(reasons))

    input_ids, position_ids = _flat_input(graph, "input_ids"), _flat_input(graph, "position_ids")
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    if logits is None:
        raise PagedConversionError(f"no 'logits' output; outputs are {[v.name for v in graph.outputs]}")
    if not all_logits:
        rows = _last_token_logits(graph, logits, state.paged["cumulative_sequence_length"])
    else:
        rows = logits
    flat = _node(graph, "Squeeze", [rows, _const(graph, "logits.axes", np.array([0], np.int64))], "logits.flat")
    logits.name = "logits.batched"
    flat.name = "logits"
    flat.type = logits.type
    vocab = logits.shape[-1] if logits.shape is not None else "vocab"
    flat.shape = ir.Shape(["num_tokens" if all_logits else "batch", vocab])

    outputs = [flat]
    for layer, cache in caches.items():
        kc, vc = state.outputs[layer]
        kc.name, vc.name = f"key_cache_out.{layer}", f"value_cache_out.{layer}"
        for out, cache_in in ((kc, cache.key_cache), (vc, cache.value_cache)):
            out.type, out.shape = cache_in.type, cache_in.shape
        outputs += [kc, vc]
    graph.outputs.clear()
    graph.outputs.extend(outputs)
    common_passes.RemoveUnusedNodesPass()(m)
    _drop_old_inputs(graph, caches, keep=[input_ids, position_ids, *new_inputs])
    graph.inputs.clear()
    graph.inputs.extend([input_ids, position_ids, *new_inputs])
    # The transposes around each PagedAttention often cancel with the source's own (v, the output).
    pattern.RewriteRuleSet([common_rules.transpose_transpose_rule, common_rules.no_op_transpose_rule]).apply_to_model(m)
    common_passes.IdentityEliminationPass()(m)
    common_passes.RemoveUnusedNodesPass()(m)
    common_passes.RemoveUnusedOpsetsPass()(m)
    graph.sort()
    if block_size:
        m.metadata_props["onnxgen.block_size"] = str(block_size)
    m.metadata_props["onnxgen.converted_by"] = "onnxgen.passes.paged"
    return ir.serde.serialize_model(m)


def _drop_old_inputs(graph: ir.Graph, caches: dict[int, _Cache], keep: list[ir.Value]) -> None:
    """After dead code is gone, the past inputs may still be read by Shape (the batch size): that is
    1 now.  Any other use of them (the past length) or of another old input (attention_mask, …)
    means the graph still needs what a paged batch does not have: refuse, naming it."""
    for cache in caches.values():
        for past in (cache.past_key, cache.past_value):
            for node in list(past.consumers()):
                start = node.attributes["start"].as_int() if "start" in node.attributes else 0
                end = node.attributes["end"].as_int() if "end" in node.attributes else 4
                if node.op_type != "Shape" or 2 in range(4)[start:end]:
                    raise PagedConversionError(
                        f"{past.name} is still read by {node.op_type} node {node.name!r} outside attention "
                        "(the past length used for positions or masks?): not convertible")
                d = cache.head_dim if past is cache.past_key else cache.v_head_dim
                shape = np.array([1, cache.kv_heads, 0, d], np.int64)[start:end]
                node.outputs[0].replace_all_uses_with(_const(graph, f"{node.name or past.name}.shape", shape))
                graph.remove(node, safe=True)
    for value in graph.inputs:
        if value not in keep and value.uses():
            users = sorted({f"{u.node.op_type} {u.node.name!r}" for u in value.uses()})
            raise PagedConversionError(f"the input {value.name!r} is still used outside attention (by {users}): "
                                       "a paged model has no such input")
