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


def _model_dir(args) -> str:
    if args.model:
        return args.model
    from .default_model import default_model

    return str(default_model())


def _sampling(args):
    from .engine import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop or [],
                          ignore_eos=args.ignore_eos)


def _engine(args):
    from .engine import LLMEngine

    return LLMEngine(_model_dir(args), max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
                     kv_cache_gib=args.kv_cache_gib, prefix_caching=not args.no_prefix_caching, threads=args.threads)


def _generate(args) -> int:
    import time

    engine = _engine(args)
    params = _sampling(args)
    params.validate()
    prompts = args.prompt
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [engine.tokenizer.encode_chat(messages + [{"role": "user", "content": p}]) for p in prompts]
    ids = [engine.add_request(p, params) for p in prompts]
    stream = len(ids) == 1
    start, first = time.perf_counter(), None
    for output in engine.iterate(progress=not stream):
        first = first or time.perf_counter()
        if stream:
            print(output.new_text, end="", flush=True)
        elif output.finished:
            print(f"[{ids.index(output.request_id)}] {output.text!r} ({output.finish_reason})")
    if stream:
        print()
    seconds = time.perf_counter() - start
    stats = engine.stats
    print(f"{stats.generated_tokens} tokens in {seconds:.2f} s ({stats.generated_tokens / seconds:.1f} tok/s), "
          f"first token after {1000 * ((first or start) - start):.0f} ms, {stats.steps} steps, "
          f"{engine.scheduler.num_preemptions} preemptions, {stats.cached_prompt_tokens} prompt tokens from the "
          "prefix cache", file=sys.stderr)
    return 0


def _bench_serve(args) -> int:
    import math

    from .engine.workload import Workload, run

    engine = _engine(args)
    workload = Workload(num_requests=args.requests, prompt_lens=tuple(args.prompt_lens),
                        output_lens=tuple(args.output_lens), rate=args.rate or math.inf, seed=args.seed,
                        shared_prefix=args.shared_prefix)
    report = run(engine, workload, progress=True)
    print(report.table(f"onnxgen engine, {args.requests} requests"
                       + (f" at {args.rate}/s" if args.rate else ", all at once")))
    return 0


def _serve(args) -> int:
    import uvicorn

    from .serve.server import build_app

    options = dict(model=args.model, image_model=args.image_model, api_key=args.api_key, max_waiting=args.max_waiting,
                   engine_options=dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
                                       kv_cache_gib=args.kv_cache_gib, prefix_caching=not args.no_prefix_caching,
                                       threads=args.threads), no_images=args.no_images)
    if args.replicas > 1:
        from .serve import replicas

        print(f"onnxgen serving {args.replicas} replicas on Ray Serve at http://{args.host}:{args.port}")
        replicas.run(args.replicas, args.host, args.port, **options)
        return 0
    app = build_app(**options)
    print(f"onnxgen serving on http://{args.host}:{args.port}  (playground at /, API at /v1, metrics at /metrics)")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a model folder made by `onnxgen export` (default: the embedded "
                                        "random-weight Mixtral-style model, built once and cached)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step (default: %(default)s)")
    parser.add_argument("--max-batched-tokens", type=int, default=512,
                        help="tokens per step; longer prompts are prefilled in chunks (default: %(default)s)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache memory (default: %(default)s GiB)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="do not share cached prompt blocks")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--min-new-tokens", type=int, default=0, help="eos is ignored before this (default: 0)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1 = off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p × the top probability")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (default)")
    parser.add_argument("--seed", type=int, help="seed of each request's sampler (reproducible output)")
    parser.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="generate max-new-tokens whatever the model says")


# `onnxgen convert`: a decoder exported elsewhere (torch.onnx, optimum) -> the paged signature.

def _convert(args) -> int:
    from pathlib import Path

    import onnx

    from .passes import fuse_moe, paged

    model = onnx.load(args.model)
    if not args.no_moe:
        model = fuse_moe(model, require=False)
    model = paged(model, block_size=args.block_size, all_logits=args.all_logits)
    out = Path(args.output)
    fused = next((p.value for p in model.metadata_props if p.key == "onnxgen.fused_moe_blocks"), "0")
    if out.suffix == ".onnx":
        onnx.save_model(model, out, save_as_external_data=True, location=out.name + ".data", size_threshold=1024)
        print(f"wrote {out} (+ {out.name}.data): paged signature, {fused} MoE block(s) fused")
        return 0
    from .export.folder import write_model_folder

    source = args.source or Path(args.model).parent
    write_model_folder(model, out, source_dir=source, block_size=args.block_size or 16)
    print(f"wrote {out}/model.onnx, onnxgen.json and the tokenizer files of {source}: paged signature, "
          f"{fused} MoE block(s) fused; serve it with `onnxgen generate --model {out}`")
    return 0


