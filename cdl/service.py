"""The shell every job-style service shares (trainer, compressor, …): a
:class:`~cdl.kafka.JobLoop` with a persistent processed-id store, the health +
metrics endpoint, and SIGTERM handling. Services only provide the job."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cdl import tracing
from cdl.dedupe import SqliteProcessedStore
from cdl.events import Event, OutRecord
from cdl.kafka import JobLoop
from cdl.logging import get_logger
from cdl.memory import keep_freed_memory, release_memory, settle_gc
from cdl.observability import HttpEndpoint, serve_http
from cdl.settings import ServiceSettings, transactional_id

__all__ = ["JobService", "keep_freed_memory", "release_memory", "settle_gc"]

log = get_logger(__name__)


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
        tracing.setup(name, settings)
        self.loop = JobLoop(
            bootstrap=settings.kafka_bootstrap,
            group_id=group_id,
            topics=topics,
            transactional_id=transactional_id(group_id, instance),
            job=lambda event, ctx: self._job(job, event),
            key=key,
            deadletter_topic=deadletter_topic,
            processed=SqliteProcessedStore(Path(settings.state_dir) / name / f"{group_id}.sqlite"),
            policy=settings.failure_policy(),
        )
        self.http: HttpEndpoint | None = None
        self._ready = threading.Event()

    @staticmethod
    def _job(job: Callable[[Event], Sequence[OutRecord]], event: Event) -> Sequence[OutRecord]:
        try:
            return job(event)
        finally:
            release_memory()

    def _health(self) -> tuple[bool, dict[str, Any]]:
        ok = self._ready.is_set() and self.loop.assigned.is_set()
        return ok, {"busy": self.loop.busy.is_set(), "jobs": self.loop.jobs_done, "coalesced": self.loop.coalesced}

    def start(self) -> None:
        self.http = serve_http(self.settings.metrics_port, health=self._health, host=self.settings.metrics_host)
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
