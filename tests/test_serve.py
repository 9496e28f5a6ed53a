"""onnxgen serve on loopback, driven by the openai client and raw HTTP: answers equal the
engine's own greedy runs, 64 concurrent streams lose and duplicate nothing, disconnects free
their blocks, a full queue answers 429, and bad requests get OpenAI-style 4xx bodies while the
server keeps serving."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from onnxgen.engine import LLMEngine, SamplingParams
from onnxgen.serve import AsyncEngine, Metrics, ServedModel, create_app

from loopback_server import Server

KEY = "test-key"


@pytest.fixture(scope="module")
def default_folder(tmp_path_factory):
    import os

    from onnxgen import default_model

    os.environ["ONNXGEN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return default_model.default_model(progress=False)


def start(folder, api_key=KEY, max_waiting=256, **engine_options):
    engine = AsyncEngine(LLMEngine(folder, kv_cache_gib=0.1, **engine_options), max_waiting=max_waiting,
                         metrics=Metrics())
    return Server(create_app(text=ServedModel("tiny", engine), api_key=api_key)), engine


@pytest.fixture(scope="module")
def server(default_folder):
    server, engine = start(default_folder)
    yield server
    server.stop()
    engine.stop()


@pytest.fixture(scope="module")
def reference(default_folder):
    """Greedy text of a prompt run alone in a fresh engine."""
    engine = LLMEngine(default_folder, kv_cache_gib=0.05)

    def run(prompt, max_tokens, chat=False):
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else prompt
        return engine.generate([ids], SamplingParams(max_new_tokens=max_tokens, ignore_eos=True))[0].text

    return run


def client(server, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_openai_client_completions_and_chat(server, reference):
    api = client(server)
    assert [m.id for m in api.models.list().data] == ["tiny"]
    done = api.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert done.choices[0].text == reference("Once upon a time", 12)
    assert done.usage.completion_tokens == 12 and done.choices[0].finish_reason == "length"
    chat = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi there"}],
                                       max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == reference("Hi there", 10, chat=True)
    pieces, usage = [], None
    for chunk in api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi there"}],
                                             max_tokens=10, temperature=0, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == chat.choices[0].message.content and usage.completion_tokens == 10
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == done.choices[0].text


def test_64_concurrent_streams_are_complete_and_exact(server, reference):
    from openai import AsyncOpenAI

    prompts = [(f"Request {i}: tell me about number {i * 7}", 4 + (i * 5) % 23) for i in range(64)]

    async def one(api, prompt, max_tokens):
        text, chunks = "", 0
        stream = await api.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            text += chunk.choices[0].text
            chunks += 1
            finish = chunk.choices[0].finish_reason
        return text, finish

    async def main():
        async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120) as api:
            return await asyncio.gather(*(one(api, p, n) for p, n in prompts))

    results = asyncio.run(main())
    for (prompt, n), (text, finish) in zip(prompts, results):
        assert finish == "length"
        assert text == reference(prompt, n), prompt


def test_disconnected_clients_free_their_blocks(default_folder):
    server, engine = start(default_folder, api_key=None)
    try:
        body = {"model": "tiny", "prompt": "A long story", "max_tokens": 400, "temperature": 0, "stream": True,
                "ignore_eos": True}
        for _ in range(3):
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
        with httpx.Client(timeout=30) as http:  # a non-streaming client that gives up
            with pytest.raises(httpx.ReadTimeout):
                http.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=0.3)
        deadline = time.time() + 20
        while engine.engine.has_unfinished_requests() or engine.engine.pool.num_free != len(engine.engine.pool.blocks):
            assert time.time() < deadline, "aborted requests still hold blocks"
            time.sleep(0.05)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'onnxgen_requests_finished_total{reason="abort"} 4.0' in metrics, [
            line for line in metrics.splitlines() if "finished_total" in line]
    finally:
        server.stop()
        engine.stop()


def test_a_full_queue_answers_429_and_loses_nothing(default_folder):
    server, engine = start(default_folder, api_key=None, max_waiting=2, max_num_seqs=1)
    try:
        async def one(http, i):
            response = await http.post(f"{server.url}/v1/completions", json={
                "model": "tiny", "prompt": f"prompt {i}", "max_tokens": 24, "temperature": 0, "ignore_eos": True})
            return response

        async def main():
            async with httpx.AsyncClient(timeout=60) as http:
                return await asyncio.gather(*(one(http, i) for i in range(12)))

        responses = asyncio.run(main())
        busy = [r for r in responses if r.status_code == 429]
        served = [r for r in responses if r.status_code == 200]
        assert busy and served and len(busy) + len(served) == 12
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error" for r in busy)
        assert all(r.json()["usage"]["completion_tokens"] == 24 for r in served)
    finally:
        server.stop()
        engine.stop()


@pytest.mark.parametrize("body, status, fragment", [
    ("{not json", 400, "not valid JSON"),
    ({"model": "nope", "prompt": "x"}, 404, "model 'nope' does not exist"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -3}, 400, "max_tokens must be ≥ 1"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": 12}, 400, "prompt"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x" * 400_000}, 400, "context"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n=2 is not supported"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p must be in"),
    ({"model": "tiny", "prompt": [5, 99999]}, 400, "token ids must be in"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt is empty"),
])
def test_bad_requests_get_openai_errors(server, body, status, fragment):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{server.url}/v1/completions", content=content, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"]
    ok = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=30,
                    json={"model": "tiny", "prompt": "still serving", "max_tokens": 2})
    assert ok.status_code == 200


def test_chat_errors_and_api_key(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    bad_role = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=30,
                          json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]})
    assert bad_role.status_code == 400 and "role" in bad_role.json()["error"]["message"]
    empty = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=30,
                       json={"model": "tiny", "messages": []})
    assert empty.status_code == 400
    for key in (None, "wrong"):
        response = httpx.get(f"{server.url}/v1/models", timeout=30,
                             headers={"Authorization": f"Bearer {key}"} if key else {})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    images = httpx.post(f"{server.url}/v1/images/generations", headers=headers, json={"prompt": "a cat"})
    assert images.status_code == 404 and "serves no images" in images.json()["error"]["message"]


def test_metrics(server):
    client(server).completions.create(model="tiny", prompt="metrics", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("onnxgen_requests_running", "onnxgen_requests_waiting", "onnxgen_kv_blocks_used",
                 "onnxgen_generation_tokens_total", "onnxgen_generation_tokens_per_second",
                 "onnxgen_time_to_first_token_seconds_bucket", "onnxgen_inter_token_latency_seconds_bucket"):
        assert name in text, name


def test_images_endpoint(default_folder, tmp_path):
    """/v1/images/generations returns the pipeline's own image (same seed) as a PNG; bad sizes are 400."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from onnxgen.cli import main
    from onnxgen.export.diffusion import write_random_checkpoint
    from onnxgen.pipelines.text2image import Text2ImagePipeline
    from onnxgen.serve.server import _image_model
    from test_text2image import TINY

    write_random_checkpoint(tmp_path / "sd", TINY, seed=3)
    assert main(["export-diffusion", str(tmp_path / "sd"), str(tmp_path / "sd-onnx")]) == 0
    engine = AsyncEngine(LLMEngine(default_folder, kv_cache_gib=0.05), metrics=Metrics())
    server = Server(create_app(text=ServedModel("tiny", engine), image=_image_model(str(tmp_path / "sd-onnx"))))
    try:
        body = {"prompt": "a red cube", "size": "64x64", "steps": 3, "seed": 5, "n": 1}
        response = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        png = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
        want = Text2ImagePipeline(tmp_path / "sd-onnx")("a red cube", image_width=64, image_height=64,
                                                        num_inference_steps=3, seed=5)
        np.testing.assert_array_equal(np.asarray(png.convert("RGB")), want[0])
        bad = httpx.post(f"{server.url}/v1/images/generations", json={**body, "size": "60x64"}, timeout=30)
        assert bad.status_code == 400 and "multiples of 8" in bad.json()["error"]["message"]
        empty = httpx.post(f"{server.url}/v1/images/generations", json={**body, "prompt": ""}, timeout=30)
        assert empty.status_code == 400
    finally:
        server.stop()
        engine.stop()
