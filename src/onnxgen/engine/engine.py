"""LLMEngine: requests in, tokens out, one batched model step at a time.

    engine = LLMEngine("model_dir")
    engine.add_request("Once upon a time", SamplingParams(max_new_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.request_id, out.new_text, out.finished)

``step()`` asks the scheduler for the next batch, runs it, samples a token for every sequence
whose chunk completed, detokenizes, applies the stop conditions and returns what changed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..tokenizer import Detokenizer, Tokenizer
from .block_pool import BlockPool
from .runner import ModelRunner, read_model_info
from .sampler import sample
from .scheduler import Scheduler
from .sequence import SamplingParams, Sequence, Status


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" (eos or stop string) | "length" | "abort"
    token_ids: list[int] = field(default_factory=list)  # all output ids so far
    text: str = ""  # all output text so far
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0  # computed (prefix-cache hits excluded)
    generated_tokens: int = 0
    cached_prompt_tokens: int = 0
    model_seconds: float = 0.0


class LLMEngine:
    def __init__(self, model_dir: str | Path, *, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 num_blocks: int | None = None, kv_cache_gib: float = 1.0, max_model_len: int | None = None,
                 prefix_caching: bool = True, cache_dtype: str | None = None, threads: int | None = None):
        info = read_model_info(model_dir)
        block_size = info["block_size"]
        self.max_model_len = min(max_model_len or info["architecture"]["max_positions"],
                                 info["architecture"]["max_positions"])
        if num_blocks is None:  # the memory budget, but no more than max_num_seqs full-length sequences use
            per_block = ModelRunner.cache_bytes_per_block(info, block_size, cache_dtype)
            enough = max_num_seqs * -(-self.max_model_len // block_size)
            num_blocks = max(1, min(int(kv_cache_gib * 2**30) // per_block, enough))
        self.runner = ModelRunner(model_dir, num_blocks=num_blocks, block_size=block_size,
                                  cache_dtype=cache_dtype, threads=threads)
        self.pool = BlockPool(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.pool, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        self.tokenizer = Tokenizer(model_dir) if _has_tokenizer(Path(model_dir)) else None
        self.eos_token_ids = set(info.get("eos_token_ids") or [])
        self.requests: dict[str, tuple[Sequence, Detokenizer | None]] = {}
        self._aborted: list[RequestOutput] = []
        self.stats = EngineStats()

    # -- requests -----------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        ids = self.check_request(prompt, params)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(ids, params, request_id)
        detok = Detokenizer(self.tokenizer, ids) if self.tokenizer else None
        self.requests[seq.request_id] = (seq, detok)
        self.scheduler.add(seq)
        return seq.request_id

    def check_request(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids, or a ValueError saying why the engine cannot take the request.
        Reads only the engine's configuration: safe to call from another thread."""
        params.validate()
        ids = self._encode(prompt)
        if not ids or prompt == "":
            raise ValueError("the prompt is empty: give at least one token")
        if any(not 0 <= t < self.runner.vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.runner.vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} "
                             "(the prompt and at least one new token must fit)")
        longest = min(len(ids) + params.max_new_tokens, self.max_model_len)
        if self.pool.blocks_for(longest) > len(self.pool.blocks):
            raise ValueError(f"a request of up to {longest} tokens needs {self.pool.blocks_for(longest)} KV blocks; "
                             f"the cache has {len(self.pool.blocks)} (raise num_blocks or kv_cache_gib)")
        return ids

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks; the next ``step`` reports it finished ("abort")."""
        if request_id not in self.requests:
            return
        seq, _ = self.requests.pop(request_id)
        self.scheduler.finish(seq, "abort")
        self._aborted.append(self._output(seq, [], "", prompt_stats=True))

    def append_tokens(self, request_id: str, tokens: list[int]) -> None:
        """Feed more input to a running request (a user's next turn): the tokens join its
        sequence after what it has generated; its max_new_tokens counts generated tokens only."""
        if request_id not in self.requests:
            raise KeyError(f"no unfinished request {request_id!r}")
        if any(not 0 <= t < self.runner.vocab for t in tokens):
            raise ValueError(f"token ids must be in [0, {self.runner.vocab})")
        seq, detok = self.requests[request_id]
        if len(seq) + len(tokens) >= self.max_model_len:
            raise ValueError(f"the request would exceed this model's context of {self.max_model_len} tokens")
        seq.tokens.extend(tokens)
        seq.params.max_new_tokens += len(tokens)
        if detok:
            seq.text += detok.add(tokens)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._aborted)

    # -- stepping -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._aborted = self._aborted, []
        chunks = self.scheduler.schedule()
        if not chunks:
            return outputs
        start = time.perf_counter()
        logits = self.runner.run(chunks)
        self.stats.model_seconds += time.perf_counter() - start
        self.stats.steps += 1
        self.scheduler.computed(chunks)
        for chunk, row in zip(chunks, logits):
            seq = chunk.seq
            if seq.num_computed < len(seq):  # a prompt chunk short of the end: nothing to sample
                self.stats.prompt_tokens += chunk.num_tokens
                continue
            self.stats.prompt_tokens += chunk.num_tokens - 1
            outputs.append(self._append(seq, sample(seq, row, self._eos(seq))))
        return outputs

    def _append(self, seq: Sequence, token: int) -> RequestOutput:
        seq.tokens.append(token)
        self.stats.generated_tokens += 1
        _, detok = self.requests[seq.request_id]
        params = seq.params
        reason = None
        if token in self._eos(seq) and not params.ignore_eos and len(seq.output_ids) >= params.min_new_tokens:
            reason = "stop"
        seq.text += detok.add([token]) if detok and reason is None else ""
        held = 0
        if params.stop:
            found = [i for i in (seq.text.find(s) for s in params.stop) if i >= 0]
            if found:
                seq.text, reason = seq.text[:min(found)], "stop"
            held = max(map(len, params.stop)) - 1  # text that may yet become a stop string waits
        if reason is None and (len(seq.output_ids) >= params.max_new_tokens or len(seq) >= self.max_model_len):
            reason = "length"
        if reason:
            held = 0
            self.scheduler.finish(seq, reason)
            del self.requests[seq.request_id]
            self.stats.cached_prompt_tokens += seq.num_cached_prompt
        visible = seq.text[:max(len(seq.text) - held, seq.emitted)] if held else seq.text
        new_text, seq.emitted = visible[seq.emitted:], len(visible)
        return self._output(seq, [token], new_text, prompt_stats=bool(reason))

    def _output(self, seq: Sequence, new_ids: list[int], new_text: str, prompt_stats: bool) -> RequestOutput:
        return RequestOutput(seq.request_id, new_ids, new_text, seq.finished, seq.finish_reason,
                             list(seq.output_ids), seq.text[:seq.emitted] if not seq.finished else seq.text,
                             seq.prompt_len, seq.num_cached_prompt)

    def _eos(self, seq: Sequence) -> set[int]:
        return set(seq.params.eos_token_ids) if seq.params.eos_token_ids is not None else self.eos_token_ids

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer: give prompts as token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    # -- conveniences -------------------------------------------------------------------------
    def kv_usage(self) -> tuple[int, int]:
        """(tokens stored, token slots held) over the running sequences."""
        running = self.scheduler.running
        return (sum(s.num_computed for s in running),
                sum(len(s.block_table) for s in running) * self.pool.block_size)

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Run ``prompts`` to completion together; their final outputs, in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        final: dict[str, RequestOutput] = {}
        for output in self.iterate(progress=progress):
            if output.finished:
                final[output.request_id] = output
        return [final[i] for i in ids]

    def iterate(self, progress: bool = False) -> Iterator[RequestOutput]:
        """Step until every request has finished, yielding every output as it comes."""
        from tqdm import tqdm

        bar = tqdm(total=len(self.requests), unit="req", disable=not progress, leave=False)
        with bar:
            while self.has_unfinished_requests():
                for output in self.step():
                    bar.update(output.finished)
                    yield output


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists()
