"""Hugging Face MoE blocks -> the onnxgen.preview ``MoE`` operator (torch-free).

``moe_from_hf(model_type, config, weights, prefix)`` reads one sparse-MoE block's state dict
(numpy arrays, as ``{k: v.detach().numpy() for k, v in block.state_dict().items()}`` gives it)
and returns an :class:`MoEBlock`: the router projection, the MoE node's inputs and attributes
and the shared expert, if the family has one.  ``build_moe_block_model`` turns a block into a
runnable ONNX model.  docs/MoE-families.md lists the families covered and those the operator
cannot express, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ops.domain import DOMAIN, DOMAIN_VERSION

OPSET = 25
MOE_INPUTS = ("gate_up_weights", "gate_up_bias", "down_weights", "down_bias", "selection_bias")

# Hugging Face ACT2FN names -> the MoE operator's activation attribute.
HF_ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
    "relu": "relu",
}


@dataclass
class SharedExpert:
    """An ordinary MLP added to the routed output: ``down(act(x @ gate) * (x @ up))``.

    Weights in ``x @ W`` layout; ``sigmoid_gate [H, 1]`` scales the output by
    ``sigmoid(x @ sigmoid_gate)`` (Qwen2-MoE, Qwen3-Next).
    """

    gate_proj: np.ndarray | None  # [H, Is]; None for a non-gated MLP
    up_proj: np.ndarray  # [H, Is]
    down_proj: np.ndarray  # [Is, H]
    activation: str = "silu"
    gate_bias: np.ndarray | None = None
    up_bias: np.ndarray | None = None
    down_bias: np.ndarray | None = None
    sigmoid_gate: np.ndarray | None = None
    scale: float = 1.0  # multiplies the shared output (Cohere2-MoE's "average" strategy: 0.5)


@dataclass
class MoEBlock:
    """Everything an exporter needs to emit one MoE block."""

    family: str
    router_weight: np.ndarray  # [H, E]: router_logits = x @ router_weight (+ router_bias), in float32
    router_bias: np.ndarray | None
    inputs: dict[str, np.ndarray | None]  # the MoE node's inputs after X and router_logits, by name
    attributes: dict[str, Any]
    shared: SharedExpert | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def hidden_size(self) -> int:
        return self.router_weight.shape[0]

    @property
    def num_experts(self) -> int:
        return self.router_weight.shape[1]


# ---- config access ------------------------------------------------------------------------------

def _get(config, *names, default=None):
    for name in names:
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        if value is not None:
            return value
    return default


def _activation(config, default="silu") -> str:
    name = _get(config, "hidden_act", "hidden_activation", default=default)
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"moe_from_hf: activation {name!r} has no MoE equivalent "
                         f"(known: {', '.join(HF_ACTIVATIONS)})")
    return HF_ACTIVATIONS[name]


def _k(config, layer_idx):
    k = _get(config, "num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k")
    if isinstance(k, (list, tuple)):
        if layer_idx is None:
            raise ValueError("moe_from_hf: the config gives k per layer; pass layer_idx")
        k = k[layer_idx]
    if k is None:
        raise ValueError("moe_from_hf: the config names no number of experts per token")
    return int(k)


# ---- routing per family ------------------------------------------------------------------------

_NORM = ("norm_topk_prob", "moe_renormalize")  # config names (and aliases) of "renormalise the k weights"


def _softmax_topk(normalize: Callable[[Any], bool]):
    def attrs(config):
        return {"scoring": "softmax", "normalize": int(bool(normalize(config)))}
    return attrs


def _deepseek_v3(config):
    n_group = int(_get(config, "n_group", "num_expert_group", default=1) or 1)
    return {
        "scoring": "sigmoid", "normalize": int(bool(_get(config, *_NORM, default=False))),
        "n_group": n_group, "topk_group": int(_get(config, "topk_group", default=n_group) or n_group),
        "group_scoring": "top2_sum", "routed_scaling_factor": float(_get(config, "routed_scaling_factor", default=1.0)),
    }


def _deepseek_v2(config):
    method = _get(config, "topk_method", default="greedy")
    attrs = {"scoring": "softmax", "normalize": 0,  # the V2 router ignores norm_topk_prob
             "routed_scaling_factor": float(_get(config, "routed_scaling_factor", default=1.0))}
    if method == "group_limited_greedy":
        attrs.update(n_group=int(config_get_required(config, "n_group")),
                     topk_group=int(config_get_required(config, "topk_group")), group_scoring="max")
    elif method != "greedy":
        raise ValueError(f"moe_from_hf: deepseek_v2 topk_method {method!r} is not supported")
    return attrs


def _sigmoid_biased(normalize=lambda c: True, scale=("routed_scaling_factor",)):
    """Sigmoid scores, a selection bias, optional renormalisation and scaling, no groups."""
    def attrs(config):
        return {"scoring": "sigmoid", "normalize": int(bool(normalize(config))),
                "routed_scaling_factor": float(_get(config, *scale, default=1.0))}
    return attrs


def _mistral4(config):
    return {**_deepseek_v3(config), "scoring": "softmax"}  # groups on softmax scores, no selection bias


def _cohere2_moe(config):
    function = _get(config, "expert_selection_fn", default="softmax")
    if function == "softmax":
        attrs = {"scoring": "softmax", "softmax_after_topk": 1}
    elif function == "sigmoid":  # sigmoid is monotonic: top-k on logits = top-k on sigmoid scores
        attrs = {"scoring": "sigmoid", "normalize": int(bool(_get(config, "norm_topk_prob", default=False)))}
    else:
        raise ValueError(f"moe_from_hf: cohere2_moe expert_selection_fn {function!r} is not supported")
    if _get(config, "shared_expert_combination_strategy", default="sum") == "average" and \
            (_get(config, "num_shared_experts", default=0) or 0) > 0:
        attrs["routed_scaling_factor"] = 0.5
    return attrs


def config_get_required(config, name):
    value = _get(config, name)
    if value is None:
        raise ValueError(f"moe_from_hf: the config lacks {name!r}")
    return value


@dataclass(frozen=True)
class Family:
    """Where a family keeps its weights and how it routes."""

    routing: Callable[[Any], dict]
    router: str = "gate"  # module holding weight [E, H] (and maybe bias [E])
    transposed: bool = False  # experts stored [E, H, 2I] / [E, I, H] (x @ W) rather than [E, 2I, H]
    shared: str | None = None  # shared-expert MLP module
    shared_gate: str | None = None  # Linear(H, 1) whose sigmoid scales the shared expert
    selection_bias: str | None = None
    extra: Callable[[Any], dict] = lambda config: {}
    oracle: str = ""  # the transformers module the tests compare with


_norm = _softmax_topk(lambda c: _get(c, *_NORM, default=False))
_always = _softmax_topk(lambda c: True)
_never = _softmax_topk(lambda c: False)


def _softmax_after_topk(config) -> dict:
    """gpt-oss and Granite: top-k on the raw logits, softmax over the k chosen."""
    return {"scoring": "softmax", "softmax_after_topk": 1}


def _deepseek_v3_like(oracle: str, shared: str | None = "shared_experts") -> "Family":
    """DeepSeek-V3's router (group-limited sigmoid, correction bias) as its descendants reuse it."""
    return Family(_deepseek_v3, shared=shared, selection_bias="gate.e_score_correction_bias", oracle=oracle)


