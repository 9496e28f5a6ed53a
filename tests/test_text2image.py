"""Text-to-image: the exporter, the numpy schedulers and the whole pipeline against diffusers.

Oracles: each exported ONNX component against its diffusers/transformers module on random weights;
each numpy scheduler against diffusers' scheduler of the same name; the whole pipeline against
diffusers' StableDiffusionPipeline with the same initial latents, scheduler, steps and guidance (the
ancestral sampler's noise is fed to both from one numpy generator); the CLIP tokenizer against
transformers' CLIPTokenizer and OpenAI's own SimpleTokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from onnxgen.cli import main  # noqa: E402
from onnxgen.export.diffusion import TINY_CONFIG, load_components, write_random_checkpoint  # noqa: E402
from onnxgen.pipelines import schedulers  # noqa: E402
from onnxgen.pipelines.clip_tokenizer import CLIPTokenizer, openai_vocab_file  # noqa: E402
from onnxgen.pipelines.text2image import ImageGenerationConfig, Text2ImagePipeline  # noqa: E402

TINY = TINY_CONFIG
DIFFUSERS = {"euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
             "ddim": "DDIMScheduler", "dpmpp": "DPMSolverMultistepScheduler"}
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon",
                "timestep_spacing": "leading"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "checkpoint"
    write_random_checkpoint(folder, TINY, seed=7)
    return folder


@pytest.fixture(scope="module")
def exported(checkpoint):
    out = checkpoint.parent / "onnx"
    assert main(["export-diffusion", str(checkpoint), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def modules(checkpoint):
    return load_components(checkpoint)


def _close(ours, theirs, tol):
    scale = max(1.0, float(np.abs(theirs).max()))
    assert np.abs(ours - theirs).max() <= tol * scale, (np.abs(ours - theirs).max(), scale)


# The exported components, each against its module, at shapes other than the traced ones.

def test_text_encoder_matches_clip(exported, modules, rng):
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported / "text_encoder.onnx"))
    ids = rng.integers(0, 49406, (3, 77))
    ids[:, 0], ids[0, 9], ids[1, 30], ids[2, 76] = 49406, 49407, 49407, 49407
    hidden, pooled = session.run(None, {"input_ids": ids})
    with torch.no_grad():
        out = modules[0](torch.from_numpy(ids))
    _close(hidden, out.last_hidden_state.numpy(), 1e-5)
    _close(pooled, out.pooler_output.numpy(), 1e-5)


def test_unet_matches_diffusers(exported, modules, rng):
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported / "unet.onnx"))
    sample = rng.standard_normal((3, 4, 6, 10), dtype=np.float32)
    timestep = np.array([999.0, 421.5, 1.0], np.float32)
    text = rng.standard_normal((3, 77, 32), dtype=np.float32)
    ours = session.run(None, {"sample": sample, "timestep": timestep, "encoder_hidden_states": text})[0]
    with torch.no_grad():
        theirs = modules[1](torch.from_numpy(sample), torch.from_numpy(timestep), torch.from_numpy(text)).sample
    _close(ours, theirs.numpy(), 1e-5)


def test_vae_decoder_matches_diffusers(exported, modules, rng):
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported / "vae_decoder.onnx"))
    z = rng.standard_normal((2, 4, 4, 6), dtype=np.float32)
    ours = session.run(None, {"latent_sample": z})[0]
    with torch.no_grad():
        theirs = modules[2].decode(torch.from_numpy(z)).sample
    assert ours.shape == (2, 3, 32, 48)
    _close(ours, theirs.numpy(), 1e-5)


def test_manifest(exported):
    manifest = json.loads((exported / "onnxgen.json").read_text())
    assert manifest["format"] == "onnxgen.text2image/1"
    assert manifest["vae"]["scale_factor"] == 8 and manifest["unet"]["downsample_factor"] == 2
    assert manifest["default_size"] == 64 and manifest["text_encoder"]["max_length"] == 77
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert (exported / f"{name}.onnx").exists() and (exported / f"{name}.onnx.data").exists()


def test_export_refuses_other_folders(tmp_path):
    assert main(["export-diffusion", str(tmp_path), str(tmp_path / "out")]) == 2
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(NotImplementedError, match="Stable-Diffusion-1.x/2.x"):
        from onnxgen.export.diffusion import export_diffusion

        export_diffusion(tmp_path, tmp_path / "out")


# The CLIP tokenizer.

PROMPTS = ["a photo of an astronaut riding a horse on mars", "Hello,   WORLD!! it's 3.14 don't", "",
           "x " * 100, "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e <|endoftext|>"]


def test_clip_tokenizer_matches_transformers_and_openai(exported):
    from transformers import CLIPTokenizer as HFTokenizer

    ours = CLIPTokenizer(exported / "tokenizer")
    theirs = HFTokenizer(str(exported / "tokenizer" / "vocab.json"), str(exported / "tokenizer" / "merges.txt"))
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer",
                                                  openai_vocab_file().parent / "simple_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # OpenAI's tokenizer, without its package (which imports torchvision)
    openai = module.SimpleTokenizer(str(openai_vocab_file()))
    ids = ours(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77) and ids.dtype == np.int64
    for row, prompt in zip(ids, PROMPTS):
        assert row.tolist() == theirs(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
        if prompt.isascii():
            expected = [49406] + openai.encode(prompt)[:75] + [49407]
            assert row[:len(expected)].tolist() == expected
    assert len(json.loads((exported / "tokenizer" / "vocab.json").read_text())) == 49408


# The schedulers, alone: the same model outputs through ours and diffusers'.

@pytest.mark.parametrize("name", list(DIFFUSERS))
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_scheduler_matches_diffusers(name, spacing, prediction, rng):
    config = {**SD_SCHEDULER, "timestep_spacing": spacing, "prediction_type": prediction}
    theirs = getattr(diffusers, DIFFUSERS[name]).from_config(config)
    ours = schedulers.create(name, config)
    steps = 7
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=0, atol=1e-3)
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-5)
    x = rng.standard_normal((1, 4, 3, 5), dtype=np.float32) * np.float32(ours.init_noise_sigma)
    y = torch.from_numpy(x.copy())
    noises = rng.standard_normal((steps, 1, 4, 3, 5), dtype=np.float32)
    for i, t in enumerate(theirs.timesteps):
        _close(ours.scale_model_input(x, i), theirs.scale_model_input(y, t).numpy(), 2e-5)
        output = rng.standard_normal(x.shape, dtype=np.float32)
        x = ours.step(output, i, x, noise=lambda shape, i=i: noises[i])
        with _fixed_noise([noises[i]]):
            y = theirs.step(torch.from_numpy(output), t, y).prev_sample
        _close(x, y.numpy(), 2e-5)  # float32 rounding: the two compute the coefficients differently


class _fixed_noise:
    """Make diffusers' ancestral step draw the given noise arrays instead of torch's generator."""

    def __init__(self, noises):
        self.noises = list(noises)

    def __enter__(self):
        from diffusers.schedulers import scheduling_euler_ancestral_discrete as module

        self.module, self.original = module, module.randn_tensor
        module.randn_tensor = lambda shape, **kwargs: torch.from_numpy(self.noises.pop(0)).reshape(shape)
        return self

    def __exit__(self, *exc):
        self.module.randn_tensor = self.original


# The whole pipeline against diffusers' StableDiffusionPipeline.

def _diffusers_pipeline(checkpoint, modules, scheduler: str):
    from transformers import CLIPTokenizer as HFTokenizer

    tokenizer = HFTokenizer.from_pretrained(str(checkpoint / "tokenizer"))
    config = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())
    return diffusers.StableDiffusionPipeline(
        vae=modules[2], text_encoder=modules[0], tokenizer=tokenizer, unet=modules[1],
        scheduler=getattr(diffusers, DIFFUSERS[scheduler]).from_config(config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("scheduler", list(DIFFUSERS))
def test_pipeline_matches_stable_diffusion(exported, checkpoint, modules, scheduler, rng):
    per_prompt = 2 if scheduler == "euler" else 1
    steps = 4 if scheduler != "dpmpp" else 5
    seed = int(rng.integers(1 << 30))
    latents = rng.standard_normal((per_prompt, 4, 8, 8), dtype=np.float32)
    options = dict(num_inference_steps=steps, guidance_scale=7.5, negative_prompt="blurry", scheduler=scheduler,
                   num_images_per_prompt=per_prompt, image_width=64, image_height=64, seed=seed)
    ours = Text2ImagePipeline(exported)
    images = ours("a red cube on a table", latents=latents, output_type="float", **options)
    final = ours("a red cube on a table", latents=latents, output_type="latent", **options)

    theirs = _diffusers_pipeline(checkpoint, modules, scheduler)
    theirs.set_progress_bar_config(disable=True)
    noise_rng = np.random.default_rng(seed)
    noises = [noise_rng.standard_normal(latents.shape, dtype=np.float32) for _ in range(steps)]
    kwargs = dict(prompt="a red cube on a table", negative_prompt="blurry", height=64, width=64,
                  num_inference_steps=steps, guidance_scale=7.5, num_images_per_prompt=per_prompt,
                  latents=torch.from_numpy(latents))
    with torch.no_grad(), _fixed_noise(noises):
        expected_latents = theirs(**kwargs, output_type="latent").images.numpy()
    with torch.no_grad(), _fixed_noise(noises):
        expected = theirs(**kwargs, output_type="np").images
    assert images.shape == expected.shape == (per_prompt, 64, 64, 3)
    _close(final, expected_latents, 1e-4)
    assert np.abs(images - expected).max() <= 1e-4  # images in [0, 1]


def test_images_are_reproducible_and_callback_stops(exported):
    pipe = Text2ImagePipeline(exported)
    seen = []
    a = pipe("a cat", seed=3, num_inference_steps=3, image_width=64, image_height=80)
    b = pipe("a cat", seed=3, num_inference_steps=3, image_width=64, image_height=80,
             callback=lambda step, total, latents: seen.append((step, total, latents.shape)))
    assert a.dtype == np.uint8 and a.shape == (1, 80, 64, 3) and np.array_equal(a, b)
    assert seen == [(0, 3, (1, 4, 10, 8)), (1, 3, (1, 4, 10, 8)), (2, 3, (1, 4, 10, 8))]
    stopped = []
    pipe("a cat", seed=3, num_inference_steps=5, callback=lambda step, total, latents: stopped.append(step) or True)
    assert stopped == [0]
    pil = pipe(["a cat", "a dog"], seed=3, num_inference_steps=1, output_type="pil", num_images_per_prompt=2)
    assert len(pil) == 4 and pil[0].size == (64, 64)
    config = pipe.get_generation_config()
    config.num_inference_steps = 2
    pipe.set_generation_config(config)
    assert pipe.get_generation_config().num_inference_steps == 2


@pytest.mark.parametrize("options, fragment", [
    ({"image_width": 100}, "multiple of 8"),
    ({"image_height": 72}, "multiple of 16 for this model"),
    ({"num_inference_steps": 0}, "at least 1"),
    ({"num_images_per_prompt": 0}, "at least 1"),
    ({"scheduler": "pndm"}, "unknown scheduler"),
    ({"guidance": 3.0}, "unknown generation option"),
])
def test_bad_options(exported, options, fragment):
    with pytest.raises(ValueError, match=fragment):
        Text2ImagePipeline(exported)("a cat", **options)


def test_bad_prompts_and_folders(exported, tmp_path):
    pipe = Text2ImagePipeline(exported)
    for prompt in ("", "   ", []):
        with pytest.raises(ValueError, match="prompt is empty"):
            pipe(prompt)
    with pytest.raises(FileNotFoundError, match="no onnxgen.json"):
        Text2ImagePipeline(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "unet.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="unet.onnx"):
        Text2ImagePipeline(broken)
    with pytest.raises(ValueError, match="device 'GPU'"):
        Text2ImagePipeline(exported, device="GPU")
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe.set_generation_config(ImageGenerationConfig(image_width=12))


def test_cli_image(exported, tmp_path):
    from PIL import Image

    out = tmp_path / "cat.png"
    assert main(["image", "--model", str(exported), "a cat", "-o", str(out), "--steps", "2", "--width", "64",
                 "--height", "48", "--seed", "1", "--scheduler", "ddim"]) == 0
    assert Image.open(out).size == (64, 48)
    assert main(["image", "--model", str(exported), "a cat", "-o", str(out), "--width", "60"]) == 2


def test_factory_creates_the_image_pipeline(exported):
    from onnxgen.pipelines.factory import DeviceFactory, Text2ImagePipelineFactory

    devices = DeviceFactory.get_instance().enumerate("onnxgen")
    pipe = Text2ImagePipelineFactory.get_instance().create("onnxgen", exported, devices)
    options = dict(seed=5, num_inference_steps=2, scheduler="dpmpp")
    assert np.array_equal(pipe("a boat", **options), Text2ImagePipeline(exported)("a boat", **options))


def test_default_model_without_torch_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setenv("ONNXGEN_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    assert main(["image", "a cat", "-o", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert "needs torch and diffusers" in error and "onnxgen export-diffusion" in error


def test_guide_examples_run(capsys):
    """The Python examples of docs/Text2Image.md run as written (one namespace, in order)."""
    import re
    from pathlib import Path

    doc = Path(__file__).parent.parent / "docs" / "Text2Image.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) == 2
    namespace = {"__name__": "docs"}
    for code in blocks:
        exec(compile(code, str(doc), "exec"), namespace)
    out = capsys.readouterr().out
    assert "(1, 64, 64, 3) uint8" in out and "step 3/3" in out and "Unregistered GenAI framework" in out
    assert "(1, 64, 64, 3) 2 onnxgen" in out and len(namespace["pictures"]) == 2
