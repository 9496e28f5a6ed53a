"""The OpenAI request bodies the server accepts (pydantic), and their errors.

Fields OpenAI defines that this server cannot honour (``n`` > 1, ``logprobs``, non-zero
presence/frequency penalties, tools) are refused with a 400 that names them rather than
ignored.  vLLM's extensions ``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens`` and
``ignore_eos`` are accepted.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine import SamplingParams


class APIError(Exception):
    """An error with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    user: str | None = None

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.n != 1:
            raise APIError(400, f"n={self.n} is not supported: this server returns one choice per request", param="n")
        if self.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported (use repetition_penalty)", param=name)
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be ≥ 1, got {max_tokens}", param="max_tokens")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(max_new_tokens=max_tokens, min_new_tokens=self.min_tokens,
                                temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                                repetition_penalty=self.repetition_penalty, seed=self.seed, stop=stop,
                                ignore_eos=self.ignore_eos)
        try:
            params.validate()
        except ValueError as error:
            raise APIError(400, str(error)) from error
        return params


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    echo: bool = False


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    stream_options: StreamOptions | None = None
    tools: list | None = None

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling_params(default_max_tokens)


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str
    model: str | None = None
    n: int = Field(default=1, ge=1, le=4)
    size: str = "256x256"
    response_format: Literal["b64_json"] = "b64_json"
    steps: int = Field(default=20, ge=1, le=200)
    guidance_scale: float = 7.5
    seed: int | None = None
    negative_prompt: str | None = None

    def width_height(self) -> tuple[int, int]:
        try:
            width, height = (int(v) for v in self.size.lower().split("x"))
        except ValueError:
            raise APIError(400, f"size must be WIDTHxHEIGHT, got {self.size!r}", param="size") from None
        if width % 8 or height % 8 or not (64 <= width <= 1024 and 64 <= height <= 1024):
            raise APIError(400, f"size {self.size} must be multiples of 8 between 64 and 1024", param="size")
        return width, height
