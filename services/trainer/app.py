"""Wiring of the trainer service."""

from __future__ import annotations

import functools

from cdl.events import Event, source_name
from cdl.logging import configure_logging
from cdl.provision import provision
from cdl.registry import ModelRegistry
from cdl.service import JobService
from cdl.store import ObjectStore
from cdl.store_access import store_buckets
from cdl.v1 import events_pb2
from services.trainer.settings import TrainerSettings
from services.trainer.trainer import Trainer

__all__ = ["build", "coalesce_key", "main"]


def coalesce_key(event: Event) -> str:
    """data.updated events of one dataset coalesce to the newest; others never do."""
    if isinstance(event.payload, events_pb2.DataUpdated):
        return f"data:{event.payload.dataset}"
    return f"event:{event.id}"


def build(settings: TrainerSettings) -> JobService:
    store = ObjectStore.from_settings(settings)
    provision(settings.kafka_bootstrap, store, buckets=store_buckets("trainer"))
    open_store = functools.partial(ObjectStore.from_settings, settings)  # a distributed training's processes
    trainer = Trainer(settings, store, ModelRegistry(store), source_name("trainer"), open_store)
    return JobService(
        "trainer",
        settings,
        group_id=settings.group_id,
        instance=settings.instance,
        topics=[settings.updated_topic, settings.tuning_topic],
        deadletter_topic=settings.deadletter_topic,
        job=trainer.handle,
        key=coalesce_key,
    )


def main() -> None:
    settings = TrainerSettings()
    configure_logging("trainer", settings.log_level)
    settings.secure_process("trainer")
    build(settings).main()
