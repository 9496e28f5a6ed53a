"""The embedded default: a small Mixtral-style MoE model, built here, once, and cached.

No model can be downloaded, so the default is made from a config with seeded random weights
(numpy; no torch) and Mistral's real 32k SentencePiece tokenizer, which the ``mistral-common``
package ships.  It is written as a Hugging Face checkpoint (loadable by transformers'
``MixtralForCausalLM``) and exported like any other checkpoint.  Its text is gibberish (the
weights are random) but every part of the path it takes is the real one.

The cache lives in ``$ONNXGEN_CACHE`` (default ``~/.cache/onnxgen``), under a name that changes
whenever the recipe does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .cache import build_once, cache_dir

RECIPE = "mixtral-tiny-v1"
SEED = 20261124
CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 32000,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "hidden_act": "silu",
    "sliding_window": None,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
# Mistral's instruct format; a system message is put before the first user message.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set pending = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set pending.system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + pending.system + message['content'] + ' [/INST]' }}"
    "{% set pending.system = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('roles are system, user and assistant; got ' + message['role']) }}{% endif %}"
    "{% endfor %}"
)


def random_weights(config: dict, seed: int = SEED) -> dict[str, np.ndarray]:
    """Mixtral's tensors, as its checkpoints store them, drawn like transformers' init (N(0, 0.02))."""
    rng = np.random.default_rng(seed)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    q = config["num_attention_heads"] * config["head_dim"]

    def normal(*shape):
        return rng.normal(0.0, 0.02, shape).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(vocab, hidden), "lm_head.weight": normal(vocab, hidden),
               "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights.update({
            f"{p}.input_layernorm.weight": np.ones(hidden, np.float32),
            f"{p}.post_attention_layernorm.weight": np.ones(hidden, np.float32),
            f"{p}.self_attn.q_proj.weight": normal(q, hidden),
            f"{p}.self_attn.k_proj.weight": normal(kv, hidden),
            f"{p}.self_attn.v_proj.weight": normal(kv, hidden),
            f"{p}.self_attn.o_proj.weight": normal(hidden, q),
            f"{p}.block_sparse_moe.gate.weight": normal(config["num_local_experts"], hidden),
        })
        for e in range(config["num_local_experts"]):
            x = f"{p}.block_sparse_moe.experts.{e}"
            weights.update({f"{x}.w1.weight": normal(inter, hidden), f"{x}.w3.weight": normal(inter, hidden),
                            f"{x}.w2.weight": normal(hidden, inter)})
    return weights


def mistral_tokenizer_model() -> Path:
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.exists():
        raise FileNotFoundError(f"mistral-common no longer ships {path.name}; the default model needs it")
    return path


def write_checkpoint(folder: Path, config: dict = CONFIG, seed: int = SEED) -> Path:
    """The default's Hugging Face checkpoint: config, safetensors, tokenizer and its config."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2))
    save_file(random_weights(config, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(mistral_tokenizer_model(), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True, "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    return folder


def default_model(progress: bool = True) -> Path:
    """The default model's folder (``onnxgen.json``, ``model.onnx``, tokenizer), built if missing."""
    from .export.llm import build

    def make(work: Path) -> Path:
        if progress:
            print(f"building the default model (random-weight Mixtral-style MoE, once) in {cache_dir() / RECIPE}")
        write_checkpoint(work / "checkpoint")
        return build(work / "checkpoint", work / "model", progress=_progress_bar(progress, CONFIG["num_hidden_layers"]))

    return build_once(RECIPE, make)


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="layer", desc="export", leave=False)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)
        if done == _total:
            bar.close()

    return update