def _add_convert_command(commands) -> None:
    convert = commands.add_parser(
        "convert", help="turn a decoder exported by torch.onnx or optimum into the paged signature",
        description="Read an ONNX decoder with past_key_values.* inputs and present.* outputs (Attention-23/24 nodes "
                    "or the MatMul-Softmax-MatMul pattern), fuse its torch-exported MoE blocks into onnxgen.preview.MoE "
                    "and write it with the paged signature of docs/PagedSignature.md (see docs/Export.md).")
    convert.add_argument("model", help="input .onnx file")
    convert.add_argument("output", help="an .onnx file (weights in OUTPUT.data), or a model folder for the engine "
                                        "(model.onnx, onnxgen.json and the tokenizer)")
    convert.add_argument("--source", help="the Hugging Face folder the model came from, for the context length, eos "
                                          "ids, chat template and tokenizer of a model folder (default: the input's folder)")
    convert.add_argument("--block-size", type=int, help="fix the caches' block size (default: symbolic)")
    convert.add_argument("--all-logits", action="store_true", help="logits for every token, not only each sequence's last")
    convert.add_argument("--no-moe", action="store_true", help="do not fuse MoE blocks")
    convert.set_defaults(run=_convert)


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
                    "Supported: Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma 2, Gemma 3, Granite, OLMo 2, SmolLM3, "
                    "Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss.")
    export.add_argument("checkpoint", help="a local Hugging Face checkpoint folder")
    export.add_argument("output", help="the model folder to write")
    export.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="type of the weights and KV caches; activations stay float32 (default: %(default)s)")
    export.add_argument("--all-logits", action="store_true", help="logits for every token, not only each sequence's last")
    export.add_argument("--block-size", type=int, default=16, help="KV block size recorded in onnxgen.json (default: 16)")
    export.set_defaults(run=_export)

    generate = commands.add_parser(
        "generate", help="generate text with the serving engine (streams one prompt; batches several)",
        description="Run prompts through onnxgen's engine (paged KV cache, continuous batching) on onnxruntime "
                    "with onnxgen's kernels. One prompt streams its text; several run together and print as "
                    "they finish. Without --model, the embedded default (a random-weight Mixtral-style MoE with "
                    "Mistral's tokenizer) is built once and cached: its text is gibberish, its path is real.",
        epilog='example: onnxgen generate "Once upon a time" --max-new-tokens 32 --temperature 0.8 --seed 1')
    generate.add_argument("prompt", nargs="+", help="prompt text (several: one request each)")
    generate.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    generate.add_argument("--system", help="a system message (with --chat)")
    _add_engine_options(generate)
    _add_sampling_options(generate)
    generate.set_defaults(run=_generate)

    bench = commands.add_parser("bench", help="benchmarks of onnxgen's own parts")
    bench_kinds = bench.add_subparsers(dest="bench", required=True, metavar="KIND")
    serve = bench_kinds.add_parser(
        "serve", help="serve a random workload with the engine: tokens/s, TTFT, ITL, KV utilisation",
        description="Requests with random prompt and output lengths (exact: eos ignored) arrive all at once or at "
                    "--rate per second; the engine serves them with continuous batching. Prints output tokens/s, "
                    "time to first token and inter-token latency percentiles, and KV utilisation.",
        epilog="example: onnxgen bench serve --requests 32 --prompt-lens 16 512 --output-lens 16 256")
    serve.add_argument("--requests", type=int, default=32, help="default: %(default)s")
    serve.add_argument("--prompt-lens", type=int, nargs=2, default=[16, 512], metavar=("MIN", "MAX"),
                       help="prompt lengths, uniform in [MIN, MAX] (default: 16 512)")
    serve.add_argument("--output-lens", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"),
                       help="output lengths, uniform in [MIN, MAX] (default: 16 256)")
    serve.add_argument("--rate", type=float, help="arrivals per second, Poisson (default: all at once)")
    serve.add_argument("--shared-prefix", type=int, default=0, help="tokens of a system prompt every request shares")
    serve.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    _add_engine_options(serve)
    serve.set_defaults(run=_bench_serve)

    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible server (chat, completions, images) with a playground page",
        description="Serve /v1/models, /v1/completions, /v1/chat/completions (streaming or not), "
                    "/v1/images/generations, /health and /metrics, and a playground page at /. All clients share "
                    "one engine (continuous batching). Without --model the embedded default text model is served.",
        epilog="example: onnxgen serve --port 8000 --api-key secret; then "
               "OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='secret')")
    serve.add_argument("--host", default="127.0.0.1", help="default: %(default)s (loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    serve.add_argument("--image-model", help="a text-to-image model folder (default: the embedded default)")
    serve.add_argument("--no-images", action="store_true", help="serve no image model")
    serve.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 (compared in constant time)")
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="requests allowed to wait; beyond, 429 with Retry-After (default: %(default)s)")
    serve.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--replicas", type=int, default=1,
                       help="run N engine replicas behind one endpoint on Ray Serve (needs ray[serve]; default: 1)")
    _add_engine_options(serve)
    serve.set_defaults(run=_serve)

    exp = commands.add_parser("expand", help="inline onnxgen ops and FlexAttention so stock runtimes run a model")
    exp.add_argument("model", help="input .onnx file")
    exp.add_argument("output", help="output .onnx file")
    exp.set_defaults(run=_expand)
    _add_convert_command(commands)

    from .cli_image import add_parsers as add_image_parsers  # export-diffusion, image

    add_image_parsers(commands)

    from .context.cli import add_parser as add_context_parser

    add_context_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as error:
        print(f"onnxgen {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
