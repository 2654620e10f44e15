"""Wiring of the ingest service: clients are built here and passed in."""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any

import grpc

from cdl import tracing
from cdl.auth import ApiKeys, AuthInterceptor, KeysFile
from cdl.errors import ConfigError
from cdl.events import Topics, source_name
from cdl.kafka import Producer, TransactionalLoop, topic_partitions
from cdl.kafka.state import read_state
from cdl.logging import configure_logging, get_logger
from cdl.memory import keep_freed_memory, settle_gc
from cdl.observability import HttpEndpoint, serve_http
from cdl.provision import provision
from cdl.rpc import ErrorInterceptor, add_health, add_port
from cdl.settings import transactional_id
from cdl.store import ObjectStore
from cdl.store_access import store_buckets
from cdl.v1 import ingest_pb2_grpc
from services.ingest.grpc_api import IngestServicer
from services.ingest.partitions import DATASET_KEY_PREFIX, LEGACY_STATE_KEY
from services.ingest.processor import IngestProcessor
from services.ingest.registry import DatasetRegistry
from services.ingest.settings import IngestSettings

__all__ = ["IngestApp", "main"]

log = get_logger(__name__)


class IngestApp:
    def __init__(self, settings: IngestSettings) -> None:
        if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
            raise ConfigError("TLS needs both CDL_INGEST_TLS_CERT_FILE and CDL_INGEST_TLS_KEY_FILE")
        self.settings = settings
        self.source = source_name("ingest")
        tracing.setup("ingest", settings)
        self.store = ObjectStore.from_settings(settings)
        self.registry = DatasetRegistry(
            self.store, unknown_ttl_s=settings.unknown_dataset_ttl_s, max_label_bytes=settings.max_label_bytes
        )
        self.producer = Producer(settings.kafka_bootstrap, client_id="cdl-ingest-grpc")
        self.keys = ApiKeys(settings.key_digests()[0])
        self._keys_stop = threading.Event()
        self.processor = IngestProcessor.from_settings(
            settings, registry=self.registry, store=self.store, source=self.source
        )
        self.loop = TransactionalLoop(
            bootstrap=settings.kafka_bootstrap,
            group_id=settings.group_id,
            topics=[settings.raw_topic, settings.feedback_topic, settings.drift_topic],
            transactional_id=transactional_id(settings.group_id, settings.instance),
            processor=self.processor,
            on_restore=self._restore,
            on_assigned=self._assigned,
            on_released=self.processor.release,
            flush_interval_s=settings.flush_interval_s,
            batch_size=settings.batch_size,
            consumer_config={"fetch.min.bytes": settings.fetch_min_bytes, "fetch.wait.max.ms": settings.fetch_wait_ms},
            policy=settings.failure_policy(),
        )
        self.server: grpc.Server | None = None
        self.http: HttpEndpoint | None = None
        self.grpc_port = 0
        self._ready = threading.Event()

    def _provision(self) -> None:
        s = self.settings
        topics = dict(Topics.PARTITIONS)
        for topic in (s.raw_topic, s.feedback_topic, s.drift_topic, s.deadletter_topic, s.updated_topic):
            topics.setdefault(topic, 3 if topic == s.raw_topic else 1)
        topics[s.state_topic] = 1
        compacted = {s.state_topic: {"cleanup.policy": "compact", "segment.ms": "600000"}}
        provision(s.kafka_bootstrap, self.store, topics, compacted, buckets=store_buckets("ingest"))

    def _restore(self) -> None:
        """Nothing held until the group assigns partitions (:meth:`_assigned`).

        The loop calls this at the start of every session, after fencing any
        older instance with this one's transactional id: at start-up and after
        a failure it recovers from in place.
        """
        self.processor.start_partitioned()

    def _assigned(self, partitions: list[tuple[str, int]]) -> None:
        """The group's assignment: the processor owns the datasets of the data.raw partitions it
        holds, and reads the committed snapshots of those it gained (docs/ingest.md, "Replicas")."""
        s = self.settings
        owned = [p for topic, p in partitions if topic == s.raw_topic]
        count = topic_partitions(s.kafka_bootstrap, s.raw_topic)

        def read() -> dict[bytes, bytes]:
            values = read_state(s.kafka_bootstrap, s.state_topic)
            return {k: v for k, v in values.items() if k == LEGACY_STATE_KEY or k.startswith(DATASET_KEY_PREFIX)}

        self.processor.assign(count, owned, read)

    def start(self) -> None:
        """Start gRPC and the metrics endpoint (the stream, which recovers its state first, runs in ``run``)."""
        self._provision()
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.settings.grpc_workers),
            interceptors=[AuthInterceptor(self.keys), ErrorInterceptor()],
        )
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(
            IngestServicer(self.registry, self.producer, self.source, self.settings.raw_topic), server
        )
        add_health(server, ["cdl.v1.IngestService"])
        s = self.settings
        self.grpc_port = add_port(server, f"{s.grpc_host}:{s.grpc_port}", s.tls_cert_file, s.tls_key_file)
        server.start()
        self.server = server
        if self.settings.api_keys_file:  # rotated by rewriting it, without a restart
            KeysFile(self.settings.api_keys_file, self.keys, admin=False).watch(
                self._keys_stop, self.settings.keys_reload_s
            )
        self.http = serve_http(self.settings.metrics_port, health=self._health, host=self.settings.metrics_host)
        log.info("ingest started", grpc_port=self.grpc_port, metrics_port=self.http.port)

    def _health(self) -> tuple[bool, dict[str, Any]]:
        ready = self._ready.is_set() and self.loop.assigned.is_set()
        return ready, {"transactions": self.loop.transactions, "assigned": self.loop.assigned.is_set()}

    def run(self) -> None:
        self._ready.set()
        try:
            self.loop.run()
        finally:
            self.close()

    def close(self) -> None:
        self._ready.clear()
        if self.server is not None:
            self.server.stop(grace=2).wait()
            self.server = None
        if self.http is not None:
            self.http.close()
            self.http = None
        self.producer.flush(10)
        self.processor.close()


def main() -> None:
    settings = IngestSettings()
    configure_logging("ingest", settings.log_level)
    settings.secure_process("ingest")
    keep_freed_memory()  # batches and shards reuse pages instead of faulting fresh ones in
    app = IngestApp(settings)
    app.loop.install_signal_handlers()
    app.start()
    settle_gc()
    app.run()
