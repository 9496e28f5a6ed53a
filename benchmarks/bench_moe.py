"""MoE on the CPU: onnxgen's kernel vs onnxruntime's com.microsoft.MoE vs the expanded function.

A Mixtral-shaped layer: 8 experts, top-2 (softmax over all experts, renormalised), hidden 1024,
intermediate 2816, SiLU-gated experts (SwiGLU), weights as initializers.  Decode (4 tokens)
and prefill-ish (64 tokens).  Every session runs with intra_op_num_threads=2, all in one
process; each case is timed in several interleaved rounds and the median is reported.

* ours          onnxgen.preview.MoE with the kernel library (fp32, fp16 and bf16 X + weights;
                the router logits stay fp32)
* ort MoE       com.microsoft.MoE, activation_type=swiglu, swiglu_fusion=1 (interleaved fc1
                [E, 2I, H], fc2 [E, H, I]), alpha=1, beta=0, no clamp: the same weights
* expanded      onnxgen's function body on stock onnxruntime (GroupedMatMul expands to one
                MatMul over every expert, so it does E/k times the work)

The floor is the expert weight bytes one call has to read divided by the copy bandwidth
measured here (two threads copying a 1 GiB array: bytes read + written per second), and
"GB/s" is those weight bytes over the measured time.

    python benchmarks/bench_moe.py [--rounds 7] [--iters 10] [--tokens 64 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import ml_dtypes
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxgen import kernels
from onnxgen.backends.ort import ort_value
from onnxgen.ops.domain import DOMAIN, DOMAIN_VERSION
from onnxgen.ops.moe import moe
from onnxgen.passes import expand

from memory import copy_bandwidth  # benchmarks/memory.py (the script directory is on sys.path)

E, K, H, I = 8, 2, 1024, 2816
THREADS = 2
BF16 = np.dtype(ml_dtypes.bfloat16)


def weights(seed=0):
    rng = np.random.default_rng(seed)
    gate_up = (rng.standard_normal((E, H, 2 * I), np.float32) / np.sqrt(H)).astype(np.float32)  # interleaved g/u
    down = (rng.standard_normal((E, I, H), np.float32) / np.sqrt(I)).astype(np.float32)
    router = (rng.standard_normal((H, E), np.float32) / np.sqrt(H) * 4).astype(np.float32)
    return gate_up, down, router


def elem(dtype):
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def init(name, array):
    if array.dtype == BF16:
        t = helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, array.view(np.uint16).tobytes(), raw=True)
        return t
    return numpy_helper.from_array(array, name)


def ours_model(gate_up, down, dtype):
    node = helper.make_node("MoE", ["X", "router_logits", "gate_up_weights", "", "down_weights"], ["Y"],
                            domain=DOMAIN, k=K, normalize=1, gate_up_layout="interleaved")
    graph = helper.make_graph(
        [node], "moe",
        [helper.make_tensor_value_info("X", elem(dtype), [None, H]),
         helper.make_tensor_value_info("router_logits", TensorProto.FLOAT, [None, E])],
        [helper.make_tensor_value_info("Y", elem(dtype), [None, H])],
        [init("gate_up_weights", gate_up.astype(dtype)), init("down_weights", down.astype(dtype))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])


def ort_moe_model(gate_up, down):
    fc1 = np.ascontiguousarray(gate_up.transpose(0, 2, 1))  # [E, 2I, H], rows interleaved gate/up
    fc2 = np.ascontiguousarray(down.transpose(0, 2, 1))  # [E, H, I]
    node = helper.make_node("MoE", ["X", "router_logits", "fc1", "", "fc2"], ["Y"], domain="com.microsoft",
                            k=K, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                            activation_beta=0.0, normalize_routing_weights=1)
    graph = helper.make_graph(
        [node], "ort_moe",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, H]),
         helper.make_tensor_value_info("router_logits", TensorProto.FLOAT, [None, E])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, H])],
        [init("fc1", fc1), init("fc2", fc2)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25), helper.make_opsetid("com.microsoft", 1)])


def session(model, library=None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = THREADS
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 4])
    args = parser.parse_args()
    library = kernels.library_path()
    if library is None:
        raise SystemExit("the kernel library is not built (pip install -e .)")

    gate_up, down, router = weights()
    sessions = {
        "ours fp32": (session(ours_model(gate_up, down, np.float32), library), np.float32, 4),
        "ours fp16": (session(ours_model(gate_up, down, np.float16), library), np.float16, 2),
        "ours bf16": (session(ours_model(gate_up, down, BF16), library), BF16, 2),
        "ort MoE fp32": (session(ort_moe_model(gate_up, down)), np.float32, 4),
        "expanded fp32": (session(expand(ours_model(gate_up, down, np.float32))), np.float32, 4),
    }
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (2 threads, read + write): {bandwidth / 1e9:.1f} GB/s; "
          f"E={E} k={K} H={H} I={I} SwiGLU, {THREADS} threads")

    rng = np.random.default_rng(1)
    for tokens in args.tokens:
        x = rng.standard_normal((tokens, H), np.float32)
        logits = (x @ router).astype(np.float32)
        want, chosen, _ = moe(x, logits, gate_up, None, down, k=K, normalize=1, gate_up_layout="interleaved")
        experts_used = len(np.unique(chosen))
        feeds = {name: {"X": ort_value(x.astype(dtype)), "router_logits": ort_value(logits)}
                 for name, (_, dtype, _) in sessions.items()}
        times = {name: [] for name in sessions}
        for name, (s, dtype, _) in sessions.items():  # warm up + check
            out = s.run_with_ort_values(None, feeds[name])[0]
            got = out.numpy() if dtype != BF16 else None
            if got is not None:
                err = float(np.abs(got.astype(np.float32) - want).max())
                tol = 1e-3 if dtype == np.float32 else 5e-2
                flag = "" if err < tol * max(1.0, float(np.abs(want).max())) else "  <-- MISMATCH"
                print(f"  T={tokens} {name}: max |diff| vs reference {err:.2e}{flag}")
        for _ in range(args.rounds):
            for name, (s, _, _) in sessions.items():
                iters = max(1, args.iters // 5) if name.startswith("expanded") else args.iters
                t0 = time.perf_counter()
                for _ in range(iters):
                    s.run_with_ort_values(None, feeds[name])
                times[name].append((time.perf_counter() - t0) / iters)
        base = statistics.median(times["ort MoE fp32"])
        print(f"\nT={tokens} tokens ({experts_used} experts used), median of {args.rounds} rounds")
        print(f"{'':16}{'ms':>9}{'vs ORT MoE':>12}{'floor ms':>10}{'GB/s':>8}")
        for name, (_, _, size) in sessions.items():
            t = statistics.median(times[name])
            used = E if name.startswith("expanded") else experts_used
            nbytes = used * (H * 2 * I + I * H) * size
            print(f"{name:16}{t * 1e3:9.2f}{t / base:11.2f}x{nbytes / bandwidth * 1e3:10.2f}{nbytes / t / 1e9:8.1f}")
        print()


if __name__ == "__main__":
    main()
