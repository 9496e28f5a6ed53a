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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    main()
