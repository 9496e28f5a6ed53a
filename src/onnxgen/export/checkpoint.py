"""A local Hugging Face checkpoint folder, read without torch: config, safetensors shards, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)


class Checkpoint:
    """``config`` (a dict) and ``weight(name)`` (a numpy array) of a checkpoint folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{self.folder} is not a Hugging Face checkpoint: no config.json")
        self.config = json.loads(config_path.read_text())
        self._index: dict | None = None  # weight name -> open shard, read on first use

    def _where(self) -> dict:
        if self._index is None:
            from safetensors import safe_open

            shards = sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"{self.folder} has no *.safetensors weights (other formats are not read)")
            files = []
            for shard in shards:
                try:
                    files.append(safe_open(str(shard), "np"))
                except Exception as error:
                    raise ValueError(f"{shard} is not a readable safetensors file: {error}") from error
            self._index = {name: f for f in files for name in f.keys()}
        return self._index

    def names(self) -> list[str]:
        return sorted(self._where())

    def has(self, name: str) -> bool:
        return name in self._where()

    def weight(self, name: str) -> np.ndarray:
        where = self._where()
        if name not in where:
            raise KeyError(f"weight {name!r} is missing from the checkpoint in {self.folder}")
        return where[name].get_tensor(name)

    def generation_config(self) -> dict:
        path = self.folder / "generation_config.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def tokenizer_config(self) -> dict:
        path = self.folder / "tokenizer_config.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / name for name in TOKENIZER_FILES if (self.folder / name).exists()]
