"""One engine step on the model: the scheduled chunks become the paged inputs, one session run.

The model folder is what ``onnxgen export`` writes (``model.onnx`` with the paged signature,
``onnxgen.json``).  Each layer's key and value caches are arrays of ``num_blocks`` blocks that
the session holds bound as both input and output, so a step writes its new K/V in place.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from ..backends.ort import session as ort_session
from .scheduler import ScheduledChunk

CACHE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def read_model_info(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "onnxgen.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} is not an onnxgen model folder: no onnxgen.json "
                                f"(make one with `onnxgen export CHECKPOINT {model_dir}`)")
    info = json.loads(path.read_text())
    if info.get("format") != "onnxgen.llm/1":
        raise ValueError(f"{path}: unknown format {info.get('format')!r} (this onnxgen reads onnxgen.llm/1)")
    return info


class ModelRunner:
    def __init__(self, model_dir: str | Path, *, num_blocks: int, block_size: int | None = None,
                 cache_dtype: str | None = None, threads: int | None = None):
        self.info = read_model_info(model_dir)
        arch = self.info["architecture"]
        self.block_size = block_size or self.info["block_size"]
        self.num_blocks = num_blocks
        self.vocab = arch["vocab"]
        self.max_positions = arch["max_positions"]
        dtype = CACHE_DTYPES[cache_dtype or self.info["dtype"]]
        # Spinning worker threads: steps run back to back, and waking sleeping threads for every
        # op cost 7-8 % of serving throughput (bench_serving.py).
        self.session = ort_session(str(Path(model_dir) / "model.onnx"), threads=threads, spinning=True)
        if self.info.get("logits") != "last token of each sequence":
            raise ValueError(f"{model_dir}: the engine needs a model exported with last-token logits")
        shape = (num_blocks, self.block_size, arch["kv_heads"], arch["head_dim"])
        for name in self.session.pairs:
            self.session.set_cache(name, np.zeros(shape, dtype))
        self.bytes_per_block = sum(c[0].nbytes for c in self.session.caches.values())

    @staticmethod
    def cache_bytes_per_block(info: dict, block_size: int, cache_dtype: str | None = None) -> int:
        arch = info["architecture"]
        itemsize = np.dtype(CACHE_DTYPES[cache_dtype or info["dtype"]]).itemsize
        return 2 * arch["num_layers"] * block_size * arch["kv_heads"] * arch["head_dim"] * itemsize

    def inputs(self, chunks: list[ScheduledChunk]) -> dict[str, np.ndarray]:
        """The paged inputs of a step (docs/PagedSignature.md)."""
        ids, positions, lengths, past = [], [], [], []
        for chunk in chunks:
            start = chunk.seq.num_computed
            ids.append(chunk.seq.tokens[start:start + chunk.num_tokens])
            positions.append(np.arange(start, start + chunk.num_tokens))
            lengths.append(chunk.num_tokens)
            past.append(start)
        width = max(len(c.seq.block_table) for c in chunks)
        table = np.full((len(chunks), width), -1, np.int32)
        for row, chunk in zip(table, chunks):
            row[:len(chunk.seq.block_table)] = chunk.seq.block_table
        positions = np.concatenate(positions)
        owner = np.repeat(np.arange(len(chunks)), lengths)
        slots = table[owner, positions // self.block_size] * self.block_size + positions % self.block_size
        return {
            "input_ids": np.concatenate(ids).astype(np.int64),
            "position_ids": positions.astype(np.int64),
            "cumulative_sequence_length": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
            "past_seqlens": np.array(past, np.int32),
            "block_table": table,
            "slot_mapping": slots.astype(np.int32),
        }

    def run(self, chunks: list[ScheduledChunk]) -> np.ndarray:
        """Compute the chunks' K/V into the cache; the logits of each chunk's last token [B, vocab]."""
        return self.session.run(self.inputs(chunks))["logits"]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks (source, destination) in every layer's caches (copy on write)."""
        if copies:
            source, destination = map(list, zip(*copies))
            for cache in self.session.caches.values():
                cache[destination] = cache[source]
