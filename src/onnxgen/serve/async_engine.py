"""The engine on a thread of its own, shared by every HTTP request (continuous batching across clients).

``generate`` is an async iterator of a request's outputs.  Requests and aborts reach the
engine thread through a queue; outputs come back to each request's asyncio queue.  A client
that goes away closes its iterator, which aborts the request and frees its blocks.  When more
than ``max_waiting`` requests are queued, ``generate`` refuses at once with ``QueueFull``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator

from ..engine import LLMEngine, RequestOutput, SamplingParams
from .metrics import Metrics


class QueueFull(Exception):
    """Too many requests are waiting; the client should retry later."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, max_waiting: int = 256, metrics: Metrics | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._queued = 0  # requests submitted and not yet admitted by the engine thread
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="onnxgen-engine", daemon=True)
        self._thread.start()

    # -- asyncio side ---------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; raises ValueError (bad request) or QueueFull first."""
        self.engine.check_request(prompt_ids, params)
        with self._lock:
            if self._queued + len(self.engine.scheduler.waiting) >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting")
            self._queued += 1
        request_id = uuid.uuid4().hex
        outputs: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._send(("add", request_id, prompt_ids, params, loop, outputs))
        return self._stream(request_id, outputs)

    async def _stream(self, request_id: str, outputs: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer left early (a client disconnected): free the blocks
                self._send(("abort", request_id))

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    # -- engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        while not self._stopping:
            self._take_commands(sinks)
            if not self.engine.has_unfinished_requests():
                self._update_gauges()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # a failed step fails its requests, not the server
                for request_id, (loop, sink) in list(sinks.items()):
                    self.engine.abort_request(request_id)
                    loop.call_soon_threadsafe(sink.put_nowait, RuntimeError(f"the engine step failed: {error}"))
                sinks.clear()
                self.engine.step()  # reports the aborts; nothing to run
                continue
            now = time.perf_counter()
            for output in outputs:
                target = sinks.get(output.request_id)
                if target is None:
                    continue
                if self.metrics:
                    self.metrics.observe(output, now)
                target[0].call_soon_threadsafe(target[1].put_nowait, output)
                if output.finished:
                    del sinks[output.request_id]
            self._update_gauges()

    def _take_commands(self, sinks) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt_ids, params, loop, sink = command
                with self._lock:
                    self._queued -= 1
                try:
                    self.engine.add_request(prompt_ids, params, request_id)
                except ValueError as error:
                    loop.call_soon_threadsafe(sink.put_nowait, error)
                    continue
                sinks[request_id] = (loop, sink)
                if self.metrics:
                    self.metrics.arrived(request_id, time.perf_counter())
            else:
                _, request_id = command
                if request_id in sinks:
                    del sinks[request_id]
                    self.engine.abort_request(request_id)
                    if self.metrics:
                        self.metrics.aborted(request_id)

    def _update_gauges(self) -> None:
        if self.metrics:
            scheduler = self.engine.scheduler
            used = len(self.engine.pool.blocks) - self.engine.pool.num_free
            self.metrics.gauges(len(scheduler.running), len(scheduler.waiting) + self._queued, used,
                                len(self.engine.pool.blocks))
