"""MoE: a mixture-of-experts block, the general flow with its variants as attributes.

route (score, optionally group-limit, top-k, weigh) -> per-expert gated MLP (or any expert
graph) -> weighted combine.  The router projection stays a MatMul outside the op; shared
experts stay outside as an ordinary MLP.  The function body is written over ``GroupedMatMul``.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnx import TensorProto
from onnx.reference.op_run import OpRun
from onnx_ir.tape import Tape

from . import _schema as S
from ._builder import OpBuilder
from .domain import DOMAIN, DOMAIN_VERSION

NAME = "MoE"

SCORINGS = ("softmax", "sigmoid")
GROUP_SCORINGS = ("top2_sum", "max")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_clamped")
LAYOUTS = ("concatenated", "interleaved")
WEIGHT_POSITIONS = ("output", "input")

DOC = """\
A mixture-of-experts block over `T` token rows of width `H` with `E` experts, each token sent
to `k` of them. The router projection (`router_logits = X @ W_router (+ b)`) and any shared
expert stay outside the operator as ordinary ops.

**Routing** (always computed in float32, whatever the input types):
1. Scores: `s = softmax(router_logits)` over the experts (`scoring="softmax"`) or
   `s = sigmoid(router_logits)` (`scoring="sigmoid"`). With `softmax_after_topk=1`
   (gpt-oss, GraniteMoE) the scores are the raw logits and the softmax is taken later over
   the `k` selected ones; `scoring` must then be `softmax`.