FAMILIES: dict[str, Family] = {
    "mixtral": Family(_always, oracle="MixtralSparseMoeBlock"),
    "minimax": Family(_always, oracle="MiniMaxSparseMoeBlock"),
    "jamba": Family(_never, router="router", oracle="JambaSparseMoeBlock"),
    "qwen2_moe": Family(_norm, shared="shared_expert", shared_gate="shared_expert_gate",
                        oracle="Qwen2MoeSparseMoeBlock"),
    "qwen3_moe": Family(_norm, oracle="Qwen3MoeSparseMoeBlock"),
    "qwen3_next": Family(_norm, shared="shared_expert", shared_gate="shared_expert_gate",
                         oracle="Qwen3NextSparseMoeBlock"),
    "olmoe": Family(_norm, oracle="OlmoeSparseMoeBlock"),
    "flex_olmo": Family(_norm, oracle="FlexOlmoSparseMoeBlock"),
    "hunyuan_v1_moe": Family(_always, router="gate.wg", shared="shared_mlp", oracle="HunYuanMoEV1Moe"),
    "granitemoe": Family(_softmax_after_topk, router="router", oracle="GraniteMoeMoE"),
    "gpt_oss": Family(
        _softmax_after_topk, router="router", transposed=True,
        extra=lambda c: {"activation": "swiglu_clamped", "gate_up_layout": "interleaved",
                         "activation_alpha": float(_get(c, "swiglu_alpha", default=1.702)),
                         "activation_limit": float(_get(c, "swiglu_limit", default=7.0))},
        oracle="GptOssMLP"),
    "deepseek_v3": _deepseek_v3_like("DeepseekV3MoE"),
    "glm4_moe": _deepseek_v3_like("Glm4MoeMoE"),
    "dots1": _deepseek_v3_like("Dots1MoE"),
    "deepseek_v2": Family(_deepseek_v2, shared="shared_experts", oracle="DeepseekV2Moe"),
    "ernie4_5_moe": Family(_always, shared="shared_experts",
                           selection_bias="gate.moe_statics.e_score_correction_bias",
                           oracle="Ernie4_5_MoeSparseMoeBlock"),
    "qwen3_vl_moe_text": Family(_always, oracle="Qwen3VLMoeTextSparseMoeBlock"),
    "qwen3_5_moe_text": Family(_always, shared="shared_expert", shared_gate="shared_expert_gate",
                               oracle="Qwen3_5MoeSparseMoeBlock"),
    # The shared MLP of these Granite variants sits in the decoder layer, outside the MoE block.
    "granitemoeshared": Family(_softmax_after_topk, router="router", oracle="GraniteMoeSharedMoE"),
    "granitemoehybrid": Family(_softmax_after_topk, router="router", oracle="GraniteMoeHybridMoE"),
    "exaone_moe": _deepseek_v3_like("ExaoneMoeSparseMoEBlock"),
    "kimi_linear": _deepseek_v3_like("KimiLinearMoE"),
    "glm4_moe_lite": _deepseek_v3_like("Glm4MoeLiteMoE"),
    "mimo_v2_flash": _deepseek_v3_like("MiMoV2FlashMoE", shared=None),
    "solar_open": _deepseek_v3_like("SolarOpenMoE"),
    "mistral4": Family(_mistral4, shared="shared_experts", oracle="Mistral4MoE"),
    "minimax_m2": Family(_sigmoid_biased(), selection_bias="e_score_correction_bias",
                         oracle="MiniMaxM2SparseMoeBlock"),
    "hy_v3": Family(_sigmoid_biased(scale=("router_scaling_factor",)), shared="shared_experts",
                    selection_bias="e_score_correction_bias", oracle="HYV3MoE"),
    "lfm2_moe": Family(_sigmoid_biased(lambda c: _get(c, "norm_topk_prob", default=False)),
                       selection_bias="expert_bias", oracle="Lfm2MoeSparseMoeBlock"),
    "afmoe": Family(_sigmoid_biased(scale=("route_scale",)), router="router.gate", shared="shared_experts",
                    selection_bias="expert_bias", oracle="AfmoeSparseMoeBlock"),
    "cohere2_moe": Family(_cohere2_moe, shared="shared_experts", oracle="Cohere2MoeSparseMoeBlock"),
    "llama4_text": Family(lambda c: {"scoring": "sigmoid", "weight_position": "input"}, router="router",
                          transposed=True, shared="shared_expert", oracle="Llama4TextMoe"),
}
FAMILIES["llama4"] = FAMILIES["llama4_text"]


