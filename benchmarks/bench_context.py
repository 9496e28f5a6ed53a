"""Backend context: time to first result (load + first run) with and without blobs, per backend,
for a ~100M-parameter Llama-style model (random weights, written with numpy: no torch), in one run.

    .venv/bin/python benchmarks/bench_context.py                  # hidden 768, 10 layers, vocab 32000 (~112M)
    .venv/bin/python benchmarks/bench_context.py --layers 2 --vocab 4000   # a quick look
    .venv/bin/python benchmarks/bench_context.py --sections kernels      # only the onnxgen-kernels rows
    .venv/bin/python benchmarks/bench_context.py --sections openvino     # weightless vs full OpenVINO blobs

Rows:
  plain           the plain model in one onnxruntime session (onnxgen.backends-style, kernels registered)
  ctx, no blobs   context.load(..., backends=[]) of the annotated model: the same, through the planner
  ort blob        the whole graph as one scope, an ORT-format blob (optimised at compile time)
  ov from graph   OpenVINO compile_model of every OpenVINO scope from its ONNX subgraph (what a load
                  without blobs would pay to run those scopes on OpenVINO)
  ov blobs        the same scopes from their exported blobs (import_model), then context.load + first run
  ..., cached     the same context.load with the cache of verified hashes warm (a load before, same
                  files): the scopes' content hashes and the blobs' sha256 are not computed again

OpenVINO rows (``--sections openvino``), on the same Llama model: the scopes compiled twice, as
weightless blobs (the default: the weights stay in model.onnx.data, which the import reads) and as
full blobs (``format="openvino.compiled_model"``: each blob holds its weights); blob sizes printed,
then compile_model from the graph, import_model of each kind, and context.load of each kind (empty
and warm hash cache), the cases taken in turn.

onnxgen-kernels rows (``--sections kernels``), two models with a score_mod on every attention layer
(softcap 30 + ALiBi + causal sliding window 128), one scope per attention node:
  paged           a Llama-style export (``--kernels-layers`` layers, hidden ``--kernels-hidden``) whose
                  PagedAttention nodes carry the score_mod
  flex            a stack of FlexAttention layers (testing.flex_stack_model: q/k/v/o projections)
each as: the plain model in one session (score_mods compiled / FlexAttention rewritten at session
creation), context.load without blobs (the same, through the planner), context.load with the
onnxgen-kernels programs blobs (nothing compiled), and the latter with the hash cache warm.  Before
them, the compile steps such a load skips are timed in this process (best of 3) and printed apart:
compile_score_mods over the whole model, of which compile_graph per score_mod; flex_to_kernel
over the whole model, of which plan_rewrite (pointwise recovery + compile) per node.
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
if model.graph.input[0].name == "x":  # the FlexAttention stack
    hidden = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    feeds = {"x": np.random.default_rng(0).standard_normal((1, T, hidden)).astype(np.float32)}
else:
    feeds = {"input_ids": np.arange(T) % 100, "position_ids": np.arange(T),
             "cumulative_sequence_length": np.array([0, T], np.int32), "past_seqlens": np.array([0], np.int32),
             "block_table": np.array([[0]], np.int32), "slot_mapping": np.arange(T, dtype=np.int32)}
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
    base = Path(path).parent
    subs = [(n, submodel(model, groups[n], s.inputs, s.outputs, types, base), s) for n, s in m.scopes.items()]
    payloads = [read_payload(next(b for b in s.blobs if b.backend == "openvino"), base) for _, _, s in subs]
    start = time.perf_counter()
    ov = BACKENDS["openvino"]
    for (n, sub, s), payload in zip(subs, payloads):
        if case == "ov-graph":
            ov.compile_from_graph(sub)
        else:  # a weightless blob's load includes checking where its weights lie (as context.load does)
            external = lambda n=n, s=s: submodel(model, groups[n], s.inputs, s.outputs, types, keep_external=True)
            ov.load(payload, next(b for b in s.blobs if b.backend == "openvino"), s.inputs, s.outputs,
                    external=external, base_dir=base)
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


def one_load(case: str, path: Path, threads: int, cache: str) -> dict:
    """One load (and first run) in a fresh subprocess whose cache of verified hashes is ``cache``."""
    env = dict(os.environ, ONNXGEN_CACHE=cache)
    result = subprocess.run([sys.executable, "-c", CHILD, case, str(path), str(threads)], capture_output=True,
                            text=True, check=False, env=env)
    if result.returncode:
        raise RuntimeError(f"{case}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def timed(case: str, path: Path, threads: int, repeats: int, cached: bool = False) -> dict:
    """Best of ``repeats`` subprocesses; ``cached``: all share a cache of verified hashes that an
    untimed load filled first, else each has an empty one."""
    best = None
    with tempfile.TemporaryDirectory(prefix="bench-context-cache-") as shared:
        for i in range(repeats + cached):
            cache = shared if cached else tempfile.mkdtemp(prefix="bench-context-cache-", dir=shared)
            r = one_load(case, path, threads, cache)
            if cached and i == 0:
                continue  # the load that fills the cache
            best = r if best is None or r["first_result"] < best["first_result"] else best
    return best


def timed_round_robin(cases: list[tuple[str, Path]], threads: int, repeats: int) -> list[dict]:
    """Best of ``repeats`` per case, the cases taken in turn in each round (so that a busy spell of a
    shared machine does not fall on one case only); ``+cached`` cases share a warm cache."""
    best: list[dict | None] = [None] * len(cases)
    with tempfile.TemporaryDirectory(prefix="bench-context-cache-") as shared:
        warm = {}
        for i, (case, path) in enumerate(cases):
            if case.endswith("+cached"):
                warm[i] = tempfile.mkdtemp(prefix="warm-", dir=shared)
                one_load(case.partition("+")[0], path, threads, warm[i])  # fills the cache, untimed
        for _ in range(repeats):
            for i, (case, path) in enumerate(cases):
                cache = warm.get(i) or tempfile.mkdtemp(prefix="cold-", dir=shared)
                r = one_load(case.partition("+")[0], path, threads, cache)
                if best[i] is None or r["first_result"] < best[i]["first_result"]:
                    best[i] = r
    return best


SCORE_MOD_WINDOW, SOFTCAP = 128, 30.0


def score_mod(heads: int):
    from onnxgen.ops import score_mods as sm

    return sm.compose(sm.softcap(SOFTCAP), sm.alibi(heads), sm.sliding_window(SCORE_MOD_WINDOW))


def save_fresh(model, folder: Path) -> Path:
    """``model`` saved as ``folder/model.onnx`` (weights beside it) in an emptied ``folder``."""
    import onnx

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    onnx.save(model, folder / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    return folder / "model.onnx"


def write_kernel_models(root: Path, layers: int, hidden: int, inter: int, vocab: int) -> dict[str, Path]:
    """The two onnxgen-kernels models, annotated (one scope per attention node) and compiled."""
    import onnx
    from onnx import helper

    from onnxgen import context
    from onnxgen.export.llm import build
    from onnxgen.testing import flex_stack_model

    heads = 8
    params = write_checkpoint(root / "kernels-ckpt", hidden, layers, vocab, inter, heads, 4)
    build(root / "kernels-ckpt", root / "kernels-plain")
    paths = {}
    model = onnx.load(root / "kernels-plain" / "model.onnx")
    for node in model.graph.node:
        if node.op_type == "PagedAttention":
            node.attribute.append(helper.make_attribute("score_mod", score_mod(heads)))
    paths["paged"] = save_fresh(model, root / "kernels-paged")
    print(f"paged model: Llama-style, {params / 1e6:.0f}M parameters, {layers} layers, hidden {hidden}, "
          f"{heads} heads, a score_mod (softcap + ALiBi + window) on every PagedAttention")
    model = flex_stack_model(score_mod(heads), layers=layers, hidden=hidden, heads=heads, kv_heads=heads)
    paths["flex"] = save_fresh(model, root / "kernels-flex")
    print(f"flex model: {layers} FlexAttention layers, hidden {hidden}, {heads} heads, "
          f"{4 * layers * hidden * hidden / 1e6:.0f}M parameters, the same score_mod")
    for kind, path in list(paths.items()):
        shutil.rmtree(path.parent.with_name(path.parent.name + "-ctx"), ignore_errors=True)
        shutil.copytree(path.parent, path.parent.with_name(path.parent.name + "-ctx"))
        annotated = path.parent.with_name(path.parent.name + "-ctx") / "model.onnx"
        context.annotate(annotated, op_types=["PagedAttention" if kind == "paged" else "FlexAttention"])
        start = time.perf_counter()
        results = context.compile(annotated, "onnxgen-kernels")
        assert not any(r.error for r in results), results
        print(f"compile onnxgen-kernels ({kind}): {len(results)} scopes, "
              f"{sum(r.size for r in results) / 1024:.1f} KiB of programs blobs in {time.perf_counter() - start:.2f} s")
        paths[kind + "-ctx"] = annotated
    return paths


def time_compile_steps(paths: dict[str, Path], repeats: int) -> None:
    """What a load without the blobs pays for compiling, in this process, best of ``repeats``."""
    import onnx

    from onnxgen.passes import compile_score_mod as csm
    from onnxgen.passes import flex_kernel

    def best(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    paged = onnx.load(paths["paged"])
    mods = [next(a for a in n.attribute if a.name == "score_mod").g for n in paged.graph.node
            if n.op_type == "PagedAttention"]
    whole = best(lambda: csm.compile_score_mods(paged))
    graphs = best(lambda: [csm.compile_graph(g) for g in mods])
    print(f"paged: compile_score_mods over the whole model {whole * 1e3:.1f} ms, of which compile_graph of the "
          f"{len(mods)} score_mods {graphs * 1e3:.1f} ms (the rest: copying the model)")
    flex = onnx.load(paths["flex"])
    nodes = [n for n in flex.graph.node if n.op_type == "FlexAttention"]
    whole = best(lambda: flex_kernel.flex_to_kernel(flex))
    inferred = onnx.shape_inference.infer_shapes(flex)
    infos = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    plans = best(lambda: [flex_kernel.plan_rewrite(n, infos) for n in nodes])
    inference = best(lambda: onnx.shape_inference.infer_shapes(flex))
    print(f"flex: flex_to_kernel over the whole model {whole * 1e3:.1f} ms, of which shape inference "
          f"{inference * 1e3:.1f} ms and plan_rewrite of the {len(nodes)} nodes (pointwise recovery + compile) "
          f"{plans * 1e3:.1f} ms (the rest: copying the model, emitting nodes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3, help="best of N subprocess loads (default: 3)")
    parser.add_argument("--keep", help="build the model in this folder and keep it")
    parser.add_argument("--sections", default="context,kernels",
                        help="comma-separated: context (the Llama rows), kernels (the onnxgen-kernels rows), "
                             "openvino (weightless against full OpenVINO blobs, on the Llama model)")
    parser.add_argument("--kernels-layers", type=int, default=24)
    parser.add_argument("--kernels-hidden", type=int, default=768)
    parser.add_argument("--kernels-inter", type=int, default=1024)
    parser.add_argument("--kernels-vocab", type=int, default=8000)
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-context-"))
    if "context" in sections:
        context_rows(args, root)
    if "kernels" in sections:
        kernel_rows(args, root)
    if "openvino" in sections:
        openvino_rows(args, root)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def kernel_rows(args, root: Path) -> None:
    paths = write_kernel_models(root, args.kernels_layers, args.kernels_hidden, args.kernels_inter,
                                args.kernels_vocab)
    time_compile_steps(paths, args.repeats)
    print(f"threads {args.threads}; best of {args.repeats}")
    print(f"\n| {'case':<58} | load (s) | load + first run (s) |\n|{'-' * 60}|---------:|---------------------:|")
    for kind in ("paged", "flex"):
        rows = [(f"{kind}: plain model, one session (compiled at creation)", "plain", paths[kind]),
                (f"{kind}: context.load, no blobs (compiled at creation)", "none", paths[kind + "-ctx"]),
                (f"{kind}: context.load, onnxgen-kernels programs blobs", "onnxgen-kernels", paths[kind + "-ctx"]),
                (f"{kind}: context.load, programs blobs, hashes cached", "onnxgen-kernels+cached",
                 paths[kind + "-ctx"])]
        results = timed_round_robin([(case, path) for _, case, path in rows], args.threads, args.repeats)
        for (label, _, _), r in zip(rows, results):
            print(f"| {label:<58} | {r['load']:8.2f} | {r['first_result']:20.2f} |", flush=True)


def llama_model(args, root: Path) -> Path:
    """The ~100M-parameter Llama-style model, built once into ``root/plain``."""
    from onnxgen.export.llm import build

    if not (root / "plain" / "model.onnx").exists():
        params = write_checkpoint(root / "ckpt", args.hidden, args.layers, args.vocab, args.inter,
                                  12 if args.hidden % 12 == 0 else 8, 4)
        build(root / "ckpt", root / "plain")
        print(f"model: Llama-style, {params / 1e6:.0f}M parameters, {args.layers} layers, hidden {args.hidden}, "
              f"float32, {(root / 'plain' / 'model.onnx.data').stat().st_size / 2**20:.0f} MiB of weights; "
              f"threads {args.threads}; best of {args.repeats}")
    return root / "plain" / "model.onnx"


def compiled_copy(root: Path, name: str, backend: str, format: str | None = None) -> Path:
    """A copy of the plain model, annotated for ``backend`` (its largest convex groups) and compiled."""
    from onnxgen import context

    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(root / "plain", folder)
    context.annotate(folder / "model.onnx", backend=backend)
    start = time.perf_counter()
    results = context.compile(folder / "model.onnx", backend, format=format)
    assert not any(r.error for r in results), results
    size = sum(r.size for r in results)
    print(f"compile {backend}{f' ({format})' if format else ''}: {len(results)} scopes, {size / 2**20:.1f} MiB of "
          f"blobs in {time.perf_counter() - start:.1f} s")
    return folder / "model.onnx"


def context_rows(args, root: Path) -> None:
    llama_model(args, root)
    folders = {name: compiled_copy(root, name, backend) for name, backend in (("ort", "onnxruntime"),
                                                                              ("ov", "openvino"))}

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


def openvino_rows(args, root: Path) -> None:
    """Weightless OpenVINO blobs (the default) against full ones (the weights in each blob)."""
    llama_model(args, root)
    folders = {"weightless": compiled_copy(root, "ov", "openvino"),
               "full": compiled_copy(root, "ov-full", "openvino", format="openvino.compiled_model")}
    rows = [("OpenVINO scopes: compile_model from graph", "ov-graph", folders["full"]),
            ("OpenVINO scopes: import_model, full blobs", "ov-import", folders["full"]),
            ("OpenVINO scopes: import_model, weightless blobs", "ov-import", folders["weightless"]),
            ("context.load, full OpenVINO blobs + rest on ORT", "openvino", folders["full"]),
            ("context.load, weightless OpenVINO blobs + rest", "openvino", folders["weightless"]),
            ("context.load, full blobs, hashes cached", "openvino+cached", folders["full"]),
            ("context.load, weightless blobs, hashes cached", "openvino+cached", folders["weightless"])]
    results = timed_round_robin([(case, path) for _, case, path in rows], args.threads, args.repeats)
    print(f"\n| {'case':<48} | load (s) | load + first run (s) |\n|{'-' * 50}|---------:|---------------------:|")
    for (label, case, _), r in zip(rows, results):
        first = f"{r['first_result']:.2f}" if not case.startswith("ov-") else "-"
        print(f"| {label:<48} | {r['load']:8.2f} | {first:>20} |", flush=True)


if __name__ == "__main__":
    main()
