"""Text2TextPipeline and Generator: the working group's text-to-text interface over the engine.

    pipe = Text2TextPipeline("model_dir")              # or Text2TextPipeline() for the default model
    print(pipe("Once upon a time", max_new_tokens=32))
    config = pipe.get_generation_config(); config.sampling.do_sample = True
    pipe.set_generation_config(config)
    results = pipe(["a", "b"])                        # a batch runs together (continuous batching)

    generator = pipe.generator()                      # token by token
    generator.append_input_tokens(pipe.tokenizer.encode("Hello"))
    while not generator.is_done():
        token = generator.generate_next_token()

A chat (a list of {"role", "content"} messages) is rendered with the tokenizer's chat template.
Beam search (``num_beams > 1``) runs over the paged cache with copy-on-write block sharing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from ..engine import LLMEngine
from ..engine.beam_search import beam_search
from .config import BeamSearchConfig, GenerationConfig, SamplingConfig

Prompt = str | list[int] | list[dict]


@dataclass
class DecodedResults:
    texts: list[str]
    token_ids: list[list[int]]
    scores: list[float]  # beam search: each text's score; otherwise 0
    finish_reasons: list[str]

    def __str__(self) -> str:
        return self.texts[0] if len(self.texts) == 1 else "\n".join(self.texts)


class Text2TextPipeline:
    def __init__(self, models_path: str | Path | None = None, device: str = "CPU", **engine_options):
        if device.upper() != "CPU":
            raise ValueError(f"the onnxgen backend runs on CPU; device {device!r} is not available")
        if models_path is None:
            from ..default_model import default_model

            models_path = default_model()
        self.engine = LLMEngine(models_path, **engine_options)
        self.tokenizer = self.engine.tokenizer
        self._config = GenerationConfig(eos_token_ids=sorted(self.engine.eos_token_ids))

    def get_generation_config(self) -> GenerationConfig:
        return self._config.copy()

    def set_generation_config(self, config: GenerationConfig) -> None:
        config.validate()
        self._config = config.copy()

    def __call__(self, inputs: Prompt | list[Prompt], generation_config: GenerationConfig | None = None,
                 streamer: Callable[[str], bool | None] | None = None, **overrides) -> DecodedResults:
        """Generate for one prompt or a batch.  ``overrides`` set GenerationConfig fields
        (``max_new_tokens=8``) or its sampling/beam fields (``temperature=0.7``, ``num_beams=4``).
        ``streamer(text)`` gets the text as it comes (one prompt, no beams); returning True stops."""
        config = _with_overrides(generation_config or self._config, overrides)
        config.validate()
        prompts = [self._ids(p) for p in (inputs if _is_batch(inputs) else [inputs])]
        if config.beam_search.num_beams > 1:
            return self._beam_search(prompts, config)
        if streamer is not None and len(prompts) != 1:
            raise ValueError("a streamer takes one prompt at a time")
        ids = [self.engine.add_request(p, config.sampling_params(len(p))) for p in prompts]
        final = {}
        for output in self.engine.iterate():
            if streamer is not None and output.new_text and streamer(output.new_text):
                self.engine.abort_request(output.request_id)
            if output.finished:
                final[output.request_id] = output
        outputs = [final[i] for i in ids]
        return DecodedResults([o.text for o in outputs], [o.token_ids for o in outputs], [0.0] * len(outputs),
                              [o.finish_reason for o in outputs])

    def generator(self, generation_config: GenerationConfig | None = None) -> Generator:
        return Generator(self, generation_config or self._config)

    def _beam_search(self, prompts: list[list[int]], config: GenerationConfig) -> DecodedResults:
        beams, texts, tokens, scores = config.beam_search, [], [], []
        eos = set() if config.ignore_eos else set(config.eos_token_ids or self.engine.eos_token_ids)
        for prompt in prompts:
            budget = config.sampling_params(len(prompt)).max_new_tokens
            for h in beam_search(self.engine, prompt, num_beams=beams.num_beams, max_new_tokens=budget,
                                 eos_token_ids=eos, min_new_tokens=config.min_new_tokens,
                                 length_penalty=beams.length_penalty, early_stopping=beams.early_stopping,
                                 num_return_sequences=beams.num_return_sequences):
                tokens.append(h.token_ids)
                texts.append(self.tokenizer.decode(h.token_ids) if self.tokenizer else "")
                scores.append(h.score)
        return DecodedResults(texts, tokens, scores, ["beam"] * len(texts))

    def _ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer: give prompts as token ids")
            if not prompt:
                raise ValueError("the prompt is empty: give at least one token")
            return self.tokenizer.encode(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self.tokenizer.encode_chat(prompt)
        return [int(t) for t in prompt]


class Generator:
    """One sequence, a token at a time, in the pipeline's engine (other requests may share the
    steps).  Input tokens may be appended before generation starts or between tokens."""

    def __init__(self, pipeline: Text2TextPipeline, config: GenerationConfig):
        if config.beam_search.num_beams > 1:
            raise ValueError("the Generator produces one sequence: use num_beams = 1")
        config.validate()
        self.engine = pipeline.engine
        self.config = config
        self.pending: list[int] = []
        self.request_id: str | None = None
        self.token_ids: list[int] = []
        self._done = False

    def append_input_tokens(self, tokens: list[int]) -> None:
        if self._done:
            raise RuntimeError("this generator is done; start a new one")
        tokens = [int(t) for t in tokens]
        if self.request_id is None:
            self.pending.extend(tokens)
        else:
            self.engine.append_tokens(self.request_id, tokens)

    def generate_next_token(self) -> int:
        if self._done:
            raise RuntimeError("this generator is done: check is_done() first")
        if self.request_id is None:
            params = self.config.sampling_params(len(self.pending))
            self.request_id = self.engine.add_request(self.pending, params)
        while True:
            for output in self.engine.step():
                if output.request_id == self.request_id and output.new_token_ids:
                    self.token_ids.extend(output.new_token_ids)
                    self._done = output.finished
                    return output.new_token_ids[-1]
                if output.request_id == self.request_id and output.finished:  # aborted
                    self._done = True
                    raise RuntimeError(f"the request ended ({output.finish_reason}) without a token")

    def is_done(self) -> bool:
        return self._done

    def abort(self) -> None:
        if self.request_id is not None and not self._done:
            self.engine.abort_request(self.request_id)
        self._done = True


def _is_batch(inputs) -> bool:
    return isinstance(inputs, list) and bool(inputs) and not isinstance(inputs[0], (int, dict))


def _with_overrides(config: GenerationConfig, overrides: dict) -> GenerationConfig:
    if not overrides:
        return config
    top = {f.name for f in fields(GenerationConfig)}
    sampling = {f.name for f in fields(SamplingConfig)}
    beam = {f.name for f in fields(BeamSearchConfig)}
    config = config.copy()
    config.sampling = SamplingConfig(**config.sampling.__dict__)
    config.beam_search = BeamSearchConfig(**config.beam_search.__dict__)
    for name, value in overrides.items():
        if name in top:
            setattr(config, name, value)
        elif name in sampling:
            setattr(config.sampling, name, value)
        elif name in beam:
            setattr(config.beam_search, name, value)
        else:
            raise TypeError(f"unknown generation option {name!r}")
    if "temperature" in overrides and overrides["temperature"] > 0 and "do_sample" not in overrides:
        config.sampling.do_sample = True
    return config
