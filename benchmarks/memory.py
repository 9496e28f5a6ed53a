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


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes read per second by two threads summing halves of an nbytes array (best of repeats):
    the floor of a kernel that only reads, as decode attention does.  On the 2-core development
    VM it is about 0.63x the copy figure (30 of 48 GB/s), which counts write bytes too."""
    data = np.ones(nbytes // 4, np.float32)
    halves = [data[: data.size // 2], data[data.size // 2:]]
    best = float("inf")
    for _ in range(repeats):
        threads = [threading.Thread(target=lambda h=h: float(h.sum())) for h in halves]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


class CacheSweep:
    """Reads a buffer larger than the last-level cache with two threads, so the next call finds
    nothing of its data in cache.  Both cores stay busy: on a VM an idle vCPU comes back slowly,
    which is not what a busy server sees."""

    def __init__(self, mib: float = 1024):
        data = np.ones(int(mib) << 18, np.float32)
        self.halves = [data[: data.size // 2], data[data.size // 2:]]

    def __call__(self) -> None:
        threads = [threading.Thread(target=lambda h=h: float(h.sum())) for h in self.halves]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
