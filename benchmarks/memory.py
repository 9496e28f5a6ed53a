"""What the benchmarks share: the machine's copy bandwidth, the floor memory-bound kernels are held to."""

import threading
import time

import numpy as np


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes read + written per second by two threads copying halves of an nbytes array (best of repeats)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    dst[...] = 0  # fault the pages in before timing
    half = src.size // 2
    bounds = [(0, half), (half, src.size)]

    def part(lo, hi):
        np.copyto(dst[lo:hi], src[lo:hi])

    best = float("inf")
    for _ in range(repeats):
        threads = [threading.Thread(target=part, args=b) for b in bounds]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best
