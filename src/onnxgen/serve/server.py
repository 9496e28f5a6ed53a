"""Putting a server together from model folders (what ``onnxgen serve`` runs)."""

from __future__ import annotations

import warnings
from pathlib import Path

from fastapi import FastAPI

from ..engine import LLMEngine
from .app import ServedImageModel, ServedModel, create_app
from .async_engine import AsyncEngine
from .metrics import Metrics


def build_app(model: str | None = None, image_model: str | None = None, api_key: str | None = None,
              max_waiting: int = 256, engine_options: dict | None = None, no_images: bool = False) -> FastAPI:
    if model is None:
        from ..default_model import RECIPE, default_model

        folder, name = default_model(), f"onnxgen-default-{RECIPE}"
    else:
        folder, name = Path(model), Path(model).resolve().name
    engine = AsyncEngine(LLMEngine(folder, **(engine_options or {})), max_waiting=max_waiting, metrics=Metrics())
    text = ServedModel(name, engine)
    image = None if no_images else _image_model(image_model)
    app = create_app(text=text, image=image, api_key=api_key)
    app.router.on_shutdown.append(engine.stop)
    return app


def _image_model(folder: str | None) -> ServedImageModel | None:
    """The text-to-image pipeline, if onnxgen.pipelines.text2image is available."""
    try:
        from ..pipelines.text2image import Text2ImagePipeline
    except ImportError as error:
        if folder:
            raise
        warnings.warn(f"serving no images: {error}", stacklevel=2)
        return None
    if folder is None:
        from ..pipelines.text2image import default_image_model

        try:
            folder = default_image_model()
        except ImportError as error:  # building the default needs torch and diffusers
            warnings.warn(f"serving no images: {error}", stacklevel=2)
            return None
    pipeline = Text2ImagePipeline(folder)

    def generate(prompt, width, height, steps, guidance_scale, seed, negative_prompt, n):
        result = pipeline(prompt, image_width=width, image_height=height, num_inference_steps=steps,
                          guidance_scale=guidance_scale, seed=seed, negative_prompt=negative_prompt,
                          num_images_per_prompt=n)
        return list(result)

    return ServedImageModel(Path(folder).resolve().name, generate)
