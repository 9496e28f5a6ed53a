"""GenerationConfig, as the working group's GenAI interfaces spell it (``onnx::genai``).

``GenerationConfig`` holds the limits and stop conditions, a ``SamplingConfig`` (greedy unless
``do_sample``) and a ``BeamSearchConfig`` (beam search when ``num_beams > 1``).  ``validate``
names the first impossible value.  The engine's per-request ``SamplingParams`` is derived from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..engine.sequence import SamplingParams


@dataclass
class SamplingConfig:
    do_sample: bool = False  # False: greedy (the other fields are ignored)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass
class BeamSearchConfig:
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0  # a finished beam's score is its log-probability ÷ length ** length_penalty
    early_stopping: bool = False  # stop as soon as num_beams beams have finished


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    max_length: int | None = None  # prompt + generated tokens; None: the model's context
    min_new_tokens: int = 0
    eos_token_ids: list[int] | None = None  # None: the model's
    ignore_eos: bool = False
    stop_strings: list[str] = field(default_factory=list)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    beam_search: BeamSearchConfig = field(default_factory=BeamSearchConfig)

    def validate(self) -> None:
        self.sampling_params(prompt_len=0).validate()
        beams = self.beam_search
        if beams.num_beams < 1:
            raise ValueError(f"num_beams must be ≥ 1, got {beams.num_beams}")
        if not 1 <= beams.num_return_sequences <= beams.num_beams:
            raise ValueError(f"num_return_sequences must be in [1, num_beams={beams.num_beams}], "
                             f"got {beams.num_return_sequences}")
        if beams.num_beams > 1 and self.sampling.do_sample:
            raise ValueError("beam search with do_sample is not supported: choose num_beams = 1 or do_sample = False")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be ≥ 1, got {self.max_length}")

    def sampling_params(self, prompt_len: int) -> SamplingParams:
        """The engine's parameters for a prompt of ``prompt_len`` tokens."""
        budget = self.max_new_tokens
        if self.max_length is not None:
            budget = min(budget, self.max_length - prompt_len)
            if budget < 1 and prompt_len:
                raise ValueError(f"max_length={self.max_length} leaves no room after a {prompt_len}-token prompt")
        s = self.sampling
        return SamplingParams(
            max_new_tokens=budget, min_new_tokens=self.min_new_tokens,
            temperature=s.temperature if s.do_sample else 0.0, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
            repetition_penalty=s.repetition_penalty, seed=s.seed, eos_token_ids=self.eos_token_ids,
            ignore_eos=self.ignore_eos, stop=list(self.stop_strings))

    def copy(self, **changes) -> GenerationConfig:
        return replace(self, **changes)
