"""A request as the engine sees it: its tokens, its blocks and how far its K/V are computed."""

from __future__ import annotations

import dataclasses
import enum
import itertools
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SamplingParams:
    """How one request's tokens are chosen and when it stops.

    ``temperature == 0`` is greedy.  ``seed`` makes sampling reproducible whatever else is in the
    batch (each request draws from its own generator).  ``stop`` strings end the text before
    them; ``eos_token_ids`` end it after them (``None``: the model's).
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)

    def validate(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        require(self.max_new_tokens >= 1, f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        require(0 <= self.min_new_tokens <= self.max_new_tokens,
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")
        require(self.temperature >= 0, f"temperature must be ≥ 0, got {self.temperature}")
        require(self.top_k >= 0, f"top_k must be ≥ 0 (0 = off), got {self.top_k}")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        require(0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}")
        require(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        require(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")


class Status(enum.Enum):
    WAITING = "waiting"    # queued, or preempted: holds no blocks
    RUNNING = "running"    # holds blocks; computes a chunk of its tokens each step
    FINISHED = "finished"  # blocks released


_ids = itertools.count()


class Sequence:
    """The prompt and generated tokens of one request, its block table, and ``num_computed``:
    how many of its tokens already have their K/V in the cache (the rest go into the next steps)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else f"req-{self.seq_id}"
        self.tokens = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.params = dataclasses.replace(params)  # its own copy: the engine may extend its budget
        self.rng = np.random.default_rng(params.seed)
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0
        self.num_cached_prompt = 0  # prompt tokens found in the prefix cache (for statistics)
        self.finish_reason: str | None = None
        self.text = ""  # the output text so far (the engine detokenizes incrementally)
        self.emitted = 0  # characters of text already streamed

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}, {self.status.value}, tokens={len(self)}, "
                f"computed={self.num_computed}, blocks={len(self.block_table)})")
