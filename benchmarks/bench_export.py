"""Export cost: onnxgen's builder against torch.onnx.export, build time and peak memory.

Two random checkpoints built from configs (no download) and saved as safetensors: a Llama of
about 500M parameters and a Mixtral-style MoE of about 1B.  Each exporter runs in its own
process (peak RSS is per process): ``onnxgen export --dtype float16`` from the checkpoint
folder, and ``torch.onnx.export(dynamo=True)`` of the transformers model (fp16 weights, forward
without a KV cache: torch.export takes no DynamicCache) where it succeeds.

    .venv/bin/python benchmarks/bench_export.py            # full sizes (minutes, ~6 GB of disk)
    .venv/bin/python benchmarks/bench_export.py --small    # tiny sizes: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SIZES = {
    # ~500M: 24 layers of hidden 1280, 20 heads; vocab 32000.
    "llama-500M": ("llama", dict(vocab_size=32000, hidden_size=1280, intermediate_size=3584, num_hidden_layers=24,
                                  num_attention_heads=20, num_key_value_heads=4, max_position_embeddings=4096)),
    # ~1B: 24 layers, 8 experts of intermediate 1536, hidden 1024.
    "moe-1B": ("mixtral", dict(vocab_size=32000, hidden_size=1024, intermediate_size=1536, num_hidden_layers=24,
                                num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
                                num_experts_per_tok=2, max_position_embeddings=4096)),
}
SMALL = {
    "llama-small": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)),
    "moe-small": ("mixtral", dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                   num_experts_per_tok=2)),
}
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mixtral": ("MixtralConfig", "MixtralForCausalLM")}

MAKE = """
import torch, transformers
config = getattr(transformers, {config!r})(**{kwargs!r})
torch.manual_seed(0)
model = getattr(transformers, {model!r})(config).to(torch.float16)
model.save_pretrained({folder!r})
print(sum(p.numel() for p in model.parameters()))
"""

OURS = """
import resource, time
from onnxgen.export.llm import build
t = time.perf_counter()
build({folder!r}, {out!r}, dtype="float16")
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

TORCH = """
import resource, time, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained({folder!r}, dtype=torch.float16).eval()
if hasattr(model, "set_experts_implementation"):
    model.set_experts_implementation("batched_mm")  # the eager experts loop does not export
ids = torch.ones(1, 4, dtype=torch.long)
t = time.perf_counter()
# Without a KV cache: torch.export takes no DynamicCache input, and the cost compared here is the
# export itself (our builder writes the paged signature, which torch has no way to produce).
torch.onnx.export(model, (ids,), {out!r}, kwargs={{"use_cache": False}}, dynamo=True, external_data=True)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run(code: str, timeout: float) -> tuple[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return "", f"timed out after {timeout:.0f} s"
    if done.returncode != 0:
        return "", (done.stderr.strip().splitlines() or ["failed"])[-1][:160]
    return done.stdout.strip().splitlines()[-1], ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny models: a smoke test")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per exporter (default 1200)")
    parser.add_argument("--skip-torch", action="store_true", help="leave out torch.onnx.export")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (family, kwargs) in (SMALL if args.small else SIZES).items():
            folder = str(Path(tmp) / name)
            config, model = CLASSES[family]
            line, error = run(MAKE.format(config=config, model=model, kwargs=kwargs, folder=folder), args.timeout)
            if error:
                print(f"{name}: could not make the checkpoint: {error}")
                continue
            params = int(line)
            results = {}
            exporters = [("onnxgen export (fp16)", OURS)] + ([] if args.skip_torch else [("torch.onnx.export (no cache)", TORCH)])
            for label, code in exporters:
                out = str(Path(tmp) / f"{name}-{label.split()[0]}")
                if label.startswith("onnxgen"):
                    target = out
                else:
                    os.makedirs(out, exist_ok=True)
                    target = os.path.join(out, "model.onnx")
                line, error = run(code.format(folder=folder, out=target), args.timeout)
                if error:
                    results[label] = (None, None, error)
                else:
                    seconds, rss_kib = line.split()
                    results[label] = (float(seconds), int(rss_kib) / 1024, "")
            rows.append((name, params, results))
    print(f"\n{'model':<14}{'params':>10}  {'exporter':<30}{'seconds':>9}{'peak MiB':>10}{'vs ours':>9}  note")
    for name, params, results in rows:
        ours = results.get("onnxgen export (fp16)", (None,))[0]
        for label, (seconds, mib, error) in results.items():
            ratio = f"{seconds / ours:>8.2f}x" if seconds and ours else f"{'':>9}"
            timing = f"{seconds:>9.1f}{mib:>10.0f}" if seconds is not None else f"{'n/a':>9}{'':>10}"
            print(f"{name:<14}{params / 1e6:>9.0f}M  {label:<30}{timing}{ratio}  {error}")
    print("\n" + json.dumps({"note": "peak MiB is the exporting process's max RSS (it loads the checkpoint)"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
