"""Decoder LLMs from Hugging Face checkpoints to ONNX models with the paged signature.

The graph uses standard ONNX where it serves (Gather, RMSNormalization, RotaryEmbedding, MatMul)
and ``onnxgen.preview.PagedAttention`` / ``onnxgen.preview.MoE`` for attention and experts.
Families: Llama, Mistral (sliding window), Qwen2 (qkv bias, windows on some layers), Qwen3 (q/k
norm), Phi-3 (fused qkv and gate_up), Gemma (norm offsets, scaled embeddings, GeGLU), Gemma 2 (+
soft caps, alternating sliding window, sandwich norms), Gemma 3 (+ q/k norm, a RoPE table per
kind of layer), Granite (embedding, attention, residual
and logit multipliers), OLMo 2 (post-norms, whole-projection q/k norm), SmolLM3 (no RoPE on some
layers), Mixtral, Qwen2-MoE (sigmoid-gated shared expert), Qwen3-MoE, OLMoE, gpt-oss (attention
sinks, alternating sliding window, YaRN, clamped SwiGLU experts with biases).  The signature (docs/PagedSignature.md):

    inputs   input_ids int64 [num_tokens], position_ids int64 [num_tokens],
             cumulative_sequence_length int32 [B+1], past_seqlens int32 [B],
             block_table int32 [B, max_blocks], slot_mapping int32 [num_tokens],
             key_cache.{i}, value_cache.{i} [num_blocks, block_size, kv_heads, head_dim]
    outputs  logits [B, vocab] (last token of each sequence; [num_tokens, vocab] with all_logits),
             key_cache_out.{i}, value_cache_out.{i}
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from ..ops.domain import DOMAIN, DOMAIN_VERSION
from .checkpoint import Checkpoint
from .graph import ExternalWeights, GraphBuilder
from .rope import rope_caches, rope_parameters

OPSET = 24
# Weight (and KV cache) types.  Activations stay float32: large weights are stored in the chosen
# type and cast where they are used; norms, RoPE tables and sinks stay float32 (they are small).
DTYPES = {
    "float32": (np.dtype(np.float32), TensorProto.FLOAT),
    "float16": (np.dtype(np.float16), TensorProto.FLOAT16),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), TensorProto.BFLOAT16),
}


@dataclass
class Architecture:
    """What the graph needs from a config, whatever the family."""

    family: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    rope: dict  # rope_type (default | yarn), rope_theta and the YaRN parameters
    max_positions: int
    attention_bias: bool = False  # q/k/v projections with biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    sinks: bool = False  # a learned sink logit per head (gpt-oss)
    tied_embeddings: bool = False
    # Per layer: a query sees the last `window` positions (itself included); None = unbounded.
    layer_windows: list[int | None] = field(default_factory=list)
    activation: str = "silu"  # of the gated MLP: silu | gelu_tanh
    fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj
    rotary_dim: int | None = None  # partial rotary (Phi-3 style); None = the whole head
    # Gemma 2: RMSNorm weights are offsets from 1, embeddings scaled, four norms per layer, soft caps.
    norm_offset: bool = False
    embed_scale: float | None = None
    sandwich_norms: bool = False
    attention_scale: float | None = None  # None = 1/sqrt(head_dim)
    attention_softcap: float = 0.0
    final_softcap: float = 0.0
    # Granite: sublayer outputs scaled before the residual add; logits divided by a constant.
    residual_scale: float = 1.0
    logits_divisor: float = 1.0
    # Per layer: whether RoPE is applied (SmolLM3 leaves it out of every fourth layer); empty = all.
    rope_layers: list[bool] = field(default_factory=list)
    # OLMo 2 / OLMoE: RMSNorm over the whole q and k projections (not per head).
    qk_norm_full: bool = False
    # OLMo 2: no norms before the sublayers; their outputs are normed before the residual add.
    post_norms: bool = False
    # Gemma 3: RoPE parameters per kind of layer ("sliding_attention", "full_attention"); empty = ``rope``.
    rope_by_kind: dict = field(default_factory=dict)
    layer_kinds: list[str] = field(default_factory=list)


def architecture(config: dict) -> Architecture:
    """Read the config of a supported family; a clear error for anything else."""
    family = config.get("model_type")
    if family not in SUPPORTED:
        raise NotImplementedError(
            f"architecture {family!r} is not supported; supported: {', '.join(sorted(SUPPORTED))}"
        )
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    layers = config["num_hidden_layers"]
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if family in ("qwen2", "qwen2_moe", "smollm3") and not config.get("use_sliding_window"):
        window = None  # these configs carry a sliding_window they do not use
    if layer_types and window:  # transformers' per-layer kinds (Gemma 2, gpt-oss, Qwen2 max_window_layers, ...)
        windows = [window if kind == "sliding_attention" else None for kind in layer_types]
    elif family in ("mistral", "mixtral", "phi3") and window:
        windows = [window] * layers
    else:
        windows = [None] * layers
    no_rope = config.get("no_rope_layers") if family == "smollm3" else None
    partial = (config.get("rope_parameters") or {}).get("partial_rotary_factor") or config.get("partial_rotary_factor")
    rotary_dim = int(head_dim * partial) if partial and partial != 1.0 else None
    activation = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    activations = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
    if activation not in activations:
        raise NotImplementedError(f"{family}: MLP activation {activation!r} is not supported")
    gemma = family in ("gemma", "gemma2", "gemma3_text")
    nested = config.get("rope_parameters") or {}
    by_kind = {kind: rope_parameters({"rope_parameters": nested[kind]}) for kind in ("sliding_attention", "full_attention")
               if isinstance(nested.get(kind), dict)}
    granite = family in ("granite", "granitemoe")
    scale = None
    if family in ("gemma2", "gemma3_text"):
        scale = float(config["query_pre_attn_scalar"]) ** -0.5
    elif granite:
        scale = float(config.get("attention_multiplier", 1.0))
    return Architecture(
        family=family,
        num_layers=layers,
        hidden=config["hidden_size"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate=config.get("intermediate_size") or config.get("moe_intermediate_size"),
        vocab=config["vocab_size"],
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope=next(iter(by_kind.values())) if by_kind else rope_parameters(config),
        rope_by_kind=by_kind,
        layer_kinds=list(layer_types or []),
        max_positions=int(config.get("max_position_embeddings", 4096)),
        attention_bias=bool(config.get("attention_bias", family in ("qwen2", "qwen2_moe"))),
        sinks=family == "gpt_oss",
        qk_norm=family in ("qwen3", "qwen3_moe", "gemma3_text"),
        qk_norm_full=family in ("olmo2", "olmoe"),
        post_norms=family == "olmo2",
        tied_embeddings=bool(config.get("tie_word_embeddings", family == "gemma")),
        layer_windows=[int(w) if w else None for w in windows],
        activation=activations[activation],
        fused_projections=family == "phi3",
        rotary_dim=rotary_dim,
        norm_offset=gemma,
        embed_scale=(float(config["hidden_size"]) ** 0.5 if gemma
                     else float(config.get("embedding_multiplier", 1.0)) if granite else None),
        sandwich_norms=family in ("gemma2", "gemma3_text"),
        attention_scale=scale,
        attention_softcap=float(config.get("attn_logit_softcapping") or 0.0) if family == "gemma2" else 0.0,
        final_softcap=float(config.get("final_logit_softcapping") or 0.0) if family == "gemma2" else 0.0,
        residual_scale=float(config.get("residual_multiplier", 1.0)) if granite else 1.0,
        logits_divisor=float(config.get("logits_scaling", 1.0)) if granite else 1.0,
        rope_layers=[bool(r) for r in no_rope] if no_rope else [],
    )


DENSE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "granite", "olmo2",
         "smollm3")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "olmoe")
SUPPORTED = DENSE + MOE
# Where a family keeps its sparse-MoE block on disk (per-expert tensors there; fused in memory).
MOE_BLOCK = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp", "qwen3_moe": "mlp", "gpt_oss": "mlp", "olmoe": "mlp"}
# On-disk names of one expert's gate, up and down projections.
EXPERT_PROJECTIONS = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
                      "qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "olmoe": ("gate_proj", "up_proj", "down_proj")}


def _linear(b: GraphBuilder, x: str, ckpt: Checkpoint, prefix: str, bias: bool = False) -> str:
    """x @ W^T (+ b) for a torch Linear stored as [out, in]."""
    y = b.op("MatMul", x, b.weight(f"{prefix}.weight", ckpt.weight(f"{prefix}.weight").T))
    if bias:
        y = b.op("Add", y, b.weight(f"{prefix}.bias", ckpt.weight(f"{prefix}.bias")))
    return y


def _rms_norm(b: GraphBuilder, x: str, ckpt: Checkpoint, name: str, arch: Architecture) -> str:
    scale = ckpt.weight(name).astype(np.float32)
    if arch.norm_offset:  # Gemma stores the scale as an offset from 1
        scale = scale + 1.0
    return b.op("RMSNormalization", x, b.small_weight(name, scale), axis=-1, epsilon=arch.rms_eps)


def _per_head_norm(b: GraphBuilder, x: str, heads: int, arch: Architecture, ckpt: Checkpoint, name: str) -> str:
    """RMSNorm over each head's D values of x [T, heads*D] (Qwen3's q_norm / k_norm)."""
    split = b.op("Reshape", x, b.const([0, heads, arch.head_dim], np.int64))
    normed = _rms_norm(b, split, ckpt, name, arch)
    return b.op("Reshape", normed, b.const([0, heads * arch.head_dim], np.int64))


def _rope(b: GraphBuilder, x: str, heads: int, cos: str, sin: str, positions: str, rotary_dim: int | None) -> str:
    """RotaryEmbedding (opset 23) on flat tokens: [T, heads*D] seen as T sequences of one token
    (onnxruntime refuses a sequence longer than the cos/sin tables, even where positions fit)."""
    batched = b.op("Unsqueeze", x, b.const([1], np.int64))
    extra = {"rotary_embedding_dim": rotary_dim} if rotary_dim else {}
    rotated = b.op("RotaryEmbedding", batched, cos, sin, positions, num_heads=heads, **extra)
    return b.op("Squeeze", rotated, b.const([1], np.int64))


def is_moe_layer(config: dict, i: int) -> bool:
    family = config.get("model_type")
    if family in ("mixtral", "gpt_oss", "olmoe"):
        return True
    if family not in MOE or not (config.get("num_experts") or config.get("num_local_experts") or 0):
        return False
    step = config.get("decoder_sparse_step") or 1
    return i not in (config.get("mlp_only_layers") or []) and (i + 1) % step == 0


def moe_block_weights(ckpt: Checkpoint, i: int) -> dict[str, np.ndarray]:
    """Layer i's sparse-MoE weights under the in-memory names ``moe_from_hf`` reads.

    Checkpoints store one tensor per expert and projection; transformers fuses them in memory
    into ``experts.gate_up_proj [E, 2I, H]`` (gate rows first) and ``experts.down_proj [E, H, I]``.
    """
    family = ckpt.config["model_type"]
    prefix = f"model.layers.{i}.{MOE_BLOCK[family]}."
    names = [n for n in ckpt.names() if n.startswith(prefix)]
    weights = {n[len(prefix):]: ckpt.weight(n) for n in names if ".experts." not in "." + n[len(prefix):]}
    if not any(n[len(prefix):].startswith("experts.") for n in names):
        raise KeyError(f"layer {i}: no expert weights under {prefix!r} in {ckpt.folder}")
    if ckpt.has(prefix + "experts.gate_up_proj"):  # already fused on disk (gpt-oss), biases too
        weights.update({n[len(prefix):]: ckpt.weight(n) for n in names if n[len(prefix):].startswith("experts.")})
        return weights
    gate_name, up_name, down_name = EXPERT_PROJECTIONS[family]
    experts = ckpt.config.get("num_local_experts") or ckpt.config["num_experts"]
    expert = lambda j, proj: ckpt.weight(f"{prefix}experts.{j}.{proj}.weight")  # noqa: E731
    weights["experts.gate_up_proj"] = np.stack(
        [np.concatenate([expert(j, gate_name), expert(j, up_name)]) for j in range(experts)])
    weights["experts.down_proj"] = np.stack([expert(j, down_name) for j in range(experts)])
    return weights


def _splice(b: GraphBuilder, model: onnx.ModelProto, x: str, prefix: str) -> str:
    """Copy ``model``'s graph (input "X", output "Y") into b, every name prefixed; return Y's name."""
    rename = {"X": x, "": ""}
    for init in model.graph.initializer:
        rename[init.name] = prefix + init.name
        init = onnx.TensorProto.FromString(init.SerializeToString())
        init.name = prefix + init.name
        b.add(init)
    for node in model.graph.node:
        new = onnx.NodeProto.FromString(node.SerializeToString())
        new.name = b.name(prefix + (node.name or node.op_type))
        new.input[:] = [rename.get(n, prefix + n) for n in node.input]
        new.output[:] = [prefix + n if n else "" for n in node.output]
        if new.op_type == "MoE":  # the routing outputs are not needed here
            del new.output[1:]
        for n in node.output:
            rename[n] = prefix + n
        b.nodes.append(new)
    return rename["Y"]


def _moe_mlp(b: GraphBuilder, h: str, i: int, ckpt: Checkpoint) -> str:
    from .moe import build_moe_block_model, moe_from_hf

    block = moe_from_hf(ckpt.config["model_type"], ckpt.config, moe_block_weights(ckpt, i))
    if b.dtype == np.float32:
        return _splice(b, build_moe_block_model(block, opset=OPSET), h, f"model.layers.{i}.moe.")
    # The op takes X in its experts' type: the kernel streams the narrow weights and computes in fp32.
    elem = helper.np_dtype_to_tensor_dtype(b.dtype)
    x = b.op("Cast", h, to=elem)
    y = _splice(b, build_moe_block_model(block, dtype=b.dtype, opset=OPSET), x, f"model.layers.{i}.moe.")
    return b.op("Cast", y, to=TensorProto.FLOAT)


def _projections(b: GraphBuilder, h: str, p: str, arch: Architecture, ckpt: Checkpoint) -> tuple[str, str, str]:
    if not arch.fused_projections:
        return tuple(_linear(b, h, ckpt, f"{p}.self_attn.{n}_proj", arch.attention_bias) for n in "qkv")
    qkv = _linear(b, h, ckpt, f"{p}.self_attn.qkv_proj")  # Phi-3: rows q, then k, then v
    q_width, kv_width = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    return tuple(b.op("Split", qkv, b.const([q_width, kv_width, kv_width], np.int64), axis=-1, outputs=3))


def _mlp(b: GraphBuilder, h: str, p: str, arch: Architecture, ckpt: Checkpoint) -> str:
    if arch.fused_projections:  # Phi-3: gate rows first, then up
        gate, up = b.op("Split", _linear(b, h, ckpt, f"{p}.mlp.gate_up_proj"), axis=-1, num_outputs=2, outputs=2)
    else:
        gate, up = _linear(b, h, ckpt, f"{p}.mlp.gate_proj"), _linear(b, h, ckpt, f"{p}.mlp.up_proj")
    if arch.activation == "gelu_tanh":
        act = b.op("Gelu", gate, approximate="tanh")
    else:
        act = b.op("Mul", gate, b.op("Sigmoid", gate))
    return _linear(b, b.op("Mul", act, up), ckpt, f"{p}.mlp.down_proj")


def _layer(b: GraphBuilder, x: str, i: int, arch: Architecture, ckpt: Checkpoint, rope: tuple[str, str, str],
           paged: list[str]) -> str:
    p = f"model.layers.{i}"
    h = x if arch.post_norms else _rms_norm(b, x, ckpt, f"{p}.input_layernorm.weight", arch)
    q, k, v = _projections(b, h, p, arch, ckpt)
    if arch.qk_norm:
        q = _per_head_norm(b, q, arch.heads, arch, ckpt, f"{p}.self_attn.q_norm.weight")
        k = _per_head_norm(b, k, arch.kv_heads, arch, ckpt, f"{p}.self_attn.k_norm.weight")
    if arch.qk_norm_full:
        q = _rms_norm(b, q, ckpt, f"{p}.self_attn.q_norm.weight", arch)
        k = _rms_norm(b, k, ckpt, f"{p}.self_attn.k_norm.weight", arch)
    cos, sin, positions = rope
    if not arch.rope_layers or arch.rope_layers[i]:
        q = _rope(b, q, arch.heads, cos, sin, positions, arch.rotary_dim)
        k = _rope(b, k, arch.kv_heads, cos, sin, positions, arch.rotary_dim)
    window = arch.layer_windows[i] if arch.layer_windows else None
    attention = {"num_heads": arch.heads, "kv_num_heads": arch.kv_heads,
                 "local_window_size": window - 1 if window else -1}
    if arch.attention_scale:
        attention["scale"] = arch.attention_scale
    if arch.attention_softcap:
        attention["softcap"] = arch.attention_softcap
    sink = [b.small_weight(f"{p}.self_attn.sinks", ckpt.weight(f"{p}.self_attn.sinks"))] if arch.sinks else []
    attn = b.op(
        "PagedAttention", q, k, v, f"key_cache.{i}", f"value_cache.{i}", *paged, *sink, domain=DOMAIN,
        out_names=[b.name("attn"), f"key_cache_out.{i}", f"value_cache_out.{i}"], outputs=3,
        name=f"{p}.attention", **attention,
    )[0]
    attn = _linear(b, attn, ckpt, f"{p}.self_attn.o_proj", bias=ckpt.has(f"{p}.self_attn.o_proj.bias"))
    if arch.sandwich_norms:  # Gemma 2: the sublayer's output is normed before the residual add
        attn = _rms_norm(b, attn, ckpt, f"{p}.post_attention_layernorm.weight", arch)
        x = b.op("Add", x, attn)
        h = _rms_norm(b, x, ckpt, f"{p}.pre_feedforward_layernorm.weight", arch)
        return b.op("Add", x, _rms_norm(b, _mlp(b, h, p, arch, ckpt), ckpt, f"{p}.post_feedforward_layernorm.weight",
                                        arch))
    if arch.post_norms:  # OLMo 2: x + norm(attn(x)), then x + norm(mlp(x))
        x = b.op("Add", x, _rms_norm(b, attn, ckpt, f"{p}.post_attention_layernorm.weight", arch))
        return b.op("Add", x, _rms_norm(b, _mlp(b, x, p, arch, ckpt), ckpt, f"{p}.post_feedforward_layernorm.weight",
                                        arch))
    x = b.op("Add", x, _residual_scaled(b, attn, arch))
    h = _rms_norm(b, x, ckpt, f"{p}.post_attention_layernorm.weight", arch)
    mlp = _moe_mlp(b, h, i, ckpt) if is_moe_layer(ckpt.config, i) else _mlp(b, h, p, arch, ckpt)
    return b.op("Add", x, _residual_scaled(b, mlp, arch))


def _residual_scaled(b: GraphBuilder, y: str, arch: Architecture) -> str:
    if arch.residual_scale == 1.0:
        return y
    return b.op("Mul", y, b.const(np.array(arch.residual_scale, np.float32)))


def build_model(ckpt: Checkpoint, *, dtype: str = "float32", all_logits: bool = False,
                progress: Callable[[int, int], None] | None = None,
                external: ExternalWeights | None = None) -> onnx.ModelProto:
    """The ONNX graph of a checkpoint (see ``build`` for the folder).  With ``external``, large
    weights go to its file as they are made; otherwise they stay in the ModelProto."""
    if dtype not in DTYPES:
        raise NotImplementedError(f"--dtype {dtype} is not supported yet; supported: {', '.join(DTYPES)}")
    np_dtype, onnx_dtype = DTYPES[dtype]
    arch = architecture(ckpt.config)
    b = GraphBuilder(np_dtype, external)
    paged = ["cumulative_sequence_length", "past_seqlens", "block_table", "slot_mapping"]
    embed = b.weight("model.embed_tokens.weight", ckpt.weight("model.embed_tokens.weight"))
    x = b.op("Gather", embed, "input_ids", axis=0)
    if arch.embed_scale:
        x = b.op("Mul", x, b.const(np.array(arch.embed_scale, np.float32)))
    positions = b.op("Unsqueeze", "position_ids", b.const([1], np.int64))
    ropes = {}  # one cos/sin table per kind of layer (one kind unless the config says otherwise)
    for kind, params in (arch.rope_by_kind or {"": arch.rope}).items():
        cos, sin = rope_caches(params, arch.rotary_dim or arch.head_dim, arch.max_positions)
        suffix = f".{kind}" if kind else ""
        ropes[kind] = (b.small_weight(f"rope.cos{suffix}", cos), b.small_weight(f"rope.sin{suffix}", sin), positions)
    for i in range(arch.num_layers):
        kind = arch.layer_kinds[i] if arch.rope_by_kind else ""
        x = _layer(b, x, i, arch, ckpt, ropes[kind], paged)
        if progress:
            progress(i + 1, arch.num_layers)
    x = _rms_norm(b, x, ckpt, "model.norm.weight", arch)
    if not all_logits:  # the last token of each sequence
        last = b.op("Sub", b.op("Slice", "cumulative_sequence_length", b.const([1], np.int64),
                                b.const([2**31 - 1], np.int64)), b.const([1], np.int32))
        x = b.op("Gather", x, last, axis=0)
    if arch.logits_divisor != 1.0:  # Granite: logits / logits_scaling, folded into the final norm's output
        x = b.op("Div", x, b.const(np.array(arch.logits_divisor, np.float32)))
    head = "model.embed_tokens.weight" if arch.tied_embeddings else "lm_head.weight"
    lm_head = b.weight("lm_head.weight.T", ckpt.weight(head).T)
    if arch.final_softcap:  # cap * tanh(logits / cap)
        cap = b.const(np.array(arch.final_softcap, np.float32))
        raw = b.op("MatMul", x, lm_head)
        b.nodes.append(helper.make_node("Mul", [b.op("Tanh", b.op("Div", raw, cap)), cap], ["logits"], name="softcap"))
    else:
        b.nodes.append(helper.make_node("MatMul", [x, lm_head], ["logits"], name="lm_head"))
    cache = ["num_blocks", "block_size", arch.kv_heads, arch.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["num_tokens"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["num_tokens"]),
        helper.make_tensor_value_info("cumulative_sequence_length", TensorProto.INT32, ["batch_plus_1"]),
        helper.make_tensor_value_info("past_seqlens", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("block_table", TensorProto.INT32, ["batch", "max_blocks"]),
        helper.make_tensor_value_info("slot_mapping", TensorProto.INT32, ["num_tokens"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["num_tokens" if all_logits else "batch", arch.vocab])]
    for i in range(arch.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"{kind}_cache.{i}", onnx_dtype, cache))
            outputs.append(helper.make_tensor_value_info(f"{kind}_cache_out.{i}", onnx_dtype, cache))
    graph = helper.make_graph(b.nodes, f"onnxgen_{arch.family}", inputs, outputs, initializer=b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                              producer_name="onnxgen")
    model.ir_version = 10
    return model


def build(checkpoint_dir: str | Path, out_dir: str | Path, *, dtype: str = "float32", all_logits: bool = False,
          block_size: int = 16, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``out_dir/model.onnx`` (+ ``model.onnx.data``), ``onnxgen.json`` and the tokenizer files."""
    ckpt = Checkpoint(checkpoint_dir)
    architecture(ckpt.config)  # refuse an unsupported family before writing anything
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    external = ExternalWeights(out / "model.onnx.data")
    try:
        model = build_model(ckpt, dtype=dtype, all_logits=all_logits, progress=progress, external=external)
    finally:
        external.close()
    onnx.save_model(model, out / "model.onnx")
    arch = architecture(ckpt.config)
    generation = ckpt.generation_config()
    eos = generation.get("eos_token_id", ckpt.config.get("eos_token_id"))
    meta = {
        "format": "onnxgen.llm/1",
        "architecture": asdict(arch),
        "dtype": dtype,
        "block_size": block_size,
        "eos_token_ids": [eos] if isinstance(eos, int) else list(eos or []),
        "bos_token_id": generation.get("bos_token_id", ckpt.config.get("bos_token_id")),
        "chat_template": ckpt.tokenizer_config().get("chat_template"),
        "logits": "all tokens" if all_logits else "last token of each sequence",
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
    }
    (out / "onnxgen.json").write_text(json.dumps(meta, indent=2))
    for path in ckpt.tokenizer_files():
        shutil.copy2(path, out / path.name)
    return out
