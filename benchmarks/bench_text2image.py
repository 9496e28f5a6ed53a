"""Text-to-image on the CPU: seconds per image, onnxgen vs diffusers (torch) vs OpenVINO GenAI.

The random SD-style model of ../shared/context/peers.md (UNet 18.8M, CLIP text 38M, VAE 3.9M
parameters; onnxgen's embedded default uses the same recipe), 256x256, 20 Euler steps, guidance
7.5, one image per prompt.  Every engine runs with two threads in one process; each is warmed up,
then timed in interleaved rounds, and the median is reported.  Before timing, onnxgen's image is
checked against diffusers' from the same initial latents.

* ours        onnxgen.pipelines.Text2ImagePipeline: the exported ONNX components on onnxruntime, numpy
              Euler scheduler
* diffusers   StableDiffusionPipeline on torch (CPU, fp32) with EulerDiscreteScheduler
* openvino    openvino_genai.Text2ImagePipeline on a folder optimum-intel converted from the same
              checkpoint (optional: pip install openvino-genai optimum-intel; n/a otherwise)

    python benchmarks/bench_text2image.py [--rounds 3] [--steps 20] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

THREADS = 2
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def folders(root: Path) -> tuple[Path, Path]:
    from onnxgen.export.diffusion import BENCH_CONFIG, export_diffusion, write_random_checkpoint

    checkpoint, onnx_dir = root / "checkpoint", root / "onnx"
    if not (checkpoint / "model_index.json").exists():
        write_random_checkpoint(checkpoint, BENCH_CONFIG, seed=0)
    if not (onnx_dir / "onnxgen.json").exists():
        export_diffusion(checkpoint, onnx_dir)
    return checkpoint, onnx_dir


def openvino_folder(checkpoint: Path, root: Path) -> tuple[Path | None, str]:
    try:
        import openvino_genai  # noqa: F401
    except ImportError:
        return None, "openvino-genai is not installed"
    out = root / "openvino"
    if not (out / "model_index.json").exists():
        cli = Path(sys.executable).with_name("optimum-cli")
        if not cli.exists():
            return None, "optimum-intel is not installed (optimum-cli converts the checkpoint)"
        done = subprocess.run([str(cli), "export", "openvino", "--model", str(checkpoint), "--task", "text-to-image",
                               "--weight-format", "fp32", str(out)], capture_output=True, text=True)
        if done.returncode:
            return None, f"optimum-cli failed: {done.stderr.strip().splitlines()[-1] if done.stderr else '?'}"
    return out, ""


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

        ov = ov_genai.Text2ImagePipeline(str(ov_dir), "CPU", INFERENCE_NUM_THREADS=THREADS)
        engines["OpenVINO GenAI fp32"] = lambda: ov.generate(PROMPT, width=args.size, height=args.size,
                                                             num_inference_steps=args.steps, guidance_scale=7.5)
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
