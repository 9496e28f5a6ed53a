"""Backend context: time to first result (load + first run) with and without blobs, per backend,
for a ~100M-parameter Llama-style model (random weights, written with numpy: no torch), in one run.

    .venv/bin/python benchmarks/bench_context.py                  # hidden 768, 10 layers, vocab 32000 (~112M)
    .venv/bin/python benchmarks/bench_context.py --layers 2 --vocab 4000   # a quick look

Rows:
  plain           the plain model in one onnxruntime session (onnxgen.backends-style, kernels registered)
  ctx, no blobs   context.load(..., backends=[]) of the annotated model: the same, through the planner
  ort blob        the whole graph as one scope, an ORT-format blob (optimised at compile time)
  ov from graph   OpenVINO compile_model of every OpenVINO scope from its ONNX subgraph (what a load
                  without blobs would pay to run those scopes on OpenVINO)
  ov blobs        the same scopes from their exported blobs (import_model), then context.load + first run
  ..., cached     the same context.load with the cache of verified hashes warm (a load before, same
                  files): the scopes' content hashes and the blobs' sha256 are not computed again
Each load is timed in a fresh subprocess (warm file cache) after a warm-up that pays the per-process
costs (imports, OpenVINO's plugin, onnxruntime's first session) outside the timing.  Rows without
"cached" give each subprocess an empty $ONNXGEN_CACHE: every hash is computed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def write_checkpoint(folder: Path, hidden: int, layers: int, vocab: int, inter: int, heads: int, kv_heads: int):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    head_dim = hidden // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "vocab_size": vocab, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "num_hidden_layers": layers, "head_dim": head_dim,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2}

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02)

    weights = {"model.embed_tokens.weight": w(vocab, hidden), "lm_head.weight": w(vocab, hidden),
               "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights.update({p + "input_layernorm.weight": np.ones(hidden, np.float32),
                        p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
                        p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
                        p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
                        p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
                        p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
                        p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
                        p + "mlp.down_proj.weight": w(hidden, inter)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, str(folder / "model.safetensors"))
    return sum(v.size for v in weights.values())


# --------------------------------------------------------------------------- one timed load (subprocess)

CHILD = r"""
import json, sys, time, warnings
import numpy as np, onnx, onnxruntime, openvino
import onnxgen
from onnxgen import context
from onnxgen.context.backends import ort_session, BACKENDS
case, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = onnx.load(path, load_external_data=False)
T = 16
feeds = {"input_ids": np.arange(T) % 100, "position_ids": np.arange(T), "cumulative_sequence_length": np.array([0, T], np.int32),
         "past_seqlens": np.array([0], np.int32), "block_table": np.array([[0]], np.int32),
         "slot_mapping": np.arange(T, dtype=np.int32)}
for i in model.graph.input:
    if "cache" in i.name:
        d = [x.dim_value for x in i.type.tensor_type.shape.dim]
        feeds[i.name] = np.zeros((2, 16, d[2], d[3]), np.float32)
# warm the libraries: plugin loading, first-session set-up and imports are per process, not per model
BACKENDS["openvino"].core.get_versions("CPU")
from onnx import helper
tiny = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "t",
    [helper.make_tensor_value_info("x", 1, [1])], [helper.make_tensor_value_info("y", 1, [1])]))
ort_session(tiny).run(None, {"x": np.ones(1, np.float32)})
context.format.validate_schema({"format": "onnxgen.context", "version": 1, "scopes": {}})
out = {}
start = time.perf_counter()
if case == "plain":
    s = ort_session(onnx.load(path), threads=threads)
    out["load"] = time.perf_counter() - start
    s.run(None, feeds)
elif case.startswith("ov-graph") or case.startswith("ov-import"):
    from onnxgen.context.format import scope_nodes, read_manifest, read_payload
    from onnxgen.context.partition import submodel, value_types
    from pathlib import Path
    m = context.read_manifest(model); groups = scope_nodes(model); types = value_types(model)
    subs = [(n, submodel(model, groups[n], s.inputs, s.outputs, types, Path(path).parent), s) for n, s in m.scopes.items()]
    payloads = [read_payload(next(b for b in s.blobs if b.backend == "openvino"), Path(path).parent) for _, _, s in subs]
    start = time.perf_counter()
    ov = BACKENDS["openvino"]
    for (n, sub, s), payload in zip(subs, payloads):
        if case == "ov-graph":
            ov.compile_from_graph(sub)
        else:
            ov.load(payload, next(b for b in s.blobs if b.backend == "openvino"), s.inputs, s.outputs)
    out["load"] = time.perf_counter() - start
