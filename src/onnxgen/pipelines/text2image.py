"""Text-to-image: the working group's ``Text2Image::Pipeline`` over ONNX components on onnxruntime.

``Text2ImagePipeline(folder)`` runs a folder written by ``onnxgen export-diffusion`` (text encoder,
UNet and VAE decoder as ONNX, CLIP tokenizer, scheduler config, ``onnxgen.json``) with onnxruntime
and numpy only: no torch at run time.  ``Text2ImagePipeline()`` uses the embedded default, a
Stable-Diffusion-style model with seeded random weights and CLIP's real tokenizer, built once into
``$ONNXGEN_CACHE`` (default ``~/.cache/onnxgen``); building it needs the export extra (torch,
diffusers), running it does not.

As in the header (``text2image_pipeline.hpp``): ``pipeline(prompt)`` returns the images,
``get_generation_config()`` / ``set_generation_config(config)``; the config has the header's
``image_width``, ``image_height``, ``num_inference_steps``, ``num_images_per_prompt`` and what users
expect besides: ``guidance_scale``, ``negative_prompt``, ``seed``, ``scheduler`` (euler,
euler_ancestral, ddim, dpmpp).  Any config field may also be given to the call as a keyword.

Choices, stated:
- An empty (or blank) prompt is refused with ``ValueError``: say what you want to see.  (diffusers
  accepts one and samples unconditionally; an empty negative prompt is still the default.)
- ``seed`` seeds numpy's PCG64 generator, which draws the initial latents (and the ancestral
  sampler's noise): images are reproducible for a seed, but differ from torch's for the same seed.
  ``latents=`` gives the initial latents outright.
- ``callback(step, num_steps, latents)`` is called after every step; returning ``True`` stops
  early and the current latents are decoded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from ..cache import build_once, cache_dir
from . import schedulers
from .clip_tokenizer import CLIPTokenizer

FORMAT = "onnxgen.text2image/1"
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
DEFAULT_RECIPE = "sd-tiny-v2"  # v2: exported with the attention fusion (opset 23)
DEFAULT_SEED = 20261124


@dataclass
class ImageGenerationConfig:
    """How to generate: the header's four fields, then guidance, negative prompt, seed, scheduler.

    ``image_width`` / ``image_height`` of ``None`` take the model's native size.
    """

    image_width: int | None = None
    image_height: int | None = None
    num_inference_steps: int = 20
    num_images_per_prompt: int = 1
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    seed: int | None = None
    scheduler: str = "euler"

    def update(self, **overrides) -> ImageGenerationConfig:
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown generation option(s) {sorted(unknown)}; options are {sorted(names)}")
        return replace(self, **{k: v for k, v in overrides.items()})

    def validate(self, multiple: int = 8) -> None:
        for name in ("image_width", "image_height"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (int, np.integer)) or value <= 0 or value % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")
            if value % multiple:
                raise ValueError(f"{name} must be a multiple of {multiple} for this model (the VAE's scale times "
                                 f"the UNet's downsampling), got {value}")
        if not isinstance(self.num_inference_steps, (int, np.integer)) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps!r}")
        if not isinstance(self.num_images_per_prompt, (int, np.integer)) or self.num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {self.num_images_per_prompt!r}")
        if not np.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        schedulers.create(self.scheduler)  # an unknown name raises here


GenerationConfig = ImageGenerationConfig  # the header's name, inside the Text2Image namespace


def default_image_model(progress: bool = True) -> Path:
    """The embedded default's folder, built on first use (needs torch and diffusers: the export extra).

    A Stable-Diffusion-style model with seeded random weights (UNet 18.8M, CLIP text 38M, VAE 3.9M
    parameters; native size 256×256) and CLIP's real 49,408-token tokenizer from ``openai-clip``.
    Its images are noise-like (the weights are random) but every step of the path is the real one.
    """
    import shutil

    if (cache_dir() / DEFAULT_RECIPE / "onnxgen.json").exists():
        return cache_dir() / DEFAULT_RECIPE
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        raise ImportError(f"building the default image model needs torch and diffusers ({error.name} is missing): "
                          "pip install 'onnxgen[export]', or pass --model with a folder made by "
                          "`onnxgen export-diffusion`") from error
    from ..export.diffusion import BENCH_CONFIG, export_diffusion, write_random_checkpoint

    def make(work: Path) -> Path:
        if progress:
            print(f"building the default image model (random-weight SD-style, once) in {cache_dir() / DEFAULT_RECIPE}")
        write_random_checkpoint(work / "checkpoint", BENCH_CONFIG, seed=DEFAULT_SEED)
        export_diffusion(work / "checkpoint", work / "model", progress=_export_bar() if progress else None)
        shutil.rmtree(work / "checkpoint")
        return work / "model"

    return build_once(DEFAULT_RECIPE, make)


def _export_bar():
    from tqdm import tqdm

    bar = tqdm(total=len(COMPONENTS), unit="component", desc="export", leave=False)

    def update(name: str, done: int, total: int) -> None:
        bar.set_postfix_str(name)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


def _session(path: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Text2ImagePipeline:
    """``Text2ImagePipeline(models_path=None, device="CPU")``; ``pipeline("a cat")`` -> uint8 images."""

    def __init__(self, models_path: str | Path | None = None, device: str = "CPU", *, threads: int | None = None,
                 config: ImageGenerationConfig | None = None):
        if str(device).upper() != "CPU":
            raise ValueError(f"device {device!r} is not available to onnxgen's text-to-image pipeline; devices: CPU")
        folder = Path(models_path) if models_path is not None else default_image_model()
        manifest_path = folder / "onnxgen.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{folder} has no onnxgen.json: it is not a text-to-image model folder "
                                    "(make one with `onnxgen export-diffusion CHECKPOINT OUT`)")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path} is a {manifest.get('format')!r} model, not {FORMAT!r}")
        paths = {name: folder / manifest["components"][name] for name in COMPONENTS}
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            raise FileNotFoundError(f"the model folder lacks component file(s): {', '.join(missing)}")
        self.folder, self.manifest = folder, manifest
        self.tokenizer = CLIPTokenizer(folder / manifest["tokenizer"])
        self.scheduler_config = json.loads((folder / manifest["scheduler"]).read_text())
        self.text_encoder = _session(paths["text_encoder"], threads)
        self.unet = _session(paths["unet"], threads)
        self.vae_decoder = _session(paths["vae_decoder"], threads)
        vae = manifest["vae"]
        self.vae_scale_factor = int(vae["scale_factor"])
        self.latent_channels = int(vae["latent_channels"])
        self.size_multiple = self.vae_scale_factor * int(manifest["unet"].get("downsample_factor", 1))
        self.default_size = int(manifest.get("default_size", 512))
        self._config = config or ImageGenerationConfig()
        self._config.validate(self.size_multiple)

    # The header's interface.
    def get_generation_config(self) -> ImageGenerationConfig:
        return replace(self._config)

    def set_generation_config(self, config: ImageGenerationConfig) -> None:
        config.validate(self.size_multiple)
        self._config = replace(config)

    def encode_prompt(self, prompts: list[str]) -> np.ndarray:
        """The text encoder's last hidden state for each prompt, ``[len(prompts), 77, D]``."""
        ids = self.tokenizer(prompts)
        return self.text_encoder.run(["last_hidden_state"], {"input_ids": ids})[0]

    def __call__(self, prompt: str | list[str], *, callback: Callable[[int, int, np.ndarray], bool | None] | None = None,
                 latents: np.ndarray | None = None, output_type: str = "np", progress: bool = False, **options):
        """Images for ``prompt`` (a string or a list of them).

        ``output_type``: ``"np"`` uint8 ``[N, H, W, 3]``; ``"float"`` float32 in [0, 1]; ``"pil"`` a
        list of PIL images; ``"latent"`` the final latents.  ``N`` = prompts × num_images_per_prompt.
        """
        config = self._config.update(**options)
        config.validate(self.size_multiple)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("the prompt is empty: give a non-empty text prompt")
        if output_type not in ("np", "float", "pil", "latent"):
            raise ValueError(f"output_type must be np, float, pil or latent, got {output_type!r}")
        width = config.image_width or self.default_size
        height = config.image_height or self.default_size
        per_prompt = config.num_images_per_prompt
        batch = len(prompts) * per_prompt
        guided = config.guidance_scale > 1.0

        text = np.repeat(self.encode_prompt(prompts), per_prompt, axis=0)
        if guided:
            negative = config.negative_prompt or ""
            uncond = np.repeat(self.encode_prompt([negative] * len(prompts)), per_prompt, axis=0)
            text = np.concatenate([uncond, text])

        scheduler = schedulers.create(config.scheduler, self.scheduler_config)
        scheduler.set_timesteps(config.num_inference_steps)
        rng = np.random.default_rng(config.seed)
        shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = np.asarray(latents, np.float32) * np.float32(scheduler.init_noise_sigma)

        def noise(shape):
            return rng.standard_normal(shape, dtype=np.float32)

        steps = len(scheduler.timesteps)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, unit="step", desc="denoising", leave=False)
        for i, t in enumerate(scheduler.timesteps):
            model_in = np.concatenate([latents, latents]) if guided else latents
            model_in = scheduler.scale_model_input(model_in, i)
            timestep = np.full(model_in.shape[0], t, dtype=np.float32)
            eps = self.unet.run(["out_sample"], {"sample": model_in, "timestep": timestep,
                                                 "encoder_hidden_states": text})[0]
            if guided:
                eps_uncond, eps_text = eps[:batch], eps[batch:]
                eps = eps_uncond + np.float32(config.guidance_scale) * (eps_text - eps_uncond)
            latents = scheduler.step(eps, i, latents, noise=noise)
            if bar:
                bar.update()
            if callback is not None and callback(i, steps, latents):
                break
        if bar:
            bar.close()
        if output_type == "latent":
            return latents
        return self.decode(latents, output_type)

    def decode(self, latents: np.ndarray, output_type: str = "np"):
        """VAE-decode latents into images (see ``__call__`` for ``output_type``)."""
        vae = self.manifest["vae"]
        z = latents / np.float32(vae["scaling_factor"])
        if vae.get("shift_factor") is not None:
            z = z + np.float32(vae["shift_factor"])
        images = [self.vae_decoder.run(["sample"], {"latent_sample": z[i:i + 1]})[0][0] for i in range(len(z))]
        images = np.clip(np.stack(images) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
        if output_type == "float":
            return images.astype(np.float32)
        pixels = (images * 255).round().astype(np.uint8)
        if output_type == "pil":
            from PIL import Image

            return [Image.fromarray(p) for p in pixels]
        return pixels

    def config_dict(self) -> dict:
        return asdict(self._config)