def moe_from_hf(model_type: str, config, weights: Mapping[str, np.ndarray], prefix: str = "",
                layer_idx: int | None = None) -> MoEBlock:
    """Map one Hugging Face sparse-MoE block to the MoE operator.

    ``config``: the model's config as a dict (``config.to_dict()``) or the config object;
    ``weights``: the block's state dict as numpy arrays, keys relative to ``prefix``
    (e.g. ``"model.layers.3.mlp."``).  Raises ValueError for families the operator cannot
    express (see docs/MoE-families.md) and for weights that are missing or misshapen.
    """
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"moe_from_hf: no MoE mapping for model_type {model_type!r}; known: "
                         f"{', '.join(sorted(FAMILIES))} (docs/MoE-families.md lists the others and why)")

    def w(name, required=True):
        key = prefix + name
        if key not in weights:
            if required:
                raise ValueError(f"moe_from_hf({model_type}): missing weight {key!r}")
            return None
        return np.asarray(weights[key])

    router = w(family.router + ".weight")  # [E, H]
    router_bias = w(family.router + ".bias", required=False)
    num_experts, hidden = router.shape
    gate_up = w("experts.gate_up_proj")
    down = w("experts.down_proj")
    if not family.transposed:  # nn.functional.linear layout [E, out, in] -> x @ W layout [E, in, out]
        gate_up, down = gate_up.transpose(0, 2, 1), down.transpose(0, 2, 1)
    if gate_up.shape[:2] != (num_experts, hidden) or down.shape[0] != num_experts or down.shape[2] != hidden:
        raise ValueError(f"moe_from_hf({model_type}): expert weights {gate_up.shape} / {down.shape} do not fit "
                         f"E={num_experts}, H={hidden}")
    selection_bias = None
    if family.selection_bias:
        found = w(family.selection_bias, required=False)  # absent when the family's config turns it off
        selection_bias = None if found is None else found.astype(np.float32).reshape(-1)
    attributes = {"k": _k(config, layer_idx), "activation": _activation(config)}
    attributes.update(family.routing(config))
    attributes.update(family.extra(config))
    inputs = {
        "gate_up_weights": np.ascontiguousarray(gate_up),
        "gate_up_bias": w("experts.gate_up_proj_bias", required=False),
        "down_weights": np.ascontiguousarray(down),
        "down_bias": w("experts.down_proj_bias", required=False),
        "selection_bias": selection_bias,
    }
    shared = None
    if family.shared:
        def lin(name, required=True):
            weight = w(f"{family.shared}.{name}.weight", required)
            return None if weight is None else np.ascontiguousarray(weight.T)

        def bias(name):
            return w(f"{family.shared}.{name}.bias", required=False)

        if prefix + f"{family.shared}.up_proj.weight" in weights:
            gate_weight = None
            if family.shared_gate:
                gate_weight = np.ascontiguousarray(w(f"{family.shared_gate}.weight").T)  # [H, 1]
            shared = SharedExpert(lin("gate_proj"), lin("up_proj"), lin("down_proj"), _activation(config),
                                  bias("gate_proj"), bias("up_proj"), bias("down_proj"), gate_weight,
                                  0.5 if attributes.get("routed_scaling_factor") == 0.5 and model_type == "cohere2_moe"
                                  else 1.0)
    return MoEBlock(model_type, np.ascontiguousarray(router.T).astype(np.float32),
                    None if router_bias is None else router_bias.astype(np.float32), inputs, attributes, shared)


