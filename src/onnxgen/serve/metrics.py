"""Prometheus metrics of the server (prometheus_client, one registry per app)."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..engine import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("onnxgen_requests_running", "Requests the engine is computing", registry=r)
        self.waiting = Gauge("onnxgen_requests_waiting", "Requests queued for the engine", registry=r)
        self.kv_used = Gauge("onnxgen_kv_blocks_used", "KV cache blocks held (including cached prefixes in use)", registry=r)
        self.kv_total = Gauge("onnxgen_kv_blocks_total", "KV cache blocks", registry=r)
        self.tokens = Counter("onnxgen_generation_tokens", "Tokens generated", registry=r)
        self.tokens_per_second = Gauge("onnxgen_generation_tokens_per_second",
                                       "Tokens generated per second over the last 10 s", registry=r)
        self.requests = Counter("onnxgen_requests_finished", "Requests finished", ["reason"], registry=r)
        self.ttft = Histogram("onnxgen_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("onnxgen_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self._arrival: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._recent: deque[tuple[float, int]] = deque()

    def arrived(self, request_id: str, now: float) -> None:
        self._arrival[request_id] = now

    def aborted(self, request_id: str) -> None:
        self._arrival.pop(request_id, None)
        self._last.pop(request_id, None)
        self.requests.labels("abort").inc()

    def observe(self, output: RequestOutput, now: float) -> None:
        rid = output.request_id
        if output.new_token_ids:
            self.tokens.inc(len(output.new_token_ids))
            self._recent.append((now, len(output.new_token_ids)))
            if rid in self._last:
                self.itl.observe(now - self._last[rid])
            elif rid in self._arrival:
                self.ttft.observe(now - self._arrival[rid])
            self._last[rid] = now
        if output.finished:
            self.requests.labels(output.finish_reason or "stop").inc()
            self._arrival.pop(rid, None)
            self._last.pop(rid, None)

    def gauges(self, running: int, waiting: int, kv_used: int, kv_total: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_used.set(kv_used)
        self.kv_total.set(kv_total)
        now = time.perf_counter()
        while self._recent and self._recent[0][0] < now - 10:
            self._recent.popleft()
        self.tokens_per_second.set(sum(n for _, n in self._recent) / 10)

    def render(self) -> bytes:
        return generate_latest(self.registry)
