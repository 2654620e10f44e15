"""Wiring of the compressor service."""

from __future__ import annotations

from cdl.events import source_name
from cdl.logging import configure_logging, get_logger
from cdl.provision import provision
from cdl.registry import ModelRegistry
from cdl.service import JobService
from cdl.signing import Signer
from cdl.store import ObjectStore
from cdl.store_access import store_buckets
from services.compressor.compressor import Compressor
from services.compressor.settings import CompressorSettings

__all__ = ["build", "main"]

log = get_logger("cdl.compressor")


def build(settings: CompressorSettings) -> JobService:
    store = ObjectStore.from_settings(settings)
    provision(settings.kafka_bootstrap, store, buckets=store_buckets("compressor"))
    signer = Signer.from_file(settings.signing_key_file) if settings.signing_key_file else None
    if signer is None:
        log.warning("Triton entries are not signed: a gateway with trusted keys refuses them (signing_key_file)")
    compressor = Compressor(settings, store, ModelRegistry(store), source_name("compressor"), signer)
    return JobService(
        "compressor",
        settings,
        group_id=settings.group_id,
        instance=settings.instance,
        topics=[settings.trained_topic],
        deadletter_topic=settings.deadletter_topic,
        job=compressor.handle,
    )


def main() -> None:
    settings = CompressorSettings()
    configure_logging("compressor", settings.log_level)
    settings.secure_process("compressor")
    build(settings).main()
