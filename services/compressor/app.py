"""Wiring of the compressor service."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from cdl.dedupe import SqliteProcessedStore
from cdl.events import Event, source_name
from cdl.kafka import JobLoop
from cdl.logging import configure_logging, get_logger
from cdl.observability import HttpEndpoint, serve_http
from cdl.registry import ModelRegistry
from cdl.store import BUCKETS, ObjectStore
from services.compressor.compressor import Compressor
from services.compressor.settings import CompressorSettings

__all__ = ["CompressorApp", "main"]

log = get_logger(__name__)


def _key(event: Event) -> str:
    return f"event:{event.id}"


class CompressorApp:
    def __init__(self, settings: CompressorSettings) -> None:
        self.settings = settings
        self.store = ObjectStore.from_settings(settings)
        self.registry = ModelRegistry(self.store)
        self.compressor = Compressor(settings, self.store, self.registry, source_name("compressor"))
        self.loop = JobLoop(
            bootstrap=settings.kafka_bootstrap,
            group_id=settings.group_id,
            topics=[settings.trained_topic],
            transactional_id=f"{settings.group_id}-{settings.instance}",
            job=lambda event, ctx: self.compressor.handle(event),
            key=_key,
            deadletter_topic=settings.deadletter_topic,
            processed=SqliteProcessedStore(Path(settings.state_dir) / "compressor" / f"{settings.group_id}.sqlite"),
        )
        self.http: HttpEndpoint | None = None
        self._ready = threading.Event()

    def _health(self) -> tuple[bool, dict[str, Any]]:
        ok = self._ready.is_set() and self.loop.assigned.is_set()
        return ok, {"compressing": self.loop.busy.is_set(), "jobs": self.loop.jobs_done}

    def start(self) -> None:
        self.store.ensure_buckets(*BUCKETS)
        self.http = serve_http(self.settings.metrics_port, health=self._health)
        log.info("compressor started", metrics_port=self.http.port)

    def run(self) -> None:
        self._ready.set()
        try:
            self.loop.run()
        finally:
            self._ready.clear()
            if self.http is not None:
                self.http.close()


def main() -> None:
    settings = CompressorSettings()
    configure_logging("compressor", settings.log_level)
    app = CompressorApp(settings)
    app.loop.install_signal_handlers()
    app.start()
    app.run()
