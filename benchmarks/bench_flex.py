"""Compiled score functions: PagedAttention with a score_mod, compiled vs expanded vs plain.

Llama-3-8B-shaped attention (32 query heads, 8 KV heads, head size 128, block size 16,
shuffled block table, fp32 cache), two threads, one process:

  decode    batch 4, ~2000 cached tokens each, one new token each;
  prefill   one sequence of 1024 new tokens, no past.

Score mods (is_causal=1 on every node, so the kernel skips blocks after the query):

  softcap+window   compose(softcap(50), sliding_window(256, causal=False))
  alibi            alibi(32)

Implementations:

  compiled     onnxgen.backends.ort.session: the score_mod compiled to bytecode, run by the
               kernel over each block's kv positions (caches bound in place);
  expanded     the same model through onnxgen.passes.expand on stock onnxruntime (fewer rounds);
  attributes   the kernel with the same math as attributes (softcap=50, local_window_size=256),
               softcap+window only: the kernel's own fast path for it, which also skips blocks
               outside the window;
  plain        the kernel, causal, no score_mod: the floor.

Non-paged ``ai.onnx.preview.FlexAttention`` (mods lifted by ``flex_score_mod``, Q/K/V
``[B, H, L, D]``; decode: batch 4 x 1 query over 2048 keys with softcap / ALiBi, no masks since
the query sits at q_idx 0; prefill: 1024 tokens with causal softcap+window, ALiBi+causal, causal):

  flex kernel    onnxgen.backends.ort.session: the node rewritten to the kernel
                 (passes.flex_kernel; the final causal/window Where also sets is_causal/window);
  flex expanded  the node's expansion on stock onnxruntime (materialised [B, H, L, S] scores).

    python benchmarks/bench_flex.py           # full sizes (a minute or two)
    python benchmarks/bench_flex.py --quick   # small sizes, a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "tests"))

from onnxgen.backends.ort import session  # noqa: E402
from onnxgen.ops import score_mods as sm  # noqa: E402
from onnxgen.testing import single_node_model  # noqa: E402

OUTPUTS = ["output", "key_cache_out", "value_cache_out"]
CACHES = ("key_cache", "value_cache")


def make_inputs(rng, past, new, heads, kv_heads, head_size, block_size=16):
    past, new = np.asarray(past, np.int32), np.asarray(new, np.int32)
    totals = past + new
    needed = -(-totals // block_size)
    num_blocks = int(needed.sum()) + 4
    order = rng.permutation(num_blocks)
    table = np.full((len(past), int(needed.max())), -1, np.int32)
    used = 0
    for b in range(len(past)):
        table[b, : needed[b]] = order[used: used + needed[b]]
        used += needed[b]
    tokens = int(new.sum())
    return {
        "query": rng.standard_normal((tokens, heads * head_size), np.float32),
        "key": rng.standard_normal((tokens, kv_heads * head_size), np.float32),
        "value": rng.standard_normal((tokens, kv_heads * head_size), np.float32),
        "key_cache": rng.standard_normal((num_blocks, block_size, kv_heads, head_size), np.float32),
        "value_cache": rng.standard_normal((num_blocks, block_size, kv_heads, head_size), np.float32),
        "cumulative_sequence_length": np.concatenate([[0], np.cumsum(new)]).astype(np.int32),
        "past_seqlens": past,
        "block_table": table,
    }


def timed(model, inputs, rounds, use_kernels=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = session(model, threads=2, use_kernels=use_kernels)
    for name in CACHES:
        s.set_cache(name, inputs[name].copy())
    feeds = {k: v for k, v in inputs.items() if k not in CACHES}
    out = s.run(feeds)["output"]  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        s.run(feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["paged", "flex"], help="run one part")
    args = parser.parse_args(argv)
    if args.only != "paged":
        main_flex(args.quick)
    if args.only == "flex":
        return
    heads, kv_heads, head_size = (8, 2, 64) if args.quick else (32, 8, 128)
    rng = np.random.default_rng(0)
    cases = {
        "decode": ([int(x) for x in rng.integers(1800, 2200, 4)] if not args.quick else [200, 180], [1] * (2 if args.quick else 4)),
        "prefill": ([0], [128 if args.quick else 1024]),
    }
    mods = {
        "softcap+window": (sm.compose(sm.softcap(50.0), sm.sliding_window(256, causal=False)),
                           dict(softcap=50.0, local_window_size=256)),
        "alibi": (sm.alibi(heads), None),
    }
    rounds, slow_rounds = (5, 2) if args.quick else (20, 3)
    print(f"{'case':8} {'mod':15} {'impl':11} {'median ms':>10} {'vs compiled':>12} {'max|diff|':>10}")
    for case, (past, new) in cases.items():
        inputs = make_inputs(rng, past, new, heads, kv_heads, head_size)
        attrs = dict(num_heads=heads, kv_num_heads=kv_heads)
        plain_t, _ = timed(single_node_model("PagedAttention", inputs, OUTPUTS, **attrs), inputs, rounds)
        for mod_name, (mod, equivalent) in mods.items():
            model = single_node_model("PagedAttention", inputs, OUTPUTS, score_mod=mod, **attrs)
            compiled_t, want = timed(model, inputs, rounds)
            rows = [("compiled", compiled_t, want)]
            rows.append(("expanded", *timed(model, inputs, slow_rounds, use_kernels=False)))
            if equivalent:
                rows.append(("attributes", *timed(single_node_model("PagedAttention", inputs, OUTPUTS, **attrs, **equivalent),
                                                  inputs, rounds)))
            rows.append(("plain", plain_t, None))
            for impl, t, out in rows:
                diff = f"{np.abs(out - want).max():.1e}" if out is not None else "-"
                print(f"{case:8} {mod_name:15} {impl:11} {t * 1e3:10.2f} {t / compiled_t:11.2f}x {diff:>10}")


def flex_model(score_mod, q_heads, kv_heads, head_size):
    import onnx
    from onnx import TensorProto, helper

    names = ("Q", "K", "V")
    node = helper.make_node("FlexAttention", list(names), ["Y"], domain="ai.onnx.preview", score_mod=score_mod)
    heads = (q_heads, kv_heads, kv_heads)
    graph = helper.make_graph(
        [node], "flex",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, h, None, head_size]) for n, h in zip(names, heads)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25), helper.make_opsetid("ai.onnx.preview", 1)])


def timed_flex(model, feeds, rounds, use_kernels=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = session(model, threads=2, use_kernels=use_kernels)
    out = s.run(feeds)["Y"]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        s.run(feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main_flex(quick: bool):
    heads, kv_heads, head_size = (8, 2, 64) if quick else (32, 8, 128)
    rng = np.random.default_rng(1)
    cases = {"decode": (4, 1, 256 if quick else 2048), "prefill": (1, 128 if quick else 1024, 128 if quick else 1024)}
    # decode: one query at q_idx 0, so no causal masks there (they would leave it one key)
    mods = {"decode": {"softcap": sm.softcap(50.0), "alibi": sm.alibi(heads)},
            "prefill": {"softcap+window": sm.compose(sm.softcap(50.0), sm.sliding_window(256)),
                        "alibi+causal": sm.compose(sm.alibi(heads), sm.causal()), "causal": sm.causal()}}
    rounds, slow_rounds = (5, 2) if quick else (10, 2)
    print(f"\nnon-paged FlexAttention\n{'case':8} {'mod':15} {'impl':14} {'median ms':>10} {'vs kernel':>10} "
          f"{'max|diff|':>10}")
    for case, (batch, q_len, kv_len) in cases.items():
        feeds = {"Q": rng.standard_normal((batch, heads, q_len, head_size), np.float32),
                 "K": rng.standard_normal((batch, kv_heads, kv_len, head_size), np.float32),
                 "V": rng.standard_normal((batch, kv_heads, kv_len, head_size), np.float32)}
        for mod_name, mod in mods[case].items():
            model = flex_model(sm.flex_score_mod(mod), heads, kv_heads, head_size)
            fast_t, want = timed_flex(model, feeds, rounds)
            slow_t, got = timed_flex(model, feeds, slow_rounds, use_kernels=False)
            for impl, t, out in (("flex kernel", fast_t, want), ("flex expanded", slow_t, got)):
                diff = np.nanmax(np.abs(out - want))
                print(f"{case:8} {mod_name:15} {impl:14} {t * 1e3:10.2f} {t / fast_t:9.2f}x {diff:10.1e}")


if __name__ == "__main__":
    main()
