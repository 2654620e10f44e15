"""Settings of the ingest service (env prefix ``CDL_INGEST_``)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from cdl.events import Topics
from cdl.settings import ServiceSettings, plaintext_endpoint
from services.ingest.claims import DEFAULT_BUCKETS, DEFAULT_MAX_BYTES

__all__ = ["IngestSettings"]


class IngestSettings(ServiceSettings):
    """Ingest: the data.raw stream processor and the IngestService gRPC API."""

    model_config = SettingsConfigDict(env_prefix="CDL_INGEST_", extra="ignore", use_attribute_docstrings=True)

    grpc_host: str = "127.0.0.1"
    """Address the gRPC server binds to."""
    grpc_port: int = 0
    """IngestService port; 0 picks a free one."""
    tls_cert_file: str = ""
    """PEM certificate chain for TLS on the gRPC port; empty: plaintext."""
    tls_key_file: str = ""
    """PEM private key for TLS."""
    group_id: str = "cdl-ingest"
    """Consumer group over data.raw."""
    instance: str = ""
    """Instance name, unique among the group's live instances; the transactional id is
    ``<group_id>-<instance>``. Empty: the host's name (a pod's name; keep it stable across
    restarts, as a StatefulSet's is)."""
    raw_topic: str = Topics.DATA_RAW
    """Topic records arrive on."""
    feedback_topic: str = Topics.DATA_FEEDBACK
    """Topic late labels arrive on (dataset, record_id, label); labels of served requests
    (request_id, no record_id) are the monitor's: ingest counts and skips them."""
    drift_topic: str = Topics.DRIFT_DETECTED
    """The monitor's drift alerts: the alerted dataset cuts its next version as soon as it has
    any new labelled record (overriding its count policy)."""
    deadletter_topic: str = Topics.DATA_DEADLETTER
    """Topic rejected records go to."""
    updated_topic: str = Topics.DATA_UPDATED
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
    max_record_bytes: int = 1 << 20
    """Largest record value (bytes) ingest takes; a larger one is dead-lettered
    (``record_too_large``) without being parsed. A dataset may set a lower limit."""
    max_id_bytes: int = 256
    """Longest record id (UTF-8 bytes); a longer one is dead-lettered (``id_too_long``).
    A dataset may set a lower limit."""
    max_text_chars: int = 1 << 16
    """Longest text (characters, before cleaning) of a text record; a longer one is
    dead-lettered (``text_too_long``). A dataset may set a lower limit."""
    max_label_bytes: int = 256
    """Longest label (UTF-8 bytes) of a record or a late label (``label_too_long``)."""
    claim_buckets: list[str] = list(DEFAULT_BUCKETS)
    """Buckets a record's ``features_uri`` (a claim check for a tensor too large for a Kafka
    message) may name; any other is dead-lettered (``claim_refused``)."""
    claim_max_bytes: int = DEFAULT_MAX_BYTES
    """Largest claim-checked object ingest reads (``record_too_large`` above it)."""
    deadletter_max_value_bytes: int = 900_000
    """A dead letter keeps at most this many bytes of the rejected value (its reason says
    when it was cut): below librdkafka's default ``message.max.bytes`` (1,000,000), so a
    dead letter of any record can be produced."""
    deadletter_flush_bytes: int = 64 << 20
    """Flush once the dead letters waiting in memory hold this many bytes (or 10,000 wait)."""
    unknown_dataset_ttl_s: float = 30.0
    """How long a dataset name found unregistered is answered as unknown from memory (no
    object-store read per record of a flood for unknown datasets); registering it ends that."""
    compact_min_shards: int = 8
    """Merge a partition's small shards of the latest version once it has this many
    (0: never); later versions name the merged shard instead. The same for its shards not
    in a version yet and its unlabelled shards, which the state snapshot lists."""
    compact_target_records: int = 0
    """Records a merged shard holds at most; 0 = ``shard_max_records``."""
    compact_target_bytes: int = 64 << 20
    """Bytes a merged shard's columns take in memory at most."""
    gc_grace_s: float = 3600.0
    """Age an object under a dataset's shards/ or unlabelled/ that no manifest and no
    committed state names must have before the sweep removes it."""
    gc_interval_s: float = 600.0
    """Time between two sweeps for such objects (0: never sweep)."""
    state_max_bytes: int = 512 << 10
    """Largest state snapshot (it travels in every flush's transaction, as one Kafka record):
    one over it has its pending and unlabelled shards merged at once, and a flush whose
    snapshot is still over it fails (logged, ``cdl_ingest_state_over_limit_total``) rather
    than being refused by Kafka. Keep it well below the state topic's ``max.message.bytes``."""

    def security_problems(self) -> list[str]:
        problems = super().security_problems()
        if not self.key_digests()[0]:
            problems.append("the IngestService API is open: no API key is needed (api_key_hashes)")
        return problems + plaintext_endpoint(self.grpc_host, self.tls_cert_file, "the IngestService API")
