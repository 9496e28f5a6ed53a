"""Serving throughput and latency: onnxgen's engine against static batching and the peers.

The workload of ../shared/context/peers.md: a random Llama (hidden 512, 8 layers, 8 heads / 4 KV
heads, vocab 32000, fp32), 32 requests arriving together, prompts of 16–512 tokens, outputs of
16–256 tokens (exact lengths: eos ignored), greedy; and the same with a small Mixtral-style MoE.

Systems, one after another in this process, each on the same requests:
  * onnxgen engine, continuous batching (512 batched tokens), fp32, and with bf16 weights and cache;
  * onnxgen with static batches of 8 (the same session; a batch starts when the last one ends);
  * transformers ``generate`` (torch CPU), static batches of 8, left-padded;
  * OpenVINO GenAI's ContinuousBatchingPipeline and onnxruntime-genai, where
    benchmarks/serving_peers.py can set them up (else listed as n/a with the reason).
Reported: output tokens/s, TTFT and ITL p50/p99, KV utilisation (tokens stored ÷ slots held).
Also: TTFT with and without prefix caching for requests sharing a 512-token system prompt.

    .venv/bin/python benchmarks/bench_serving.py            # full workload (minutes)
    .venv/bin/python benchmarks/bench_serving.py --quick    # 8 short requests: a smoke test
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from onnxgen.engine import LLMEngine, SamplingParams  # noqa: E402
from onnxgen.engine.workload import Report, Workload, run  # noqa: E402
from onnxgen.export.llm import build  # noqa: E402

MODELS = {
    "llama-56M": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=2048)),
    "moe-8x": ("MixtralConfig", "MixtralForCausalLM", dict(
        vocab_size=32000, hidden_size=512, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048)),
}


def make_checkpoint(name: str, folder: Path) -> int:
    import torch
    import transformers

    config_name, model_name, kwargs = MODELS[name]
    config = getattr(transformers, config_name)(tie_word_embeddings=False, **kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def static_batches(requests, size: int = 8):
    return [requests[i:i + size] for i in range(0, len(requests), size)]


def ours_static(model_dir: Path, requests) -> Report:
    """The same engine and session, but a batch of 8 starts only when the previous one has ended."""
    engine = LLMEngine(model_dir, max_num_seqs=8, max_num_batched_tokens=8 * 512)
    report = Report(0.0, sum(len(p) for _, p, _ in requests), 0)
    start = time.perf_counter()
    for batch in static_batches(requests):
        last = {}
        ids = [engine.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for _, p, n in batch]
        for output in engine.iterate():
            stamp = time.perf_counter()
            if output.new_token_ids:
                report.output_tokens += 1
                if output.request_id in last:
                    report.itl.append(stamp - last[output.request_id])
                else:
                    report.ttft.append(stamp - start)
                last[output.request_id] = stamp
        assert set(last) == set(ids)
    report.seconds = time.perf_counter() - start
    return report


def transformers_static(checkpoint: Path, requests) -> Report:
    """``generate`` on left-padded batches of 8 until the batch's longest output; each request's
    own length counts as its output (the rest of its row is waste, as in a static server)."""
    import torch
    import transformers

    torch.set_num_threads(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    report = Report(0.0, sum(len(p) for _, p, _ in requests), 0)
    start = time.perf_counter()
    for batch in static_batches(requests):
        width = max(len(p) for _, p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for _, p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _, p, _ in batch])
        longest = max(n for _, _, n in batch)
        stamps = []

        class Clock(transformers.LogitsProcessor):
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                           pad_token_id=0, logits_processor=[Clock()])
        for _, _, n in batch:
            report.output_tokens += n
            report.ttft.append(stamps[0] - start)
            report.itl.extend(np.diff(stamps[:n]).tolist())
    report.seconds = time.perf_counter() - start
    return report


def prefix_caching_ttft(model_dir: Path, vocab: int, quick: bool) -> tuple[float, float]:
    """Mean TTFT of requests sharing a 512-token system prompt, arriving one after another,
    with and without the prefix cache."""
    workload = Workload(num_requests=4 if quick else 16, prompt_lens=(16, 64), output_lens=(8, 8),
                        rate=4.0, shared_prefix=64 if quick else 512, seed=1)
    means = []
    for caching in (False, True):
        engine = LLMEngine(model_dir, prefix_caching=caching)
        means.append(float(np.mean(run(engine, workload, progress=False).ttft)))
    return means[0], means[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 short requests (a smoke test)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--skip", nargs="*", default=[], help="systems to leave out (by name prefix)")
    args = parser.parse_args()
    workload = (Workload(num_requests=8, prompt_lens=(16, 64), output_lens=(8, 32)) if args.quick
                else Workload(num_requests=32, prompt_lens=(16, 512), output_lens=(16, 256)))
    try:
        import serving_peers
    except ImportError as error:
        serving_peers = None
        peer_error = str(error)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            checkpoint = Path(tmp) / name / "hf"
            params = make_checkpoint(name, checkpoint)
            fp32 = build(checkpoint, Path(tmp) / name / "fp32")
            bf16 = build(checkpoint, Path(tmp) / name / "bf16", dtype="bfloat16")
            requests = workload.requests(32000)
            systems = {
                "onnxgen continuous batching, fp32": lambda: run(LLMEngine(fp32), workload, progress=False),
                "onnxgen continuous batching, bf16": lambda: run(LLMEngine(bf16), workload, progress=False),
                "onnxgen static batches of 8, fp32": lambda: ours_static(fp32, requests),
                "transformers generate, static batches of 8": lambda: transformers_static(checkpoint, requests),
            }
            if serving_peers is not None:
                systems.update(serving_peers.systems(checkpoint, requests))
            print(f"\n## {name}: {params / 1e6:.0f}M parameters; {len(requests)} requests, "
                  f"{sum(len(p) for _, p, _ in requests)} prompt and {sum(n for *_, n in requests)} output tokens")
            print(f"| system | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | KV utilisation |")
            print("|---|---|---|---|---|")
            results = {}
            for system, make in systems.items():
                if any(system.startswith(s) for s in args.skip):
                    continue
                try:
                    report = make()
                except Exception as error:  # a peer that cannot run is reported, not fatal
                    print(f"| {system} | n/a: {type(error).__name__}: {str(error)[:120]} | | | |")
                    continue
                results[system] = report
                pct = lambda v, q: f"{1000 * np.percentile(v, q):.0f}" if v else "-"  # noqa: E731
                kv = f"{100 * report.kv_utilisation:.1f} %" if report.kv_slots else "-"
                print(f"| {system} | {report.tokens_per_second:.0f} | {pct(report.ttft, 50)} / {pct(report.ttft, 99)} "
                      f"| {pct(report.itl, 50)} / {pct(report.itl, 99)} | {kv} |", flush=True)
            ours = results.get("onnxgen continuous batching, fp32")
            if ours:
                for system, report in results.items():
                    print(f"  onnxgen fp32 ÷ {system}: {ours.tokens_per_second / report.tokens_per_second:.2f}×")
            if serving_peers is None:
                print(f"  (OpenVINO GenAI / onnxruntime-genai: n/a, {peer_error})")
            without, with_cache = prefix_caching_ttft(fp32, 32000, args.quick)
            print(f"  shared system prompt: mean TTFT {1000 * without:.0f} ms without prefix caching, "
                  f"{1000 * with_cache:.0f} ms with ({without / with_cache:.1f}× less)")


if __name__ == "__main__":
    main()
