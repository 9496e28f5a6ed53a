"""Two local replicas of the server behind Ray Serve's proxy: both serve, answers (greedy) equal
a single engine's, streaming passes through."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from onnxgen.engine import LLMEngine, SamplingParams


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    import os

    from onnxgen import default_model
    from onnxgen.serve import replicas

    os.environ["ONNXGEN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    folder = default_model.default_model(progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    replicas.run(2, "127.0.0.1", port, threads_per_replica=1, blocking=False, model=str(folder), image_model=None,
                 api_key=None, max_waiting=64, engine_options={"kv_cache_gib": 0.05}, no_images=True)
    yield f"http://127.0.0.1:{port}", folder
    replicas.shutdown()


def test_two_replicas_answer_like_one_engine(replicated):
    url, folder = replicated
    pids = {httpx.get(f"{url}/replica", timeout=30).json()["pid"] for _ in range(20)}
    assert len(pids) == 2, f"requests reached {len(pids)} replica(s)"
    engine = LLMEngine(folder, kv_cache_gib=0.05)
    name = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    for prompt in ("Hello", "Once upon a time", "A third prompt"):
        want = engine.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].text
        body = {"model": name, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"] == want
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == want
