"""Stable-Diffusion-style diffusers checkpoints -> ONNX components (export time only: torch, diffusers).

``export_diffusion(DIR, OUT)`` reads a local diffusers folder (``model_index.json``; ``text_encoder/``
a CLIPTextModel, ``unet/`` a UNet2DConditionModel, ``vae/`` an AutoencoderKL, ``tokenizer/``,
``scheduler/``) and writes::

    OUT/text_encoder.onnx   input_ids int64 [B, S] -> last_hidden_state [B, S, D], pooler_output [B, D]
    OUT/unet.onnx           sample [B, C, h, w], timestep float32 [B], encoder_hidden_states [B, S, D]
                            -> out_sample [B, C, h, w]
    OUT/vae_decoder.onnx    latent_sample [B, C, h, w] -> sample [B, 3, h*f, w*f]  (f: vae_scale_factor)
    OUT/*.onnx.data         the weights (external data; small constants stay inline)
    OUT/tokenizer/          the tokenizer files, as in the checkpoint
    OUT/scheduler/scheduler_config.json
    OUT/onnxgen.json        the manifest: format "onnxgen.text2image/1", components, VAE scaling, sizes

Every axis named above is dynamic.  The exporter is torch.onnx's TorchScript path (``dynamo=False``,
opset 18): on these modules it is ten times faster than the dynamo path and gives the same graphs'
numbers; ``dynamo=True`` is available.  Then, by default (``fuse_attention=True``), each component's
attention (torch's MatMul-Softmax-MatMul decomposition) becomes the standard ONNX ``Attention`` op
and the component's opset 23 (``onnxgen.passes.fuse_attention``): the same numbers, and the UNet a
fifth faster on onnxruntime's CPU.  The manifest's ``exporter`` section records the options and the
number of Attention nodes per component; ``up_to_date(OUT)`` tells whether a folder was exported
with the options given.  The pipeline that runs the result (``onnxgen.pipelines.text2image``) needs
onnxruntime and numpy only.

``write_random_checkpoint`` makes a Stable-Diffusion-style checkpoint with seeded random weights
(the embedded default model, the tests and the benchmark use it) with CLIP's real tokenizer.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

FORMAT = "onnxgen.text2image/1"
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
OPSET = 18

# The random SD-style model of the peers' benchmark: UNet 18.8M, CLIP text 38M, VAE 3.9M parameters.
BENCH_CONFIG = {
    "text_encoder": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, max_position_embeddings=77, projection_dim=512,
                         hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
    "unet": dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=512, attention_head_dim=8, norm_num_groups=32),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=256,
                block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32),
}
# A tiny one for tests and examples (native size 64x64; latents 8x8; exports in seconds).
TINY_CONFIG = {
    "text_encoder": dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
    "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=8),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
                block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4),
}
# Stable Diffusion 1.x's scheduler settings.
SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon",
                    "timestep_spacing": "leading", "trained_betas": None}


def write_random_checkpoint(folder: str | Path, config: dict = BENCH_CONFIG, seed: int = 0,
                            scheduler: dict | None = None) -> Path:
    """A diffusers StableDiffusionPipeline folder with seeded random weights and CLIP's real tokenizer."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..pipelines.clip_tokenizer import write_openai_vocab

    folder = Path(folder)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"])).eval()
    unet = UNet2DConditionModel(**config["unet"]).eval()
    vae = AutoencoderKL(**config["vae"]).eval()
    text_encoder.save_pretrained(folder / "text_encoder")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    write_openai_vocab(folder / "tokenizer", model_max_length=config["text_encoder"]["max_position_embeddings"])
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler or SCHEDULER_CONFIG, indent=2))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    return folder