2. Choice scores: `c = s + selection_bias` (DeepSeek-V3's correction bias); the bias only
   decides which experts are chosen, never their weights. Without it `c = s`.
3. Group-limited routing (`n_group > 0`): the experts are split into `n_group` contiguous groups
   of `E / n_group`; a group's score is the sum of its two best choice scores
   (`group_scoring="top2_sum"`, DeepSeek-V3) or its best one (`"max"`, DeepSeek-V2); the
   `topk_group` best groups are kept and the choice scores of every expert outside them become
   `-inf`.
4. Selection: the `k` experts with the largest choice scores, in decreasing order; ties go to
   the lower index (as `TopK`). `topk_indices [T, k]` (int64).
5. Weights: `w = s[topk_indices]` (the unbiased scores); `softmax(w)` over the k when
   `softmax_after_topk=1`; `w / sum(w)` when `normalize=1`; then `w * routed_scaling_factor`.
   `topk_weights [T, k]` is float32.

**Experts** (gated MLPs unless the `expert` graph is given): for token `t` and a chosen
expert `e`, `h = x @ gate_up_weights[e] + gate_up_bias[e]` with `x = X[t]`
(`weight_position="output"`) or `x = w * X[t]` (`weight_position="input"`, Llama-4).
With `gated=1`, `h` holds `2I` columns split into `gate` and `up`: the first `I` columns are
the gate and the next `I` the up projection (`gate_up_layout="concatenated"`), or the even
columns are the gate and the odd ones the up projection (`"interleaved"`, gpt-oss); then
`a = act(gate) * up`. With `gated=0`, `a = act(h)` (`N1 = I`). `act` is `silu`
(`x * sigmoid(x)`), `gelu` (erf form), `gelu_tanh` (tanh approximation), `relu`, or
`swiglu_clamped` (gpt-oss, gated only, replacing the whole `act(gate) * up`):
`gate = min(gate, limit)`, `up = clip(up, -limit, limit)`,
`a = (up + 1) * gate * sigmoid(alpha * gate)` with `alpha = activation_alpha`,
`limit = activation_limit`. Then `o = a @ down_weights[e] + down_bias[e]`.

**Combine**: `Y[t] = sum_j w[t, j] * o[t, j]` (`weight_position="output"`) or
`Y[t] = sum_j o[t, j]` (`"input"`: the weight already scaled the expert's input, as Llama-4;
biases, if any, are then added unscaled). Y has X's type; fp16/bf16 inputs are computed in
float32.

**Expert graph**: the optional graph attribute `expert` replaces the gated MLP by any expert
network. Its inputs, in order: `x` (X's type, `[n, H]`) and `expert_index` (int64 scalar);
one output `[n, H]` of X's type. It must be self-contained (its weights are initializers or
Constants inside it; it reads no outer-scope value) and row-wise (each output row depends only
on its input row). With `expert`, the weight inputs are unused and may be omitted. The
reference runs it per expert on that expert's tokens; the function body runs it on every
token for each expert in a `Loop` and keeps the routed ones (dense, portable, slow).
"""

SCHEMA = S.Schema(
    NAME, DOMAIN, DOMAIN_VERSION, DOC,
    inputs=[
        S.param("X", "T", "Token rows `[T, H]`."),
        S.param("router_logits", "U", "Router logits `[T, E]` (often float32 whatever T is)."),
        S.param("gate_up_weights", "T", "Fused gate and up projections `[E, H, N1]`, N1 = 2I when "
                "gated, I otherwise. Required unless `expert` is given.", optional=True),
        S.param("gate_up_bias", "T", "Bias of the gate/up projection `[E, N1]`.", optional=True),
        S.param("down_weights", "T", "Down projections `[E, I, H]`. Required unless `expert` is "
                "given.", optional=True),
        S.param("down_bias", "T", "Bias of the down projection `[E, H]`.", optional=True),
        S.param("selection_bias", "U", "Added to the scores to choose experts only `[E]`.", optional=True),
    ],
    outputs=[
        S.param("Y", "T", "The weighted sum of the chosen experts' outputs `[T, H]`."),
        S.param("topk_indices", "tensor(int64)", "Chosen experts per token `[T, k]`, best first.",
                optional=True),
        S.param("topk_weights", "tensor(float)", "Their routing weights `[T, k]` (float32).", optional=True),
    ],
    type_constraints=[
        ("T", S.FLOATS, "Activations and expert weights."),
        ("U", S.FLOATS, "Router logits and selection bias."),
    ],
    attributes=[
        S.attr("k", None, "Number of experts per token (required)."),
        S.attr("scoring", "softmax", "softmax | sigmoid: how logits become scores."),
        S.attr("normalize", 0, "1: divide the k weights by their sum."),
        S.attr("softmax_after_topk", 0, "1: choose on raw logits, softmax over the k chosen."),
        S.attr("n_group", 0, "Expert groups for group-limited routing (0: off)."),
        S.attr("topk_group", 0, "Groups kept in group-limited routing."),
        S.attr("group_scoring", "top2_sum", "top2_sum | max: a group's score."),
        S.attr("routed_scaling_factor", 1.0, "Multiplies the routing weights."),
        S.attr("activation", "silu", "silu | gelu | gelu_tanh | relu | swiglu_clamped."),
        S.attr("activation_alpha", 1.702, "swiglu_clamped: the sigmoid's scale."),
        S.attr("activation_limit", 7.0, "swiglu_clamped: the clamp limit."),
        S.attr("gated", 1, "1: gated MLP (act(gate) * up); 0: plain MLP (act(h))."),
        S.attr("gate_up_layout", "concatenated", "concatenated | interleaved columns of gate and up."),
        S.attr("weight_position", "output", "output | input: where the routing weight applies."),
        S.graph_attr("expert", "An expert network (x [n, H], expert_index) -> [n, H] replacing the "
                     "gated MLP."),
    ],
)

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
_I = {name: i for i, name in enumerate(
    ["X", "router_logits", "gate_up_weights", "gate_up_bias", "down_weights", "down_bias", "selection_bias"])}


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def check_attributes(k, scoring, softmax_after_topk, n_group, topk_group, group_scoring, activation,
                     gated, gate_up_layout, weight_position, num_experts=None) -> list[str]:
    """Every problem with the attributes (and E when known), as messages; empty when fine."""
    errors = []
    for name, value, allowed in (
        ("scoring", scoring, SCORINGS), ("group_scoring", group_scoring, GROUP_SCORINGS),
        ("activation", activation, ACTIVATIONS), ("gate_up_layout", gate_up_layout, LAYOUTS),
        ("weight_position", weight_position, WEIGHT_POSITIONS),
    ):
        if value not in allowed:
            errors.append(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")
    if k is None or k < 1:
        errors.append(f"k must be >= 1, got {k}")
    if softmax_after_topk and scoring != "softmax":
        errors.append("softmax_after_topk=1 needs scoring='softmax'")
    if activation == "swiglu_clamped" and not gated:
        errors.append("activation 'swiglu_clamped' needs gated=1")
    if n_group < 0 or topk_group < 0:
        errors.append(f"n_group and topk_group must be >= 0, got {n_group} and {topk_group}")
    elif n_group > 0:
        if topk_group < 1 or topk_group > n_group:
            errors.append(f"topk_group must lie in [1, n_group={n_group}], got {topk_group}")
    elif topk_group:
        errors.append(f"topk_group={topk_group} needs n_group > 0")
    if num_experts is not None and not errors:
        if k > num_experts:
            errors.append(f"k={k} exceeds the number of experts E={num_experts}")
        elif n_group > 0:
            if num_experts % n_group:
                errors.append(f"E={num_experts} experts do not split into n_group={n_group} groups")
            else:
                per_group = num_experts // n_group
                if group_scoring == "top2_sum" and per_group < 2:
                    errors.append(f"group_scoring 'top2_sum' needs >= 2 experts per group, got {per_group}")
                if k > topk_group * per_group:
                    errors.append(f"k={k} exceeds the {topk_group * per_group} experts of the "
                                  f"topk_group={topk_group} kept groups")
    return errors


# ---- shape and type inference ----------------------------------------------------------------

def infer(ctx) -> None:
    c = S.Inference(ctx, NAME)
    attrs = {name: c.attr(name, default) for name, default in _ATTR_DEFAULTS.items()}
    attrs = {name: _str(v) for name, v in attrs.items()}
    has_expert = ctx.get_attribute("expert") is not None
    x = c.rank(0, 2, "X")
    logits = c.rank(1, 2, "router_logits")
    dims = {name: c.rank(i, r, name) if c.has(i) else None for name, i, r in (
        ("gate_up_weights", 2, 3), ("gate_up_bias", 3, 2), ("down_weights", 4, 3), ("down_bias", 5, 2),
        ("selection_bias", 6, 1))}
    present = {name: c.has(i) for name, i in _I.items()}
    for name, i in _I.items():
        if present[name] and c.elem_type(i) and c.elem_type(i) not in _FLOAT_TYPES:
            c.fail(f"input {name!r} must be float, float16 or bfloat16, got element type {c.elem_type(i)}")
    for name in ("gate_up_weights", "gate_up_bias", "down_weights", "down_bias"):
        i = _I[name]
        if present[name] and c.elem_type(i) and c.elem_type(0) and c.elem_type(i) != c.elem_type(0):
            c.fail(f"input {name!r} must have X's type ({c.elem_type(0)}), got {c.elem_type(i)}")
    if present["selection_bias"] and c.elem_type(6) and c.elem_type(1) and c.elem_type(6) != c.elem_type(1):
        c.fail("selection_bias must have router_logits' type")
    if not has_expert:
        for name in ("gate_up_weights", "down_weights"):
            if not present[name]:
                c.fail(f"input {name!r} is required unless the 'expert' graph attribute is given")
    else:
        g = ctx.get_attribute("expert").g
        if len(g.input) != 2 or len(g.output) != 1:
            c.fail(f"the expert graph must have 2 inputs (x, expert_index) and 1 output, got "
                   f"{len(g.input)} and {len(g.output)}")
    num_experts = logits[1] if logits and S.static(logits[1]) else None
    errors = check_attributes(num_experts=num_experts, **{n: attrs[n] for n in _CHECKED})
    if errors:
        c.fail("; ".join(errors))

    def same(what, *pairs):
        known = [(v, src) for v, src in pairs if S.static(v)]
        for v, src in known[1:]:
            if v != known[0][0]:
                c.fail(f"{what} disagrees: {known[0][1]} has {known[0][0]} but {src} has {v}")
        return known[0][0] if known else None

    gu, gub, dw, db, sb = (dims[n] for n in ("gate_up_weights", "gate_up_bias", "down_weights", "down_bias",
                                              "selection_bias"))
    same("T (tokens)", (x and x[0], "X"), (logits and logits[0], "router_logits"))
    same("H (hidden size)", (x and x[1], "X"), (gu and gu[1], "gate_up_weights"),
         (dw and dw[2], "down_weights"), (db and db[1], "down_bias"))
    same("E (experts)", (logits and logits[1], "router_logits"), (gu and gu[0], "gate_up_weights"),
         (gub and gub[0], "gate_up_bias"), (dw and dw[0], "down_weights"), (db and db[0], "down_bias"),
         (sb and sb[0], "selection_bias"))
    n1 = same("N1 (gate/up width)", (gu and gu[2], "gate_up_weights"), (gub and gub[1], "gate_up_bias"))
    inter = dw[1] if dw and S.static(dw[1]) else None
    if n1 is not None and inter is not None:
        want = 2 * inter if attrs["gated"] else inter
        if n1 != want:
            c.fail(f"gate_up_weights has N1={n1} columns but down_weights has I={inter}; "
                   f"{'gated' if attrs['gated'] else 'non-gated'} experts need N1={want}")
    if n1 is not None and attrs["gated"] and n1 % 2:
        c.fail(f"gated experts need an even N1, got {n1}")
    tokens = (x and x[0]) if x and x[0] is not None else (logits and logits[0])
    c.set_output(0, c.elem_type(0), [tokens, x and x[1]] if x or logits else None)
    c.set_output(1, TensorProto.INT64, [tokens, attrs["k"]])
    c.set_output(2, TensorProto.FLOAT, [tokens, attrs["k"]])


_ATTR_DEFAULTS = {
    "k": None, "scoring": "softmax", "normalize": 0, "softmax_after_topk": 0, "n_group": 0,
    "topk_group": 0, "group_scoring": "top2_sum", "routed_scaling_factor": 1.0, "activation": "silu",
    "activation_alpha": 1.702, "activation_limit": 7.0, "gated": 1, "gate_up_layout": "concatenated",
    "weight_position": "output",
}
_CHECKED = ("k", "scoring", "softmax_after_topk", "n_group", "topk_group", "group_scoring", "activation",
            "gated", "gate_up_layout", "weight_position")


# ---- the math ---------------------------------------------------------------------------------

def _softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _top(x, k):
    """Indices of the k largest along the last axis, best first, ties to the lower index (TopK)."""
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


def route(router_logits, selection_bias=None, *, k, scoring="softmax", normalize=0, softmax_after_topk=0,
          n_group=0, topk_group=0, group_scoring="top2_sum", routed_scaling_factor=1.0):
    """The router, in float32: ``[T, E]`` logits -> (topk_indices int64 ``[T, k]``, topk_weights float32)."""
    logits = np.asarray(router_logits).astype(np.float32)
    if softmax_after_topk:
        scores = logits
    else:
        scores = _softmax(logits) if scoring == "softmax" else _sigmoid(logits)
    choice = scores if selection_bias is None else scores + np.asarray(selection_bias).astype(np.float32)
    if n_group > 0:
        tokens, experts = choice.shape
        grouped = choice.reshape(tokens, n_group, experts // n_group)
        if group_scoring == "max":
            group_scores = grouped.max(axis=-1)
        else:
            group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)
        kept = _top(group_scores, topk_group)
        keep = np.zeros(group_scores.shape, dtype=bool)
        np.put_along_axis(keep, kept, True, axis=-1)
        choice = np.where(keep[..., None], grouped, -np.inf).reshape(tokens, experts)
    indices = _top(choice, k).astype(np.int64)
    weights = np.take_along_axis(scores, indices, axis=-1)
    if softmax_after_topk:
        weights = _softmax(weights)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    weights = (weights * np.float32(routed_scaling_factor)).astype(np.float32)
    return indices, weights


_erf = np.vectorize(math.erf, otypes=[np.float64])


def activate(h, *, activation="silu", gated=1, gate_up_layout="concatenated", activation_alpha=1.702,
             activation_limit=7.0):
    """``[n, N1]`` gate/up projections -> ``[n, I]`` activations (float32)."""
    h = h.astype(np.float32)
    if gated:
        if gate_up_layout == "interleaved":
            gate, up = h[:, 0::2], h[:, 1::2]
        else:
            gate, up = np.split(h, 2, axis=-1)
    else:
        gate, up = h, None
    if activation == "swiglu_clamped":
        gate = np.minimum(gate, np.float32(activation_limit))
        up = np.clip(up, -np.float32(activation_limit), np.float32(activation_limit))
        return ((up + 1) * gate * _sigmoid(np.float32(activation_alpha) * gate)).astype(np.float32)
    if activation == "silu":
        a = gate * _sigmoid(gate)
    elif activation == "gelu":
        a = 0.5 * gate * (1.0 + _erf(gate / math.sqrt(2.0)))
    elif activation == "gelu_tanh":
        a = 0.5 * gate * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate**3)))
    else:
        a = np.maximum(gate, 0)
    a = a.astype(np.float32)
    return a * up if gated else a


def moe(X, router_logits, gate_up_weights=None, gate_up_bias=None, down_weights=None, down_bias=None,
        selection_bias=None, *, k, scoring="softmax", normalize=0, softmax_after_topk=0, n_group=0,
        topk_group=0, group_scoring="top2_sum", routed_scaling_factor=1.0, activation="silu",
        activation_alpha=1.702, activation_limit=7.0, gated=1, gate_up_layout="concatenated",
        weight_position="output", expert=None):
    """The MoE block in numpy: returns ``(Y [T, H], topk_indices [T, k], topk_weights [T, k])``.

    ``expert``, when given, is a callable ``(x [n, H], expert_index) -> [n, H]`` replacing the
    gated MLP.  Tokens are grouped per expert, so each expert's weights are touched once.
    """
    def fail(message):
        raise ValueError(f"MoE: {message}")

    scoring, group_scoring, activation, gate_up_layout, weight_position = map(
        _str, (scoring, group_scoring, activation, gate_up_layout, weight_position))
    X, router_logits = np.asarray(X), np.asarray(router_logits)
    arrays = {"X": X, "router_logits": router_logits, "gate_up_weights": gate_up_weights,
              "gate_up_bias": gate_up_bias, "down_weights": down_weights, "down_bias": down_bias,
              "selection_bias": selection_bias}
    ranks = {"X": 2, "router_logits": 2, "gate_up_weights": 3, "gate_up_bias": 2, "down_weights": 3,
             "down_bias": 2, "selection_bias": 1}
    for name, a in arrays.items():
        if a is None:
            continue
        if a.dtype not in (np.float32, np.float16) and a.dtype.name != "bfloat16":
            fail(f"input {name!r} must be float32, float16 or bfloat16, got {a.dtype}")
        if a.ndim != ranks[name]:
            fail(f"input {name!r} must have rank {ranks[name]}, got shape {a.shape}")
    for name in ("gate_up_weights", "gate_up_bias", "down_weights", "down_bias"):
        if arrays[name] is not None and arrays[name].dtype != X.dtype:
            fail(f"input {name!r} must have X's type {X.dtype}, got {arrays[name].dtype}")
    if expert is None and (gate_up_weights is None or down_weights is None):
        fail("gate_up_weights and down_weights are required unless the 'expert' graph is given")
    tokens, hidden = X.shape
    if router_logits.shape[0] != tokens:
        fail(f"T (tokens) disagrees: X has {tokens} rows but router_logits has {router_logits.shape[0]}")
    num_experts = router_logits.shape[1]
    errors = check_attributes(k, scoring, softmax_after_topk, n_group, topk_group, group_scoring, activation,
                              gated, gate_up_layout, weight_position, num_experts)
    if errors:
        fail("; ".join(errors))
    if selection_bias is not None and selection_bias.shape != (num_experts,):
        fail(f"E (experts) disagrees: router_logits has {num_experts} but selection_bias has shape "
             f"{selection_bias.shape}")
    if expert is None:
        e_, h_, n1 = gate_up_weights.shape
        e2, inter, h2 = down_weights.shape
        if e_ != num_experts or e2 != num_experts:
            fail(f"E (experts) disagrees: router_logits has {num_experts}, gate_up_weights {e_}, "
                 f"down_weights {e2}")
        if h_ != hidden or h2 != hidden:
            fail(f"H (hidden size) disagrees: X has {hidden}, gate_up_weights {h_}, down_weights {h2}")
        if n1 != (2 * inter if gated else inter):
            fail(f"gate_up_weights has N1={n1} columns but down_weights has I={inter}; "
                 f"{'gated' if gated else 'non-gated'} experts need N1={2 * inter if gated else inter}")
        if gate_up_bias is not None and gate_up_bias.shape != (num_experts, n1):
            fail(f"gate_up_bias must have shape {(num_experts, n1)}, got {gate_up_bias.shape}")
        if down_bias is not None and down_bias.shape != (num_experts, hidden):
            fail(f"down_bias must have shape {(num_experts, hidden)}, got {down_bias.shape}")

    indices, weights = route(
        router_logits, selection_bias, k=k, scoring=scoring, normalize=normalize,
        softmax_after_topk=softmax_after_topk, n_group=n_group, topk_group=topk_group,
        group_scoring=group_scoring, routed_scaling_factor=routed_scaling_factor)
    x32 = X.astype(np.float32)
    out = np.zeros((tokens, hidden), dtype=np.float32)
    for e in np.unique(indices):
        rows, slots = np.nonzero(indices == e)
        w = weights[rows, slots][:, None]
        xe = x32[rows] * w if weight_position == "input" else x32[rows]
        if expert is not None:
            oe = np.asarray(expert(xe.astype(X.dtype), int(e))).astype(np.float32)
        else:
            h = xe @ gate_up_weights[e].astype(np.float32)
            if gate_up_bias is not None:
                h = h + gate_up_bias[e].astype(np.float32)
            a = activate(h, activation=activation, gated=gated, gate_up_layout=gate_up_layout,
                         activation_alpha=activation_alpha, activation_limit=activation_limit)
            oe = a @ down_weights[e].astype(np.float32)
            if down_bias is not None:
                oe = oe + down_bias[e].astype(np.float32)
        np.add.at(out, rows, oe if weight_position == "input" else oe * w)
    return out.astype(X.dtype), indices, weights


class MoE(OpRun):
    op_domain = DOMAIN

    def _run(self, X, router_logits, gate_up_weights=None, gate_up_bias=None, down_weights=None,
             down_bias=None, selection_bias=None, expert=None, attributes=None, context=None, bindings=None,
             **attrs):
        call = None
        if expert is not None:
            names = expert.input_names
            call = lambda x, e: expert.run(None, {names[0]: x, names[1]: np.array(e, np.int64)})[0]  # noqa: E731
        return moe(X, router_logits, gate_up_weights, gate_up_bias, down_weights, down_bias, selection_bias,
                   expert=call, **attrs)


# ---- the function body ------------------------------------------------------------------------

def body(op, inputs, attrs):
    """route -> GroupedMatMul -> activation -> GroupedMatMul -> weighted combine (or a Loop of `expert`)."""
    x, logits, gate_up, gate_up_bias, down, down_bias, selection_bias = (list(inputs) + [None] * 7)[:7]
    a = {name: _str(attrs.get(name, default)) if attrs.get(name) is not None else default
         for name, default in _ATTR_DEFAULTS.items()}
    a["k"] = attrs["k"]
    errors = check_attributes(**{n: a[n] for n in _CHECKED})
    if errors:
        raise ValueError("MoE: " + "; ".join(errors))
    expert = attrs.get("expert")
    if expert is None and (gate_up is None or down is None):
        raise ValueError("MoE: gate_up_weights and down_weights are required unless the 'expert' graph is given")
    dtype = x.type.dtype if x.type is not None else ir.DataType.FLOAT
    low = dtype != ir.DataType.FLOAT
    f32 = TensorProto.FLOAT

    indices, weights = _route_body(op, logits, selection_bias, a)
    needs_f32 = low and a["weight_position"] == "input"
    x32 = op.Cast(x, to=f32) if needs_f32 else x
    if expert is not None:
        y32 = _expert_loop(op, x, x32, logits, indices, weights, expert, a, dtype)
    else:
        y32 = _mlp_body(op, x, x32, indices, weights, gate_up, gate_up_bias, down, down_bias, a, dtype)
    y = op.Cast(y32, to=dtype.value) if low else y32
    return [y, indices, weights]


def _route_body(op, logits, selection_bias, a):
    f32 = TensorProto.FLOAT
    logits = op.Cast(logits, to=f32)
    if a["softmax_after_topk"]:
        scores = logits
    elif a["scoring"] == "softmax":
        scores = op.Softmax(logits, axis=-1)
    else:
        scores = op.Sigmoid(logits)
    choice = scores if selection_bias is None else op.Add(scores, op.Cast(selection_bias, to=f32))
    if a["n_group"] > 0:
        grouped = op.Reshape(choice, op.ints(0, a["n_group"], -1))  # [T, G, E/G]
        if a["group_scoring"] == "max":
            group_scores = op.ReduceMax(grouped, op.ints(-1), keepdims=0)
        else:
            best2, _ = op.TopK(grouped, op.ints(2), axis=-1, _outputs=2)
            group_scores = op.ReduceSum(best2, op.ints(-1), keepdims=0)
        _, kept = op.TopK(group_scores, op.ints(a["topk_group"]), axis=-1, _outputs=2)
        zeros = op.ConstantOfShape(op.Shape(group_scores), value=ir.tensor(np.zeros(1, np.float32)))
        ones = op.Expand(op.const(np.float32(1.0)), op.Shape(kept))
        keep = op.Greater(op.ScatterElements(zeros, kept, ones, axis=1), op.const(np.float32(0.5)))
        masked = op.Where(op.Unsqueeze(keep, op.ints(-1)), grouped, op.const(np.float32(-np.inf)))
        choice = op.Reshape(masked, op.Shape(choice))
    _, indices = op.TopK(choice, op.ints(a["k"]), axis=-1, _outputs=2)
    weights = op.GatherElements(scores, indices, axis=1)
    if a["softmax_after_topk"]:
        weights = op.Softmax(weights, axis=-1)
    if a["normalize"]:
        weights = op.Div(weights, op.ReduceSum(weights, op.ints(-1), keepdims=1))
    if float(a["routed_scaling_factor"]) != 1.0:
        weights = op.Mul(weights, op.const(np.float32(a["routed_scaling_factor"])))
    return indices, weights


def _activation_body(op, h, a):
    """``[R, N1]`` float32 -> ``[R, I]`` float32."""
    if a["gated"]:
        if a["gate_up_layout"] == "interleaved":
            big = op.ints(np.iinfo(np.int64).max)
            gate = op.Slice(h, op.ints(0), big, op.ints(1), op.ints(2))
            up = op.Slice(h, op.ints(1), big, op.ints(1), op.ints(2))
        else:
            gate, up = op.Split(h, axis=1, num_outputs=2, _outputs=2)
    else:
        gate, up = h, None
    act = a["activation"]
    if act == "swiglu_clamped":
        limit = np.float32(a["activation_limit"])
        gate = op.Min(gate, op.const(limit))
        up = op.Clip(up, op.const(-limit), op.const(limit))
        glu = op.Mul(gate, op.Sigmoid(op.Mul(gate, op.const(np.float32(a["activation_alpha"])))))
        return op.Mul(op.Add(up, op.const(np.float32(1.0))), glu)
    if act == "silu":
        out = op.Mul(gate, op.Sigmoid(gate))
    elif act == "gelu":
        out = op.Gelu(gate)
    elif act == "gelu_tanh":
        out = op.Gelu(gate, approximate="tanh")
    else:
        out = op.Relu(gate)
    return op.Mul(out, up) if a["gated"] else out


def _mlp_body(op, x, x32, indices, weights, gate_up, gate_up_bias, down, down_bias, a, dtype):
    f32, low = TensorProto.FLOAT, dtype != ir.DataType.FLOAT
    flat_indices = op.Reshape(indices, op.ints(-1, 1))  # [T*k, 1]
    if a["weight_position"] == "input":
        scaled = op.Mul(op.Unsqueeze(x32, op.ints(1)), op.Unsqueeze(weights, op.ints(-1)))  # [T, k, H]
        rows = op.Reshape(scaled, op.Concat(op.ints(-1), op.Shape(x, start=1), axis=0))
        rows = op.Cast(rows, to=dtype.value) if low else rows
        h = op.GroupedMatMul(rows, gate_up, flat_indices, gate_up_bias, _domain=DOMAIN)  # [T*k, 1, N1]
    else:
        h = op.GroupedMatMul(x, gate_up, indices, gate_up_bias, _domain=DOMAIN)  # [T, k, N1]
    h = op.Flatten(h, axis=2)  # [T*k, N1]
    act = _activation_body(op, op.Cast(h, to=f32) if low else h, a)
    act = op.Cast(act, to=dtype.value) if low else act
    out = op.GroupedMatMul(act, down, flat_indices, down_bias, _domain=DOMAIN)  # [T*k, 1, H]
    out = op.Cast(out, to=f32) if low else out
    out = op.Reshape(out, op.Concat(op.Shape(indices), op.ints(-1), axis=0))  # [T, k, H]
    if a["weight_position"] == "output":
        out = op.Mul(out, op.Unsqueeze(weights, op.ints(-1)))
    return op.ReduceSum(out, op.ints(1), keepdims=0)


def _expert_loop(op, x, x32, logits, indices, weights, expert, a, dtype):
    """A Loop over the E experts; each runs `expert` on every token, the routed ones are kept."""
    f32, low = TensorProto.FLOAT, dtype != ir.DataType.FLOAT
    shape_te = op.Shape(logits)
    zeros = op.ConstantOfShape(shape_te, value=ir.tensor(np.zeros(1, np.float32)))
    dense_w = op.ScatterElements(zeros, indices, weights, axis=1)  # [T, E]
    dense_m = op.ScatterElements(zeros, indices, op.Expand(op.const(np.float32(1.0)), op.Shape(indices)), axis=1)
    acc0 = op.ConstantOfShape(op.Shape(x), value=ir.tensor(np.zeros(1, np.float32)))
    trips = op.Gather(shape_te, op.ints(1))
    trips = op.Squeeze(trips, op.ints(0))

    tape = Tape()
    inner = OpBuilder(tape)
    it = ir.Value(name="expert_index", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    cond = ir.Value(name="cond_in", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    acc = ir.Value(name="acc_in", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([None, None]))
    w_col = inner.Unsqueeze(inner.Gather(dense_w, it, axis=1), inner.ints(-1))  # [T, 1]
    if a["weight_position"] == "input":
        xin = inner.Mul(x32, w_col)
        xin = inner.Cast(xin, to=dtype.value) if low else xin
        keep = inner.Unsqueeze(inner.Gather(dense_m, it, axis=1), inner.ints(-1))
    else:
        xin, keep = x, w_col
    pre_nodes = list(tape.nodes)

    graph = expert.clone()
    x_formal, index_formal = graph.inputs
    result = graph.outputs[0]
    consts = []
    for init in list(graph.initializers.values()):
        node = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", init.const_value)])
        init.replace_all_uses_with(node.outputs[0])
        if result is init:
            result = node.outputs[0]
        consts.append(node)
    x_formal.replace_all_uses_with(xin)
    index_formal.replace_all_uses_with(it)
    result = {id(x_formal): xin, id(index_formal): it}.get(id(result), result)
    expert_nodes = list(graph)
    graph.outputs.clear()
    graph.remove(expert_nodes, safe=False)

    tape2 = Tape()
    post = OpBuilder(tape2)
    y = post.Cast(result, to=f32) if low else result
    acc_out = post.Add(acc, post.Mul(y, keep))
    cond_out = post.Identity(cond)
    loop_body = ir.Graph(
        [it, cond, acc], [cond_out, acc_out], nodes=pre_nodes + consts + expert_nodes + list(tape2.nodes),
        name="moe_expert_loop",
    )
    return op.Loop(trips, op.const(np.bool_(True)), acc0, body=loop_body)


EXAMPLE = '''\
import numpy as np
import onnxgen
from onnxgen.testing import single_node_model, run_reference, run_expanded_on_ort

rng = np.random.default_rng(0)
tokens, hidden, experts, inter = 5, 16, 8, 24
inputs = {
    "X": rng.standard_normal((tokens, hidden)).astype(np.float32),
    "router_logits": rng.standard_normal((tokens, experts)).astype(np.float32),
    "gate_up_weights": rng.standard_normal((experts, hidden, 2 * inter)).astype(np.float32) * 0.2,
    "gate_up_bias": None,
    "down_weights": rng.standard_normal((experts, inter, hidden)).astype(np.float32) * 0.2,
}
# Mixtral's routing: softmax over all experts, top-2, renormalised; SiLU-gated experts.
model = single_node_model("MoE", inputs, ["Y", "topk_indices", "topk_weights"], k=2, normalize=1)
y, chosen, weights = run_reference(model, inputs)
y_ort, chosen_ort, _ = run_expanded_on_ort(model, inputs)
assert y.shape == (tokens, hidden) and np.allclose(y, y_ort, atol=1e-4)
assert (chosen == chosen_ort).all() and np.allclose(weights.sum(axis=1), 1.0)
'''
