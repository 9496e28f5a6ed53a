"""The text-to-image commands of ``onnxgen``: ``export-diffusion`` and ``image`` (added by cli.py)."""

from __future__ import annotations

import sys


def _export_diffusion(args) -> int:
    from tqdm import tqdm

    from .export.diffusion import export_diffusion

    with tqdm(desc="export", unit="component") as bar:
        def progress(name, done, total):
            bar.total = total
            bar.set_postfix_str(name)
            bar.update(done - bar.n)

        out = export_diffusion(args.checkpoint, args.output, opset=args.opset, dynamo=args.dynamo,
                               fuse_attention=args.fuse_attention, progress=progress)
    print(f"wrote {out}: text_encoder.onnx, unet.onnx, vae_decoder.onnx (+ .onnx.data), tokenizer/, scheduler/, "
          "onnxgen.json")
    return 0


def _image(args) -> int:
    import time
    from pathlib import Path

    from .pipelines.text2image import Text2ImagePipeline, default_image_model

    try:
        folder = args.model or default_image_model()
    except ImportError as error:
        print(f"onnxgen image: error: {error}", file=sys.stderr)
        return 2
    pipe = Text2ImagePipeline(folder, threads=args.threads)
    start = time.perf_counter()
    images = pipe(args.prompt, output_type="pil", progress=True, image_width=args.width, image_height=args.height,
                  num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                  negative_prompt=args.negative_prompt, seed=args.seed, scheduler=args.scheduler,
                  num_images_per_prompt=args.num_images)
    seconds = time.perf_counter() - start
    out = Path(args.output)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    print(f"wrote {', '.join(map(str, paths))} ({images[0].size[0]}x{images[0].size[1]}, {args.steps} steps, "
          f"{seconds:.2f} s)", file=sys.stderr)
    return 0


def add_parsers(commands) -> None:
    export = commands.add_parser(
        "export-diffusion", help="export a local Stable-Diffusion-style diffusers checkpoint to ONNX components",
        description="Read a diffusers checkpoint folder (model_index.json; CLIP text encoder, UNet2DConditionModel, "
                    "AutoencoderKL; tokenizer and scheduler) and write OUTPUT/text_encoder.onnx, unet.onnx and "
                    "vae_decoder.onnx with dynamic batch and image sizes, the tokenizer, the scheduler config and "
                    "onnxgen.json. Needs torch and diffusers (pip install 'onnxgen[export]'); running the result "
                    "does not.")
    export.add_argument("checkpoint", help="a local diffusers checkpoint folder")
    export.add_argument("output", help="the model folder to write")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default: %(default)s)")
    export.add_argument("--dynamo", action="store_true", help="use torch.onnx's dynamo exporter (slower)")
    export.add_argument("--no-fuse-attention", dest="fuse_attention", action="store_false",
                        help="keep attention as torch exports it (MatMul, Softmax, MatMul) instead of ONNX Attention "
                             "nodes at opset 23")
    export.set_defaults(run=_export_diffusion)

    image = commands.add_parser(
        "image", help="generate an image from a prompt (text-to-image on onnxruntime)",
        description="Run a text-to-image model folder (made by `onnxgen export-diffusion`) on onnxruntime with numpy "
                    "schedulers. Without --model, the embedded default (a random-weight SD-style model with CLIP's "
                    "real tokenizer) is built once and cached; building it needs torch and diffusers.",
        epilog='example: onnxgen image "a lighthouse at dusk" -o out.png --steps 20 --seed 1')
    image.add_argument("prompt", help="what to draw")
    image.add_argument("-o", "--output", default="image.png", help="the PNG to write (default: %(default)s); "
                                                                    "several images get -0, -1, ... suffixes")
    image.add_argument("--model", help="a text-to-image model folder (default: the embedded default)")
    image.add_argument("--width", type=int, help="a multiple of 8 (default: the model's native size)")
    image.add_argument("--height", type=int, help="a multiple of 8 (default: the model's native size)")
    image.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    image.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default: 7.5)")
    image.add_argument("--negative-prompt", help="what not to draw")
    image.add_argument("--seed", type=int, help="seed of the initial noise (reproducible images)")
    image.add_argument("--scheduler", default="euler", choices=["euler", "euler_ancestral", "ddim", "dpmpp"],
                       help="default: %(default)s")
    image.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    image.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    image.set_defaults(run=_image)