def _check_checkpoint(folder: Path) -> dict:
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"{folder} is not a diffusers checkpoint folder: it has no model_index.json")
    index = json.loads((folder / "model_index.json").read_text())
    name = index.get("_class_name", "")
    if "StableDiffusion" not in name or "XL" in name or "3" in name:
        raise NotImplementedError(f"{folder} holds a {name or 'pipeline of unknown class'}; onnxgen exports "
                                  "Stable-Diffusion-1.x/2.x-style checkpoints (CLIP text encoder, UNet, AutoencoderKL)")
    missing = [sub for sub in ("text_encoder", "unet", "vae", "tokenizer", "scheduler") if not (folder / sub).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks the component folder(s) {', '.join(missing)}")
    return index


def load_components(folder: str | Path):
    """The checkpoint's torch modules (text encoder, UNet, VAE), float32, in eval mode."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    _check_checkpoint(folder)
    kwargs = dict(torch_dtype=torch.float32)
    return (CLIPTextModel.from_pretrained(folder / "text_encoder", **kwargs).eval(),
            UNet2DConditionModel.from_pretrained(folder / "unet", **kwargs).eval(),
            AutoencoderKL.from_pretrained(folder / "vae", **kwargs).eval())


def _wrappers(text_encoder, unet, vae):
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = text_encoder

        def forward(self, input_ids):
            out = self.model(input_ids=input_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    class UNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class VAEDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = vae

        def forward(self, latent_sample):
            return self.model.decode(latent_sample, return_dict=False)[0]

    return TextEncoder(), UNet(), VAEDecoder()


def _specs(text_encoder, unet, vae) -> dict:
    """Per component: sample inputs, input names, output names, dynamic axes."""
    import torch

    seq = text_encoder.config.max_position_embeddings
    channels = unet.config.in_channels
    latent = vae.config.latent_channels
    return {
        "text_encoder": ((torch.zeros(2, seq, dtype=torch.int64),), ["input_ids"],
                         ["last_hidden_state", "pooler_output"],
                         {"input_ids": {0: "batch", 1: "sequence"}, "last_hidden_state": {0: "batch", 1: "sequence"},
                          "pooler_output": {0: "batch"}}),
        "unet": ((torch.randn(2, channels, 8, 8), torch.tensor([500.0, 500.0]),
                  torch.randn(2, seq, unet.config.cross_attention_dim)),
                 ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
                 {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                  "encoder_hidden_states": {0: "batch", 1: "sequence"},
                  "out_sample": {0: "batch", 2: "height", 3: "width"}}),
        "vae_decoder": ((torch.randn(1, latent, 8, 8),), ["latent_sample"], ["sample"],
                        {"latent_sample": {0: "batch", 2: "height", 3: "width"},
                         "sample": {0: "batch", 2: "image_height", 3: "image_width"}}),
    }


def _export_one(module, spec, path: Path, opset: int, dynamo: bool, fuse_attention: bool) -> int | None:
    """Export one component to ``path``; the number of fused Attention nodes (None without fusion)."""
    import onnx
    import torch

    args, input_names, output_names, axes = spec
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}-") as work, warnings.catch_warnings():
        # The tracer warns about every Python branch on a shape (asserts, batch >= 64); the tests check
        # the graphs at shapes other than the traced ones.
        warnings.simplefilter("ignore")
        raw = Path(work) / path.name
        with torch.no_grad():
            if dynamo:
                shapes = {name: {axis: torch.export.Dim.AUTO for axis in axes[name]} for name in input_names}
                program = torch.onnx.export(module, args, dynamo=True, input_names=input_names,
                                            output_names=output_names, dynamic_shapes=shapes, opset_version=opset)
                program.save(str(raw), external_data=True)
            else:
                torch.onnx.export(module, args, str(raw), dynamo=False, input_names=input_names,
                                  output_names=output_names, dynamic_axes=axes, opset_version=opset,
                                  do_constant_folding=True)
        model = onnx.load(str(raw))  # external data (if the exporter wrote any) is read back in
    fused = None
    if fuse_attention:
        from ..passes.fuse_attention import METADATA_KEY
        from ..passes.fuse_attention import fuse_attention as fuse

        model = fuse(model)
        fused = int(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    # Weights to one external file; shapes, scalars and index constants stay inline.
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=4096)
    return fused


def _options(opset: int, dynamo: bool, fuse_attention: bool) -> dict:
    """The exporter options that change the ONNX files (recorded in the manifest's "exporter")."""
    return {"opset": opset, "dynamo": dynamo, "fuse_attention": fuse_attention}


def up_to_date(output: str | Path, *, opset: int = OPSET, dynamo: bool = False, fuse_attention: bool = True) -> bool:
    """Whether ``output`` holds an export (its manifest) made with these options (``export_diffusion``'s
    keywords, same defaults): a cached folder from an older exporter or other options is not."""
    try:
        manifest = json.loads((Path(output) / "onnxgen.json").read_text())
    except (OSError, ValueError):
        return False
    exporter = manifest.get("exporter", {})
    # Folders from before the fusion existed record no "fuse_attention": they were not fused.
    recorded = {**exporter, "fuse_attention": exporter.get("fuse_attention", False)}
    return all(recorded.get(key) == value for key, value in _options(opset, dynamo, fuse_attention).items())


def export_diffusion(checkpoint: str | Path, output: str | Path, *, opset: int = OPSET, dynamo: bool = False,
                     fuse_attention: bool = True, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Export ``checkpoint``'s text encoder, UNet and VAE decoder to ``output`` (see the module doc).

    ``fuse_attention`` turns each component's attention into ONNX ``Attention`` nodes (opset 23;
    ``onnxgen.passes.fuse_attention``).  ``progress(component, done, total)`` is called before and
    after each component.
    """
    import diffusers
    import torch
    import transformers

    checkpoint, out = Path(checkpoint), Path(output)
    index = _check_checkpoint(checkpoint)
    text_encoder, unet, vae = load_components(checkpoint)
    if getattr(unet.config, "time_cond_proj_dim", None) or getattr(unet.config, "addition_embed_type", None):
        raise NotImplementedError("this UNet needs extra conditioning inputs (LCM guidance embedding or SDXL "
                                  "added time ids); onnxgen exports plain text-conditioned UNets")
    out.mkdir(parents=True, exist_ok=True)
    modules = dict(zip(COMPONENTS, _wrappers(text_encoder, unet, vae)))
    specs = _specs(text_encoder, unet, vae)
    fused = {}
    for done, name in enumerate(COMPONENTS):
        if progress:
            progress(name, done, len(COMPONENTS))
        fused[name] = _export_one(modules[name], specs[name], out / f"{name}.onnx", opset, dynamo, fuse_attention)
    if progress:
        progress("done", len(COMPONENTS), len(COMPONENTS))

    shutil.copytree(checkpoint / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    (out / "scheduler").mkdir(exist_ok=True)
    shutil.copy2(checkpoint / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    manifest = {
        "format": FORMAT,
        "source": {"class": index.get("_class_name"), "diffusers_version": index.get("_diffusers_version")},
        "components": {name: f"{name}.onnx" for name in COMPONENTS},
        "tokenizer": "tokenizer",
        "scheduler": "scheduler/scheduler_config.json",
        "text_encoder": {"hidden_size": text_encoder.config.hidden_size,
                         "max_length": text_encoder.config.max_position_embeddings},
        "unet": {"in_channels": unet.config.in_channels, "sample_size": unet.config.sample_size,
                 "cross_attention_dim": unet.config.cross_attention_dim,
                 # a traced UNet upsamples by exactly 2: latent sizes must divide by this
                 "downsample_factor": 2 ** (len(unet.config.block_out_channels) - 1)},
        "vae": {"latent_channels": vae.config.latent_channels, "scale_factor": vae_scale_factor,
                "scaling_factor": vae.config.scaling_factor, "shift_factor": getattr(vae.config, "shift_factor", None)},
        "default_size": unet.config.sample_size * vae_scale_factor,
        "exporter": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, **_options(opset, dynamo, fuse_attention),
                     **({"attention_nodes": fused} if fuse_attention else {})},
    }
    (out / "onnxgen.json").write_text(json.dumps(manifest, indent=2))
    return out
