"""Process memory: the garbage collector's thresholds and glibc's heap (no Kafka, no grpc).

Used by services and by domain code (ingest's processor trims its heap on a trickle).
"""

from __future__ import annotations

import ctypes
import gc
import os

__all__ = ["keep_freed_memory", "release_memory", "resident_bytes", "settle_gc"]


def settle_gc() -> None:
    """Tune the cyclic garbage collector for a long-running stream, after start-up.

    A stream allocates a Python object per consumed message; with CPython's
    default thresholds (a young collection every 700 allocations) the collector
    took ~15% of ingest's time re-walking what was alive. Objects alive now
    (modules, clients, recovered state) are frozen out of collections, and young
    collections run every 50,000 allocations. Garbage is still freed by
    reference counting as before; only cycles wait a little longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc's malloc reuse memory the process frees rather than hand it back to the kernel.

    By default every allocation over 128 KiB (a consumed batch, a shard's
    columns, its encoded bytes, librdkafka's fetch buffers) is a fresh ``mmap``
    and every free an ``munmap``, so each new buffer is faulted in again page by
    page. On the virtual machines cdl runs on a page fault costs several
    microseconds: touching 128 MiB of fresh memory took ~0.25 s of CPU, against
    0.02 s for the same copy into memory already mapped (docs/benchmarks.md). With
    allocations up to ``mmap_threshold`` served from the heap, and the heap kept
    until ``trim_threshold`` bytes of it are free, a stream reuses the pages it
    faulted in once. Call it at start-up, before threads allocate. The cost: the
    process keeps its peak heap. Returns False where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def release_memory() -> bool:
    """Collect cycles and hand the C heap's free memory back to the kernel (glibc ``malloc_trim``).

    Job services (trainer, compressor) call it after every job: a training allocates
    hundreds of MB (the dataset, tensors, torch's per-thread malloc arenas) and
    frees it again; without a trim glibc keeps the freed pages, and a long run's
    resident memory creeps up job after job (bench/soak). Returns False where the
    C library is not glibc.
    """
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process' resident memory (``/proc/self/statm``), or None where there is no procfs."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None
