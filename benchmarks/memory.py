"""What the benchmarks share: the machine's copy and read bandwidths, the floors memory-bound
kernels are held to, and a sweep that evicts the last-level cache."""

import threading
import time

import numpy as np


def _in_threads(jobs) -> float:
    """Seconds taken to run the callables ``jobs``, one thread each, all at once."""
    threads = [threading.Thread(target=job) for job in jobs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def _halves(array: np.ndarray) -> list[np.ndarray]:
    return [array[: array.size // 2], array[array.size // 2:]]


def _summing(halves):
    return [lambda h=h: float(h.sum()) for h in halves]


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes read + written per second by two threads copying halves of an nbytes array (best of repeats)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    dst[...] = 0  # fault the pages in before timing
    jobs = [lambda s=s, d=d: np.copyto(d, s) for s, d in zip(_halves(src), _halves(dst))]
    return 2 * nbytes / min(_in_threads(jobs) for _ in range(repeats))


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes read per second by two threads summing halves of an nbytes array (best of repeats):
    the floor of a kernel that only reads, as decode attention does.  On the 2-core development
    VM it is about 0.63x the copy figure (30 of 48 GB/s), which counts write bytes too."""
    jobs = _summing(_halves(np.ones(nbytes // 4, np.float32)))
    return nbytes / min(_in_threads(jobs) for _ in range(repeats))


class CacheSweep:
    """Reads a buffer larger than the last-level cache with two threads, so the next call finds
    nothing of its data in cache.  Both cores stay busy: on a VM an idle vCPU comes back slowly,
    which is not what a busy server sees."""

    def __init__(self, mib: float = 1024):
        self.jobs = _summing(_halves(np.ones(int(mib) << 18, np.float32)))

    def __call__(self) -> None:
        _in_threads(self.jobs)
