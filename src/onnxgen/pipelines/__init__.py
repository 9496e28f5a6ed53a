"""The working group's GenAI pipeline interfaces over onnxgen's engine."""

from .config import BeamSearchConfig, GenerationConfig, SamplingConfig
from .text2image import ImageGenerationConfig, Text2ImagePipeline
from .text2text import DecodedResults, Generator, Text2TextPipeline

__all__ = ["BeamSearchConfig", "DecodedResults", "GenerationConfig", "Generator", "ImageGenerationConfig",
           "SamplingConfig", "Text2ImagePipeline", "Text2TextPipeline"]