# ---- an ONNX model of the block ----------------------------------------------------------------

def build_moe_block_model(block: MoEBlock, dtype=np.float32, opset: int = OPSET) -> onnx.ModelProto:
    """``X [T, H] -> Y [T, H]`` (plus ``topk_indices`` and ``topk_weights``): router MatMul in
    float32, the MoE node, and the shared expert as ordinary ops.  Expert and shared weights
    are stored in ``dtype``; the router and the selection bias stay float32."""
    dtype = np.dtype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name, array, as_dtype=None):
        inits.append(numpy_helper.from_array(np.asarray(array).astype(as_dtype or dtype), name))
        return name

    def node(op, inputs, outputs, **attrs):
        nodes.append(helper.make_node(op, inputs, outputs, **attrs))
        return outputs[0]

    x = "X"
    x32 = x if dtype == np.float32 else node("Cast", [x], ["X_f32"], to=TensorProto.FLOAT)
    logits = node("MatMul", [x32, init("router_weight", block.router_weight, np.float32)], ["router_logits"])
    if block.router_bias is not None:
        logits = node("Add", [logits, init("router_bias", block.router_bias, np.float32)], ["router_logits_b"])
    moe_inputs = [x, logits]
    for name in MOE_INPUTS:
        array = block.inputs.get(name)
        if array is None:
            moe_inputs.append("")
        else:
            moe_inputs.append(init(name, array, np.float32 if name == "selection_bias" else None))
    while moe_inputs[-1] == "":
        moe_inputs.pop()
    y = "Y" if block.shared is None else "Y_routed"
    nodes.append(helper.make_node("MoE", moe_inputs, [y, "topk_indices", "topk_weights"], domain=DOMAIN,
                                  name="moe", **block.attributes))
    if block.shared is not None:
        s = block.shared

        def linear(inp, name, weight, bias):
            out = node("MatMul", [inp, init(f"shared_{name}", weight)], [f"shared_{name}_mm"])
            if bias is not None:
                out = node("Add", [out, init(f"shared_{name}_bias", bias)], [f"shared_{name}_out"])
            return out

        up = linear(x, "up", s.up_proj, s.up_bias)
        pre = linear(x, "gate", s.gate_proj, s.gate_bias) if s.gate_proj is not None else up
        act = _activation_nodes(node, pre, s.activation, "shared_act")
        hidden = node("Mul", [act, up], ["shared_hidden"]) if s.gate_proj is not None else act
        out = linear(hidden, "down", s.down_proj, s.down_bias)
        if s.sigmoid_gate is not None:
            g = node("Sigmoid", [node("MatMul", [x, init("shared_sigmoid_gate", s.sigmoid_gate)], ["shared_g"])],
                     ["shared_g_sig"])
            out = node("Mul", [out, g], ["shared_gated"])
        if s.scale != 1.0:
            out = node("Mul", [out, init("shared_scale", np.array(s.scale))], ["shared_scaled"])
        node("Add", [y, out], ["Y"])
    graph = helper.make_graph(
        nodes, f"{block.family}_moe_block",
        [helper.make_tensor_value_info("X", elem, ["T", block.hidden_size])],
        [helper.make_tensor_value_info("Y", elem, ["T", block.hidden_size]),
         helper.make_tensor_value_info("topk_indices", TensorProto.INT64, ["T", block.attributes["k"]]),
         helper.make_tensor_value_info("topk_weights", TensorProto.FLOAT, ["T", block.attributes["k"]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])


def _activation_nodes(node, x, activation, name):
    if activation == "silu":
        return node("Mul", [x, node("Sigmoid", [x], [f"{name}_sig"])], [name])
    if activation == "gelu":
        return node("Gelu", [x], [name])
    if activation == "gelu_tanh":
        return node("Gelu", [x], [name], approximate="tanh")
    if activation == "relu":
        return node("Relu", [x], [name])
    raise ValueError(f"no standard-op form for the shared expert's activation {activation!r}")