else:
    backends = [] if case == "none" else [case]
    with warnings.catch_warnings():
        warnings.simplefilter("error", context.ContextWarning)
        s = context.load(path, backends, threads=threads)
    out["load"] = time.perf_counter() - start
    out["plan"] = s.plan
    out["verification"] = s.verification
    s.run(None, feeds)
out["first_result"] = time.perf_counter() - start
print(json.dumps(out))
"""


def timed(case: str, path: Path, threads: int, repeats: int, cached: bool = False) -> dict:
    """Best of ``repeats`` subprocesses; ``cached``: all share a cache of verified hashes that an
    untimed load filled first, else each has an empty one."""
    best = None
    with tempfile.TemporaryDirectory(prefix="bench-context-cache-") as shared:
        for i in range(repeats + cached):
            cache = shared if cached else tempfile.mkdtemp(prefix="bench-context-cache-", dir=shared)
            env = dict(os.environ, ONNXGEN_CACHE=cache)
            result = subprocess.run([sys.executable, "-c", CHILD, case, str(path), str(threads)], capture_output=True,
                                    text=True, check=False, env=env)
            if result.returncode:
                raise RuntimeError(f"{case}: {result.stderr[-2000:]}")
            r = json.loads(result.stdout.strip().splitlines()[-1])
            if cached and i == 0:
                continue  # the load that fills the cache
            best = r if best is None or r["first_result"] < best["first_result"] else best
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3, help="best of N subprocess loads (default: 3)")
    parser.add_argument("--keep", help="build the model in this folder and keep it")
    args = parser.parse_args()

    from onnxgen import context
    from onnxgen.export.llm import build

    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-context-"))
    params = write_checkpoint(root / "ckpt", args.hidden, args.layers, args.vocab, args.inter, 12 if args.hidden % 12 == 0 else 8, 4)
    build(root / "ckpt", root / "plain")
    print(f"model: Llama-style, {params / 1e6:.0f}M parameters, {args.layers} layers, hidden {args.hidden}, "
          f"float32; threads {args.threads}; best of {args.repeats}")
    folders = {}
    for name, backend in (("ort", "onnxruntime"), ("ov", "openvino")):
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(root / "plain", folder)
        context.annotate(folder / "model.onnx", backend=backend)
        start = time.perf_counter()
        results = context.compile(folder / "model.onnx", backend)
        size = sum(r.size for r in results)
        print(f"compile {backend}: {len(results)} scopes, {size / 2**20:.1f} MiB of blobs in "
              f"{time.perf_counter() - start:.1f} s")
        folders[name] = folder / "model.onnx"

    rows = [("plain model, one onnxruntime session", "plain", root / "plain" / "model.onnx"),
            ("context.load, no blobs (original graph)", "none", folders["ort"]),
            ("context.load, onnxruntime blob (ORT format)", "onnxruntime", folders["ort"]),
            ("OpenVINO scopes: compile_model from graph", "ov-graph", folders["ov"]),
            ("OpenVINO scopes: import_model of the blobs", "ov-import", folders["ov"]),
            ("context.load, OpenVINO blobs + rest on ORT", "openvino", folders["ov"]),
            ("context.load, onnxruntime blob, hashes cached", "onnxruntime+cached", folders["ort"]),
            ("context.load, OpenVINO blobs, hashes cached", "openvino+cached", folders["ov"])]
    print(f"\n| {'case':<46} | load (s) | load + first run (s) |\n|{'-' * 48}|---------:|---------------------:|")
    for label, case, path in rows:
        case, _, cached = case.partition("+")
        r = timed(case, path, args.threads, args.repeats, cached=bool(cached))
        first = f"{r['first_result']:.2f}" if case not in ("ov-graph", "ov-import") else "-"
        print(f"| {label:<46} | {r['load']:8.2f} | {first:>20} |", flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
