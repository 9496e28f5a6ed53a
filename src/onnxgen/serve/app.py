"""The OpenAI-compatible HTTP API (FastAPI), the playground page and the metrics.

    app = create_app(text=ServedModel("name", AsyncEngine(LLMEngine(folder))), image=...)

Every request shares one engine (``AsyncEngine``): requests from all clients are batched
together step by step.  Errors have OpenAI's body ({"error": {"message", "type", "param",
"code"}}) and a 4xx status: 400 for a malformed or impossible request, 401 for a wrong API
key, 404 for an unknown model, 429 (with Retry-After) when the queue is full.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from ..engine import RequestOutput
from .async_engine import AsyncEngine, QueueFull
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, ImageRequest

MAX_PROMPT_CHARS_PER_TOKEN = 64  # a prompt string longer than this × the context is refused before tokenizing


@dataclass
class ServedModel:
    name: str
    engine: AsyncEngine
    default_max_tokens: int = 256


@dataclass
class ServedImageModel:
    name: str
    # (prompt, width, height, steps, guidance_scale, seed, negative_prompt, n) -> list of HxWx3 uint8 arrays
    generate: Callable[..., list]


def create_app(text: ServedModel | None = None, image: ServedImageModel | None = None,
               api_key: str | None = None) -> FastAPI:
    def require_key(request: Request) -> None:
        # A dependency, not an HTTP middleware: Starlette's BaseHTTPMiddleware would hide client
        # disconnects from the handlers, and aborted requests would run on.
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                               type_="authentication_error", code="invalid_api_key")

    app = FastAPI(title="onnxgen", description="OpenAI-compatible API over onnxgen's engine",
                  dependencies=[Depends(require_key)])
    metrics = text.engine.metrics if text else None
    image_lock = asyncio.Lock()

    @app.exception_handler(APIError)
    async def api_error(_request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        return JSONResponse(APIError(400, f"{message}" + (f" ({where})" if where else ""), param=where).body(),
                            status_code=400)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render() if metrics else b"", media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return resources.files("onnxgen.serve").joinpath("static/playground.html").read_text()

    @app.get("/v1/models")
    async def models():
        served = [m.name for m in (text, image) if m]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "onnxgen"}
                                           for n in served]}

    def text_model(name: str) -> ServedModel:
        if text is None or name != text.name:
            known = [m.name for m in (text,) if m]
            raise APIError(404, f"model {name!r} does not exist; this server has {known}", param="model",
                           code="model_not_found")
        return text

    async def start(served: ServedModel, prompt_ids: list[int], body) -> AsyncIterator[RequestOutput]:
        params = body.sampling_params(served.default_max_tokens)
        try:
            return await served.engine.generate(prompt_ids, params)
        except ValueError as error:
            raise APIError(400, str(error), param="prompt") from error
        except QueueFull as error:
            raise APIError(429, f"the server is busy ({error}); retry later", type_="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from error

    def encode(served: ServedModel, prompt) -> list[int]:
        tokenizer = served.engine.engine.tokenizer
        if isinstance(prompt, str):
            limit = served.engine.engine.max_model_len * MAX_PROMPT_CHARS_PER_TOKEN
            if len(prompt) > limit:
                raise APIError(400, f"the prompt has {len(prompt)} characters; more than this model's context "
                                    f"can hold", param="prompt", code="context_length_exceeded")
            if not prompt:
                raise APIError(400, "the prompt is empty", param="prompt")
            if tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
            return tokenizer.encode(prompt)
        return list(prompt)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        served = text_model(body.model)
        ids = encode(served, body.prompt)
        stream = await start(served, ids, body)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
        prefix = body.prompt if body.echo and isinstance(body.prompt, str) else ""
        if body.stream:
            async def events():
                async for out in stream:
                    choice = {"index": 0, "text": out.new_text, "logprobs": None,
                              "finish_reason": _reason(out) if out.finished else None}
                    yield {**meta, "object": "text_completion", "choices": [choice]}
            return _sse(events(), stream)
        final = await _collect(stream, request)
        return {**meta, "object": "text_completion",
                "choices": [{"index": 0, "text": prefix + final.text, "logprobs": None, "finish_reason": _reason(final)}],
                "usage": _usage(final)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        served = text_model(body.model)
        tokenizer = served.engine.engine.tokenizer
        if tokenizer is None or tokenizer.chat_template is None:
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            ids = tokenizer.encode_chat(messages)
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from error
        stream = await start(served, ids, body)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events():
                yield {**meta, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                async for out in stream:
                    if out.new_text or out.finished:
                        yield {**meta, "object": "chat.completion.chunk",
                               "choices": [{"index": 0, "delta": {"content": out.new_text} if out.new_text else {},
                                            "finish_reason": _reason(out) if out.finished else None}]}
                    if out.finished and usage:
                        yield {**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(out)}
            return _sse(events(), stream)
        final = await _collect(stream, request)
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": final.text},
                             "finish_reason": _reason(final), "logprobs": None}],
                "usage": _usage(final)}

    @app.post("/v1/images/generations")
    async def images(body: ImageRequest):
        if image is None or (body.model is not None and body.model != image.name):
            raise APIError(404, f"image model {body.model!r} does not exist"
                                + (f"; this server has {image.name!r}" if image else "; this server serves no images"),
                           param="model", code="model_not_found")
        if not body.prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        width, height = body.width_height()
        async with image_lock:  # one image job at a time; it uses every core
            try:
                arrays = await asyncio.to_thread(image.generate, body.prompt, width, height, body.steps,
                                                 body.guidance_scale, body.seed, body.negative_prompt, body.n)
            except ValueError as error:
                raise APIError(400, str(error)) from error
        return {"created": int(time.time()), "data": [{"b64_json": _png_base64(a)} for a in arrays]}

    return app


def _reason(out: RequestOutput) -> str:
    return {"stop": "stop", "length": "length"}.get(out.finish_reason or "", out.finish_reason or "stop")


def _usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": len(out.token_ids),
            "total_tokens": out.prompt_tokens + len(out.token_ids),
            "prompt_tokens_details": {"cached_tokens": out.cached_prompt_tokens}}


async def _collect(stream: AsyncIterator[RequestOutput], request: Request) -> RequestOutput:
    """The final output; if the client goes away first, the request is aborted."""
    final = None
    try:
        async for out in stream:
            final = out
            if not out.finished and await request.is_disconnected():
                break
    finally:
        await stream.aclose()
    if final is None or not final.finished:
        raise APIError(499, "the client closed the request")
    return final


def _sse(events: AsyncIterator[dict], stream: AsyncIterator[RequestOutput]) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except Exception as error:  # the engine failed mid-stream: say so in the stream
            yield f"data: {json.dumps(APIError(500, str(error), type_='server_error').body())}\n\n"
        finally:
            await stream.aclose()  # a disconnected client aborts its request here
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _png_base64(array) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
