"""A model folder the engine can serve, for a paged model made elsewhere (``onnxgen convert``).

``onnxgen export`` writes ``onnxgen.json`` from the checkpoint it builds from.  A model converted by
``passes.paged`` carries its facts in its signature instead: layers (the cache inputs), KV heads
and head size (the caches' shape), vocabulary (the logits' width), cache type.  What the graph
does not say (context length, eos ids, chat template, tokenizer) comes from the Hugging Face
folder the model was exported from, when there is one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx

from .checkpoint import TOKENIZER_FILES

CACHE_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.BFLOAT16: "bfloat16"}


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def describe(model: onnx.ModelProto, config: dict | None = None) -> dict:
    """The ``architecture`` entry of onnxgen.json, read off a paged model's signature."""
    inputs = {i.name: i for i in model.graph.input}
    layers = sum(1 for name in inputs if name.startswith("key_cache."))
    if not layers or "key_cache.0" not in inputs:
        raise ValueError("not a paged model: no key_cache.0 input (convert it with onnxgen.passes.paged first)")
    _, _, kv_heads, head_dim = _dims(inputs["key_cache.0"])
    logits = next((o for o in model.graph.output if o.name == "logits"), None)
    vocab = _dims(logits)[-1] if logits is not None else None
    if not all(isinstance(v, int) and v > 0 for v in (kv_heads, head_dim, vocab)):
        raise ValueError(f"the caches' head count and size and the logits' width must be static; got kv_heads="
                         f"{kv_heads}, head_dim={head_dim}, vocab={vocab}")
    config = config or {}
    return {"family": config.get("model_type", "converted"), "num_layers": layers, "kv_heads": kv_heads,
            "head_dim": head_dim, "vocab": vocab, "max_positions": int(config.get("max_position_embeddings", 4096))}


def write_model_folder(model: onnx.ModelProto, out_dir: str | Path, *, source_dir: str | Path | None = None,
                       block_size: int = 16) -> Path:
    """``out_dir/model.onnx`` (+ data), ``onnxgen.json`` and the source folder's tokenizer files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(source_dir) if source_dir else None
    config = _read_json(source / "config.json") if source else {}
    generation = _read_json(source / "generation_config.json") if source else {}
    tokenizer_config = _read_json(source / "tokenizer_config.json") if source else {}
    inputs = {i.name: i for i in model.graph.input}
    fixed = _dims(inputs["key_cache.0"])[1] if "key_cache.0" in inputs else None
    block_size = fixed if isinstance(fixed, int) and fixed > 0 else block_size
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    logits = next(o for o in model.graph.output if o.name == "logits")
    all_logits = _dims(logits)[0] == "num_tokens"  # passes.paged names the rows by what they are
    meta = {
        "format": "onnxgen.llm/1",
        "architecture": describe(model, config),
        "dtype": CACHE_TYPES[inputs["key_cache.0"].type.tensor_type.elem_type],
        "block_size": block_size,
        "eos_token_ids": [eos] if isinstance(eos, int) else list(eos or []),
        "bos_token_id": generation.get("bos_token_id", config.get("bos_token_id")),
        "chat_template": tokenizer_config.get("chat_template"),
        "logits": "all tokens" if all_logits else "last token of each sequence",
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
        "converted_from": str(source) if source else None,
    }
    onnx.save_model(model, out / "model.onnx", save_as_external_data=True, location="model.onnx.data",
                    size_threshold=1024)
    (out / "onnxgen.json").write_text(json.dumps(meta, indent=2))
    for name in TOKENIZER_FILES if source else ():
        if (source / name).exists():
            shutil.copy2(source / name, out / name)
    return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
