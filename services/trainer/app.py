"""Wiring of the trainer service."""

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
from cdl.v1 import events_pb2
from services.trainer.settings import TrainerSettings
from services.trainer.trainer import Trainer

__all__ = ["TrainerApp", "main"]

log = get_logger(__name__)


def coalesce_key(event: Event) -> str:
    """data.updated events of one dataset coalesce to the newest; others never do."""
    if isinstance(event.payload, events_pb2.DataUpdated):
        return f"data:{event.payload.dataset}"
    return f"event:{event.id}"


class TrainerApp:
    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.store = ObjectStore.from_settings(settings)
        self.registry = ModelRegistry(self.store)
        self.trainer = Trainer(settings, self.store, self.registry, source_name("trainer"))
        self.loop = JobLoop(
            bootstrap=settings.kafka_bootstrap,
            group_id=settings.group_id,
            topics=[settings.updated_topic, settings.tuning_topic],
            transactional_id=f"{settings.group_id}-{settings.instance}",
            job=lambda event, ctx: self.trainer.handle(event),
            key=coalesce_key,
            deadletter_topic=settings.deadletter_topic,
            processed=SqliteProcessedStore(Path(settings.state_dir) / "trainer" / f"{settings.group_id}.sqlite"),
        )
        self.http: HttpEndpoint | None = None
        self._ready = threading.Event()

    def _health(self) -> tuple[bool, dict[str, Any]]:
        ok = self._ready.is_set() and self.loop.assigned.is_set()
        return ok, {"training": self.loop.busy.is_set(), "jobs": self.loop.jobs_done, "coalesced": self.loop.coalesced}

    def start(self) -> None:
        self.store.ensure_buckets(*BUCKETS)
        self.http = serve_http(self.settings.metrics_port, health=self._health)
        log.info("trainer started", metrics_port=self.http.port, code_version=self.trainer.code_version)

    def run(self) -> None:
        self._ready.set()
        try:
            self.loop.run()
        finally:
            self._ready.clear()
            if self.http is not None:
                self.http.close()


def main() -> None:
    settings = TrainerSettings()
    configure_logging("trainer", settings.log_level)
    app = TrainerApp(settings)
    app.loop.install_signal_handlers()
    app.start()
    app.run()
