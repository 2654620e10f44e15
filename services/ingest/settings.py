"""Settings of the ingest service (env prefix ``CDL_INGEST_``)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from cdl.settings import ServiceSettings

__all__ = ["IngestSettings"]


class IngestSettings(ServiceSettings):
    """Ingest: the data.raw stream processor and the IngestService gRPC API."""

    model_config = SettingsConfigDict(env_prefix="CDL_INGEST_", extra="ignore", use_attribute_docstrings=True)

    grpc_host: str = "127.0.0.1"
    """Address the gRPC server binds to."""
    grpc_port: int = 0
    """IngestService port; 0 picks a free one."""
    group_id: str = "cdl-ingest"
    """Consumer group over data.raw."""
    instance: str = "0"
    """Instance name; the transactional id is ``<group_id>-<instance>``."""
    raw_topic: str = "data.raw"
    """Topic records arrive on."""
    feedback_topic: str = "data.feedback"
    """Topic late labels arrive on (dataset, record_id, label)."""
    deadletter_topic: str = "data.deadletter"
    """Topic rejected records go to."""
    updated_topic: str = "data.updated"
    """Topic dataset versions are announced on."""
    state_topic: str = "cdl.ingest.state"
    """Compacted topic holding the ingest state snapshot."""
    flush_interval_s: float = 10.0
    """Longest time valid records and dead letters wait in memory before a flush (a version
    that falls due by count or time flushes at once)."""
    shard_max_records: int = 20000
    """Records per shard: a partition's buffer holding this many is written to MinIO in the
    background while the stream goes on; the next flush waits for it before committing."""
    batch_size: int = 10000
    """Most records fetched from Kafka per consume call (fewer when the stream is slower:
    a call waits 50 ms at most). Larger batches cost less per record; a version due by
    count may hold up to about two batches more than its policy asks."""
    fetch_min_bytes: int = 1 << 20
    """The broker answers a fetch once it has this many bytes (or after ``fetch_wait_ms``): fewer,
    larger fetches cost the broker and the consumer less CPU while records trickle in."""
    fetch_wait_ms: int = 100
    """Longest time the broker holds a fetch waiting for ``fetch_min_bytes``."""
    grpc_workers: int = 8
    """Threads serving gRPC requests."""
