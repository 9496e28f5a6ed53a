"""Text-to-image on the CPU: seconds per image, onnxgen vs diffusers (torch) vs OpenVINO GenAI.

The random SD-style model of ../shared/context/peers.md (UNet 18.8M, CLIP text 38M, VAE 3.9M
parameters; onnxgen's embedded default uses the same recipe), 256x256, 20 Euler steps, guidance
7.5, one image per prompt.  Every engine runs with two threads in one process; each is warmed up,
then timed in interleaved rounds, and the median is reported.  Before timing, onnxgen's image is
checked against diffusers' from the same initial latents.

* ours        onnxgen.pipelines.Text2ImagePipeline: the exported ONNX components on onnxruntime, numpy
              Euler scheduler
* diffusers   StableDiffusionPipeline on torch (CPU, fp32) with EulerDiscreteScheduler
* openvino    openvino_genai.Text2ImagePipeline on the folder optimum-intel converted from the same
              checkpoint (``optimum-cli export openvino --task text-to-image --weight-format fp32``,
              its CLIP tokenizer converted by openvino-tokenizers), the Euler discrete scheduler set from
              the checkpoint's scheduler config, compiled with INFERENCE_PRECISION_HINT f32 and, in a
              second row, bf16.  Its initial latents come from its TorchGenerator (it takes no latents),
              so its image is checked against diffusers' from the same torch seed instead.

OpenVINO's rows need openvino-genai in this venv and optimum-intel in the peers venv of
serving_peers.py (``ONNXGEN_PEERS_VENV``, default /work/peers-venv; optimum-intel wants an older
transformers than the project's), which for this task also needs diffusers:

    /work/peers-venv/bin/pip install -c /tmp/peers-constraints.txt "diffusers<0.42.1" "huggingface-hub>=1.5,<1.22"

(optimum-intel 2.2.0 wants huggingface-hub<1.22; diffusers 0.42 wants >=1.32, so pip settles on
diffusers 0.39.0).  Without them the rows print n/a and why.

    python benchmarks/bench_text2image.py [--rounds 3] [--steps 20] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

THREADS = 2
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def folders(root: Path) -> tuple[Path, Path]:
    """The random checkpoint and its ONNX export under ``root``, each made once; the export is redone
    when its manifest records other exporter options than export_diffusion's defaults (an older
    cache, e.g. one from before the attention fusion)."""
    from onnxgen.export.diffusion import BENCH_CONFIG, export_diffusion, up_to_date, write_random_checkpoint

    checkpoint, onnx_dir = root / "checkpoint", root / "onnx"
    if not (checkpoint / "model_index.json").exists():
        write_random_checkpoint(checkpoint, BENCH_CONFIG, seed=0)
    if not up_to_date(onnx_dir):
        print(f"exporting {checkpoint} to {onnx_dir}", file=sys.stderr)
        export_diffusion(checkpoint, onnx_dir)
    return checkpoint, onnx_dir


PEERS_VENV = Path(os.environ.get("ONNXGEN_PEERS_VENV", "/work/peers-venv"))


def _tail(text: str, lines: int = 2) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:]) or "?"


def legacy_checkpoint(checkpoint: Path, root: Path) -> Path:
    """The checkpoint as the peers venv's older transformers reads it.

    transformers 5.23 saves CLIPTextModel's weights without the ``text_model.`` prefix; 5.5 (the
    peers venv's, which optimum-intel 2.2 needs) does not recognise those names and silently
    initializes a random text encoder.  Here the other components are linked and the text encoder's
    weights rewritten with the prefix, which both versions load.
    """
    from safetensors.numpy import load_file, save_file

    weights = load_file(checkpoint / "text_encoder" / "model.safetensors")
    if all(name.startswith("text_model.") for name in weights):
        return checkpoint
    legacy = root / "checkpoint-for-optimum"
    shutil.rmtree(legacy, ignore_errors=True)
    legacy.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.name != "text_encoder":
            (legacy / item.name).symlink_to(item.resolve())
    (legacy / "text_encoder").mkdir()
    shutil.copy2(checkpoint / "text_encoder" / "config.json", legacy / "text_encoder" / "config.json")
    save_file({f"text_model.{name}": value for name, value in weights.items()},
              str(legacy / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    return legacy


def openvino_folder(checkpoint: Path, root: Path) -> tuple[Path | None, str]:
    """The checkpoint as OpenVINO IR (text encoder, UNet, VAE, tokenizer), converted once by the peers
    venv's optimum-cli in a subprocess; (None, why) when that cannot be done."""
    try:
        import openvino_genai  # noqa: F401
    except ImportError as error:
        return None, f"openvino-genai is not installed ({error})"
    out = root / "openvino"
    if (out / "model_index.json").exists() and (out / "tokenizer" / "openvino_tokenizer.xml").exists():
        return out, ""
    candidates = [PEERS_VENV / "bin" / "optimum-cli", Path(sys.executable).with_name("optimum-cli")]
    cli = next((c for c in candidates if c.exists()), None)
    if cli is None:
        return None, f"no optimum-cli in {PEERS_VENV} or this venv (see the set-up in this file's doc)"
    work = root / "openvino.partial"
    shutil.rmtree(work, ignore_errors=True)
    done = subprocess.run([str(cli), "export", "openvino", "--model", str(legacy_checkpoint(checkpoint, root)),
                           "--task", "text-to-image", "--weight-format", "fp32", str(work)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode or not (work / "model_index.json").exists():
        shutil.rmtree(work, ignore_errors=True)
        return None, f"{cli} export openvino failed: {_tail(done.stderr or done.stdout)}"
    if not (work / "tokenizer" / "openvino_tokenizer.xml").exists():
        shutil.rmtree(work, ignore_errors=True)
        return None, ("optimum-cli wrote no tokenizer/openvino_tokenizer.xml (is openvino-tokenizers installed in "
                      f"{cli.parent.parent}?); Text2ImagePipeline needs it")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    return out, ""


def openvino_pipeline(folder: Path, precision: str):
    """Text2ImagePipeline on ``folder`` with the Euler discrete scheduler, compiled for the CPU."""
    import openvino_genai as ov_genai

    pipe = ov_genai.Text2ImagePipeline(str(folder))
    pipe.set_scheduler(ov_genai.Scheduler.from_config(str(folder / "scheduler" / "scheduler_config.json"),
                                                      ov_genai.Scheduler.Type.EULER_DISCRETE))
    pipe.compile("CPU", INFERENCE_PRECISION_HINT=precision, INFERENCE_NUM_THREADS=THREADS)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--root", default=os.path.join(os.environ.get("ONNXGEN_CACHE", Path.home() / ".cache" / "onnxgen"),
                                                       "bench-text2image"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from onnxgen.pipelines import Text2ImagePipeline

    torch.set_num_threads(THREADS)
    root = Path(args.root)
    checkpoint, onnx_dir = folders(root)
    options = dict(image_width=args.size, image_height=args.size, num_inference_steps=args.steps, guidance_scale=7.5,
                   scheduler="euler")

    ours = Text2ImagePipeline(onnx_dir, threads=THREADS)
    theirs = StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None, requires_safety_checker=False)
    theirs.scheduler = EulerDiscreteScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    latent = args.size // ours.vae_scale_factor
    latents = np.random.default_rng(0).standard_normal((1, 4, latent, latent), dtype=np.float32)

    def run_ours():
        return ours(PROMPT, latents=latents, output_type="float", **options)

    def run_diffusers():
        with torch.no_grad():
            return theirs(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps,
                          guidance_scale=7.5, latents=torch.from_numpy(latents), output_type="np").images

    difference = float(np.abs(run_ours() - run_diffusers()).max())
    print(f"max |ours - diffusers| over the image (values in [0, 1]): {difference:.2e}")
    engines = {"ours (onnxruntime + numpy)": run_ours, "diffusers (torch)": run_diffusers}
    skipped = {}
    ov_dir, reason = openvino_folder(checkpoint, root)
    if ov_dir is not None:
        import openvino_genai as ov_genai

        def run_openvino(pipe, seed=None):
            extra = {} if seed is None else {"generator": ov_genai.TorchGenerator(seed)}
            return np.asarray(pipe.generate(PROMPT, width=args.size, height=args.size, num_inference_steps=args.steps,
                                            guidance_scale=7.5, **extra).data)

        # its initial latents come from torch's generator: compare with diffusers' from the same seed
        with torch.no_grad():
            reference = theirs(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps,
                               guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(42),
                               output_type="np").images
        expected = np.round(np.clip(reference, 0, 1) * 255).astype(np.int16)
        for label, precision in (("fp32", "f32"), ("bf16", "bf16")):
            name = f"OpenVINO GenAI {label}"
            try:
                pipe = openvino_pipeline(ov_dir, precision)
                image = run_openvino(pipe, seed=42).astype(np.int16)
                print(f"max |{name} - diffusers| over the image, same torch seed (uint8 levels): "
                      f"{int(np.abs(image - expected).max())}")
            except Exception as error:  # noqa: BLE001 - the row says why
                skipped[name] = f"{type(error).__name__}: {_tail(str(error), 1)}"
                continue
            engines[name] = lambda pipe=pipe: run_openvino(pipe)
    else:
        skipped["OpenVINO GenAI"] = reason

    times: dict[str, list[float]] = {name: [] for name in engines}
    for run in engines.values():
        run()  # warm-up
    for _ in range(args.rounds):
        for name, run in engines.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["ours (onnxruntime + numpy)"])
    print(f"\n{args.size}x{args.size}, {args.steps} Euler steps, guidance 7.5, {THREADS} threads, "
          f"median of {args.rounds} rounds")
    print(f"{'engine':32} {'s/image':>8} {'vs ours':>8}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:32} {median:8.2f} {median / base:8.2f}x")
    for name, why in skipped.items():
        print(f"{name:32} {'n/a':>8}  ({why})")


if __name__ == "__main__":
    main()
