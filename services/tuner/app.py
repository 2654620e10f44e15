"""Wiring of the tuner service."""

from __future__ import annotations

from cdl.events import Event, source_name
from cdl.logging import configure_logging
from cdl.provision import provision
from cdl.registry import ModelRegistry
from cdl.service import JobService
from cdl.store import ObjectStore
from cdl.store_access import store_buckets
from cdl.v1 import events_pb2
from services.tuner.settings import TunerSettings
from services.tuner.study import sweep_study_folders
from services.tuner.tuner import Tuner

__all__ = ["build", "coalesce_key", "main"]


def coalesce_key(event: Event) -> str:
    """Of a model's pending events of one kind only the newest is judged (a backlog of dataset
    versions, or of verdicts, asks one question); requests and drift alerts are all kept."""
    msg = event.payload
    if isinstance(msg, events_pb2.DataUpdated):
        return f"data:{msg.dataset}"
    if isinstance(msg, events_pb2.ModelTrained):
        return f"trained:{msg.model}"
    return f"event:{event.id}"


def build(settings: TunerSettings) -> JobService:
    store = ObjectStore.from_settings(settings)
    provision(settings.kafka_bootstrap, store, buckets=store_buckets("tuner"))
    sweep_study_folders()  # a tuner killed mid-study (-9) left its split on disk
    tuner = Tuner(settings, store, ModelRegistry(store), source_name("tuner"))
    return JobService(
        "tuner",
        settings,
        group_id=settings.group_id,
        instance=settings.instance,
        topics=[settings.updated_topic, settings.trained_topic, settings.drift_topic, settings.requested_topic],
        deadletter_topic=settings.deadletter_topic,
        job=tuner.handle,
        key=coalesce_key,
    )


def main() -> None:
    settings = TunerSettings()
    configure_logging("tuner", settings.log_level)
    settings.secure_process("tuner")
    build(settings).main()
