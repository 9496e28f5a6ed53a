"""The ``onnxgen`` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run

    worst = run()
    return 0 if worst < 1e-3 else 1


def _docs(args) -> int:
    from .ops.docs import write

    print(f"wrote {write(args.output)}")
    return 0


def _expand(args) -> int:
    import onnx

    from .passes import expand

    model = onnx.load(args.model)
    onnx.save(expand(model), args.output)
    print(f"wrote {args.output}: every onnxgen.preview op and FlexAttention inlined as standard ONNX")
    return 0


def _export(args) -> int:
    from tqdm import tqdm

    from .export.llm import build

    with tqdm(desc="layers", unit="layer") as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        out = build(args.checkpoint, args.output, dtype=args.dtype, all_logits=args.all_logits,
                    block_size=args.block_size, progress=progress)
    print(f"wrote {out}/model.onnx (+ model.onnx.data), onnxgen.json and the tokenizer files")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxgen",
        description="Generative AI as ONNX: paged attention, MoE and FlexAttention operators and tools.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="build a decoder layer with the new ops and run it on onnxruntime",
                               description="Build a tiny decoder layer (PagedAttention + MoE, random weights), "
                                           "run a prefill and a decode step through the reference evaluator and "
                                           "through onnxruntime after the expand pass, and compare.")
    demo.set_defaults(run=_demo)

    docs = commands.add_parser("docs", help="regenerate docs/Operators.md from the schemas")
    docs.add_argument("--output", default="docs/Operators.md", help="where to write (default: %(default)s)")
    docs.set_defaults(run=_docs)

    export = commands.add_parser(
        "export", help="build a paged ONNX model from a local Hugging Face checkpoint folder",
        description="Read config.json and *.safetensors from CHECKPOINT (no torch needed) and write OUTPUT/model.onnx "
                    "with the paged signature (see docs/PagedSignature.md), onnxgen.json and the tokenizer files. "
                    "Supported: Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss.")
    export.add_argument("checkpoint", help="a local Hugging Face checkpoint folder")
    export.add_argument("output", help="the model folder to write")
    export.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="type of the weights and KV caches; activations stay float32 (default: %(default)s)")
    export.add_argument("--all-logits", action="store_true", help="logits for every token, not only each sequence's last")
    export.add_argument("--block-size", type=int, default=16, help="KV block size recorded in onnxgen.json (default: 16)")
    export.set_defaults(run=_export)

    exp = commands.add_parser("expand", help="inline onnxgen ops and FlexAttention so stock runtimes run a model")
    exp.add_argument("model", help="input .onnx file")
    exp.add_argument("output", help="output .onnx file")
    exp.set_defaults(run=_expand)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
