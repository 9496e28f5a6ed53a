"""A serving workload run against the engine in real time: ``onnxgen bench serve``.

Requests arrive (all at once, or as a Poisson process of ``rate`` requests/s) with random
prompt and output lengths (exact: eos is ignored); the engine steps while work remains.  The
report gives output tokens/s, time to first token and inter-token latency percentiles, and KV
utilisation: tokens stored ÷ token slots held, over the steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .engine import LLMEngine
from .sequence import SamplingParams


@dataclass
class Workload:
    num_requests: int = 32
    prompt_lens: tuple[int, int] = (16, 512)  # inclusive range
    output_lens: tuple[int, int] = (16, 256)
    rate: float = math.inf  # requests per second; inf: all arrive at time 0
    seed: int = 0
    shared_prefix: int = 0  # tokens of a system prompt every request starts with

    def requests(self, vocab: int) -> list[tuple[float, list[int], int]]:
        """(arrival second, prompt ids, output length) per request, in arrival order."""
        rng = np.random.default_rng(self.seed)
        prefix = list(map(int, rng.integers(3, vocab, self.shared_prefix)))
        gaps = np.zeros(self.num_requests) if math.isinf(self.rate) else rng.exponential(1 / self.rate, self.num_requests)
        arrivals = np.cumsum(gaps) - gaps[0]
        out = []
        for arrival in arrivals:
            prompt_len = int(rng.integers(self.prompt_lens[0], self.prompt_lens[1] + 1))
            output_len = int(rng.integers(self.output_lens[0], self.output_lens[1] + 1))
            out.append((float(arrival), prefix + list(map(int, rng.integers(3, vocab, prompt_len))), output_len))
        return out


@dataclass
class Report:
    seconds: float
    prompt_tokens: int
    output_tokens: int
    ttft: list[float] = field(default_factory=list)  # seconds, per request
    itl: list[float] = field(default_factory=list)  # seconds, every gap between a request's tokens
    kv_stored: int = 0
    kv_slots: int = 0
    preemptions: int = 0
    cached_prompt_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def kv_utilisation(self) -> float:
        return self.kv_stored / max(self.kv_slots, 1)

    def rows(self) -> list[tuple[str, str]]:
        def ms(values, q):
            return f"{1000 * float(np.percentile(values, q)):.1f}" if values else "-"

        return [
            ("requests / prompt tokens / output tokens", f"{len(self.ttft)} / {self.prompt_tokens} / {self.output_tokens}"),
            ("wall time (s)", f"{self.seconds:.2f}"),
            ("output tokens/s", f"{self.tokens_per_second:.1f}"),
            ("TTFT p50 / p99 / mean (ms)", f"{ms(self.ttft, 50)} / {ms(self.ttft, 99)} / "
                                           f"{1000 * float(np.mean(self.ttft)):.1f}"),
            ("ITL p50 / p99 (ms)", f"{ms(self.itl, 50)} / {ms(self.itl, 99)}"),
            ("KV utilisation (stored ÷ held slots)", f"{100 * self.kv_utilisation:.1f} %"),
            ("preemptions", str(self.preemptions)),
            ("prompt tokens from the prefix cache", str(self.cached_prompt_tokens)),
        ]

    def table(self, title: str = "onnxgen engine") -> str:
        width = max(len(name) for name, _ in self.rows())
        return "\n".join([title] + [f"  {name:<{width}}  {value}" for name, value in self.rows()])


def run(engine: LLMEngine, workload: Workload, progress: bool = True) -> Report:
    from tqdm import tqdm

    pending = workload.requests(engine.runner.vocab)
    arrival_of: dict[str, float] = {}
    last_token: dict[str, float] = {}
    report = Report(0.0, sum(len(p) for _, p, _ in pending), 0)
    start = time.perf_counter()
    with tqdm(total=len(pending), unit="req", disable=not progress, desc="serving") as bar:
        while pending or engine.has_unfinished_requests():
            now = time.perf_counter() - start
            while pending and pending[0][0] <= now:
                arrival, prompt, length = pending.pop(0)
                request = engine.add_request(prompt, SamplingParams(max_new_tokens=length, ignore_eos=True))
                arrival_of[request] = start + arrival
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, pending[0][0] - (time.perf_counter() - start)))
                continue
            outputs = engine.step()
            stored, slots = engine.kv_usage()
            report.kv_stored += stored
            report.kv_slots += slots
            stamp = time.perf_counter()
            for output in outputs:
                if output.new_token_ids:
                    report.output_tokens += len(output.new_token_ids)
                    if output.request_id in last_token:
                        report.itl.append(stamp - last_token[output.request_id])
                    else:
                        report.ttft.append(stamp - arrival_of[output.request_id])
                    last_token[output.request_id] = stamp
                if output.finished:
                    report.cached_prompt_tokens += output.cached_prompt_tokens
                    bar.update()
    report.seconds = time.perf_counter() - start
    report.preemptions = engine.scheduler.num_preemptions
    return report
