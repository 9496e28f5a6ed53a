"""The serving engine: paged KV blocks, continuous batching, prefix caching, preemption.

One concept per module, as in nano-vllm: ``sequence`` (a request's tokens and blocks),
``block_pool`` (blocks, reference counts, prefix cache), ``scheduler`` (who computes what each
step), ``runner`` (paged inputs, one onnxruntime run), ``sampler`` and ``engine`` (the loop).
"""

from .engine import EngineStats, LLMEngine, RequestOutput
from .sequence import SamplingParams, Sequence, Status

__all__ = ["EngineStats", "LLMEngine", "RequestOutput", "SamplingParams", "Sequence", "Status"]
