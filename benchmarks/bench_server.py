"""`onnxgen serve` under load: requests/s, tokens/s, TTFT and ITL at 1, 8, 32 and 64 clients.

The server runs as its own process (the real CLI) on loopback; clients are asyncio tasks that
each stream one request after another (OpenAI streaming completions, token ids as prompts,
exact output lengths).  Every level serves the same kind of requests: prompts of 32–256
tokens, outputs of 32–128.

Model: the random Llama of peers.md (hidden 512, 8 layers, vocab 32000; built here from a
config) or ``--model DIR``.  Peers: neither OpenVINO GenAI nor onnxruntime-genai ships an HTTP
server in its Python package (OpenVINO Model Server is a separate C++ service, not installable
from PyPI here), so the table compares the server with the engine driven in-process
(``onnxgen bench serve``) at the same concurrency: what HTTP, JSON and SSE cost.

    .venv/bin/python benchmarks/bench_server.py            # 1, 8, 32, 64 clients (minutes)
    .venv/bin/python benchmarks/bench_server.py --quick    # 1 and 8 clients, fewer requests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_for(count: int, seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    return [(list(map(int, rng.integers(3, 32000, int(rng.integers(32, 257))))), int(rng.integers(32, 129)))
            for _ in range(count)]


async def load(url: str, model: str, clients: int, requests: list) -> dict:
    import httpx

    queue = list(requests)
    ttft, itl, tokens = [], [], 0

    async def client(http):
        nonlocal tokens
        while queue:
            prompt, length = queue.pop()
            body = {"model": model, "prompt": prompt, "max_tokens": length, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            start = last = time.perf_counter()
            first = True
            async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                assert response.status_code == 200, await response.aread()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.perf_counter()
                    json.loads(line[6:])
                    tokens += 1
                    (ttft if first else itl).append(now - (start if first else last))
                    first, last = False, now

    limits = httpx.Limits(max_connections=clients + 4)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "requests": len(requests), "tokens": tokens, "ttft": ttft, "itl": itl}


def in_process(model_dir: Path, clients: int, requests: list) -> dict:
    """The same requests through the engine directly, at most ``clients`` at a time."""
    from onnxgen.engine import LLMEngine, SamplingParams

    engine = LLMEngine(model_dir)
    queue, tokens, ttft, itl, last, arrival = list(requests), 0, [], [], {}, {}
    start = time.perf_counter()
    while queue or engine.has_unfinished_requests():
        while queue and len(engine.requests) < clients:
            prompt, length = queue.pop()
            arrival[engine.add_request(prompt, SamplingParams(max_new_tokens=length, ignore_eos=True))] = \
                time.perf_counter()
        for out in engine.step():
            now = time.perf_counter()
            tokens += len(out.new_token_ids)
            if out.request_id in last:
                itl.append(now - last[out.request_id])
            else:
                ttft.append(now - arrival[out.request_id])
            last[out.request_id] = now
    return {"seconds": time.perf_counter() - start, "requests": len(requests), "tokens": tokens, "ttft": ttft,
            "itl": itl}


def row(name: str, clients: int, r: dict) -> str:
    p = lambda v, q: f"{1000 * np.percentile(v, q):.0f}"  # noqa: E731
    return (f"| {name} | {clients} | {r['requests'] / r['seconds']:.2f} | {r['tokens'] / r['seconds']:.0f} | "
            f"{p(r['ttft'], 50)} / {p(r['ttft'], 99)} | {p(r['itl'], 50)} / {p(r['itl'], 99)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder (default: the random Llama of peers.md, built here)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    levels = [1, 8] if args.quick else [1, 8, 32, 64]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else None
        if model_dir is None:
            from bench_serving import make_checkpoint

            from onnxgen.export.llm import build

            make_checkpoint("llama-56M", Path(tmp) / "hf")
            model_dir = build(Path(tmp) / "hf", Path(tmp) / "model")
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "onnxgen.cli", "serve", "--model", str(model_dir),
                                   "--port", str(port), "--no-images", "--max-waiting", "1024"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
        try:
            import httpx

            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            print("| system | clients | requests/s | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |")
            print("|---|---|---|---|---|---|")
            for clients in levels:
                requests = requests_for(max(4, 2 * clients) if args.quick else max(8, 2 * clients), seed=clients)
                print(row("onnxgen serve (HTTP, SSE)", clients, asyncio.run(load(url, model, clients, requests))),
                      flush=True)
                print(row("engine in-process", clients, in_process(model_dir, clients, requests)), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
