"""The shell every job-style service shares (trainer, compressor, …): a
:class:`~cdl.kafka.JobLoop` with a persistent processed-id store, the health +
metrics endpoint, and SIGTERM handling. Services only provide the job."""

from __future__ import annotations

import ctypes
import gc
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cdl.dedupe import SqliteProcessedStore
from cdl.events import Event, OutRecord
from cdl.kafka import JobLoop
from cdl.logging import get_logger
from cdl.observability import HttpEndpoint, serve_http
from cdl.settings import ServiceSettings

__all__ = ["JobService", "keep_freed_memory", "settle_gc"]

log = get_logger(__name__)


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


def _no_coalescing(event: Event) -> str:
    return f"event:{event.id}"


class JobService:
    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        *,
        group_id: str,
        instance: str,
        topics: Sequence[str],
        deadletter_topic: str,
        job: Callable[[Event], Sequence[OutRecord]],
        key: Callable[[Event], str] = _no_coalescing,
    ) -> None:
        self.name = name
        self.settings = settings
        self.loop = JobLoop(
            bootstrap=settings.kafka_bootstrap,
            group_id=group_id,
            topics=topics,
            transactional_id=f"{group_id}-{instance}",
            job=lambda event, ctx: job(event),
            key=key,
            deadletter_topic=deadletter_topic,
            processed=SqliteProcessedStore(Path(settings.state_dir) / name / f"{group_id}.sqlite"),
        )
        self.http: HttpEndpoint | None = None
        self._ready = threading.Event()

    def _health(self) -> tuple[bool, dict[str, Any]]:
        ok = self._ready.is_set() and self.loop.assigned.is_set()
        return ok, {"busy": self.loop.busy.is_set(), "jobs": self.loop.jobs_done, "coalesced": self.loop.coalesced}

    def start(self) -> None:
        self.http = serve_http(self.settings.metrics_port, health=self._health)
        log.info(f"{self.name} started", metrics_port=self.http.port)

    def run(self) -> None:
        self._ready.set()
        try:
            self.loop.run()
        finally:
            self._ready.clear()
            if self.http is not None:
                self.http.close()

    def main(self) -> None:
        self.loop.install_signal_handlers()
        self.start()
        self.run()
