"""``onnxgen serve``: an OpenAI-compatible server over the engine (and the image pipeline)."""

from .app import ServedImageModel, ServedModel, create_app
from .async_engine import AsyncEngine, QueueFull
from .metrics import Metrics

__all__ = ["AsyncEngine", "Metrics", "QueueFull", "ServedImageModel", "ServedModel", "create_app"]
