"""The ingest stream's domain logic: validate, dead-letter, shard, version.

Transport-free: the Kafka loop hands each ``data.raw`` record to
:meth:`IngestProcessor.on_record` and, every flush, publishes what
:meth:`IngestProcessor.flush` returns (dead letters, ``data.updated`` events and
the state snapshot) in one transaction with the input offsets.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from cdl.datasets import DATASETS_BUCKET, Shard, Task, decode_shard, encode_shard
from cdl.events import Event, OutRecord, Topics, dead_letter, header_dict
from cdl.logging import get_logger
from cdl.store import ObjectStore
from cdl.v1 import events_pb2
from services.ingest.records import CleanRecord, Reason, RecordError, clean, parse
from services.ingest.registry import DatasetRegistry
from services.ingest.versioning import IngestState, build_manifest, policy_due

__all__ = ["STATE_KEY", "IngestProcessor"]

log = get_logger(__name__)

STATE_KEY = b"ingest-state"

RECORDS = PromCounter("cdl_ingest_records_total", "Records seen by ingest", ["dataset", "outcome"])
REJECTED = PromCounter("cdl_ingest_rejected_total", "Records dead-lettered by ingest, by reason", ["reason"])
VERSIONS = PromCounter("cdl_ingest_versions_total", "Dataset versions committed", ["dataset"])
PENDING = Gauge("cdl_ingest_pending_records", "Valid records not yet in a version", ["dataset"])


@dataclass
class _Buffer:
    first: int = -1
    last: int = -1
    records: list[CleanRecord] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)


class IngestProcessor:
    def __init__(
        self,
        *,
        registry: DatasetRegistry,
        store: ObjectStore,
        source: str,
        state_topic: str,
        raw_topic: str = Topics.DATA_RAW,
        deadletter_topic: str = Topics.DATA_DEADLETTER,
        updated_topic: str = Topics.DATA_UPDATED,
        shard_max_records: int = 5000,
        group: str = "cdl-ingest",
    ) -> None:
        self._registry = registry
        self._store = store
        self._source = source
        self._state_topic = state_topic
        self._raw_topic = raw_topic
        self._deadletter_topic = deadletter_topic
        self._updated_topic = updated_topic
        self._shard_max = shard_max_records
        self._group = group
        self.state = IngestState()
        self._seen: dict[str, set[str]] = defaultdict(set)
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        self._dead: list[OutRecord] = []
        self._buffered = 0
        self._dirty = False

    # ---------------------------------------------------------------- recovery
    def recover(self, snapshot: bytes | None) -> None:
        """Restore the state of the last committed transaction; rebuild the seen ids."""
        self.state = IngestState.from_json(json.loads(snapshot)) if snapshot else IngestState()
        self._seen.clear()
        for name, ds in self.state.datasets.items():
            for shard in ds.shards:
                cols = decode_shard(self._store.get_bytes(DATASETS_BUCKET, shard.key))
                self._seen[name].update(str(i) for i in cols["id"])
        log.info(
            "ingest state recovered",
            datasets={n: {"version": d.version, "shards": len(d.shards)} for n, d in self.state.datasets.items()},
        )

    # ---------------------------------------------------------------- records
    def on_record(
        self, partition: int, offset: int, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        content_type = header_dict(headers).get("content-type", "application/json")
        dataset = "?"
        try:
            raw = parse(value, content_type)
            dataset = raw.dataset
            spec = self._registry.lookup(raw.dataset)
            if spec is None:
                raise RecordError(Reason.UNKNOWN_DATASET, "dataset is not registered", dataset=raw.dataset)
            rec = clean(raw, spec)
            if rec.id in self._seen[rec.dataset]:
                raise RecordError(Reason.DUPLICATE_ID, "record id already ingested", dataset=rec.dataset, id=rec.id)
        except RecordError as exc:
            self._dead.append(
                dead_letter(
                    self._deadletter_topic,
                    value,
                    key,
                    headers,
                    reason=str(exc),
                    error=exc.reason.value,
                    origin_topic=self._raw_topic,
                    partition=partition,
                    offset=offset,
                    group=self._group,
                )
            )
            REJECTED.labels(exc.reason.value).inc()
            RECORDS.labels(dataset, "rejected").inc()
            return
        self._seen[rec.dataset].add(rec.id)
        buf = self._buffers.setdefault((rec.dataset, partition), _Buffer())
        if buf.first < 0:
            buf.first = offset
        buf.last = offset
        buf.records.append(rec)
        buf.offsets.append(offset)
        self._buffered += 1
        RECORDS.labels(rec.dataset, "accepted").inc()

    def wants_flush(self) -> bool:
        return self._buffered >= self._shard_max or len(self._dead) >= 10000

    # ---------------------------------------------------------------- flush
    def flush(self, now: float | None = None) -> list[OutRecord]:
        """Write buffered shards, commit due versions; return what the transaction must publish."""
        now = time.time() if now is None else now
        out: list[OutRecord] = list(self._dead)
        self._dead.clear()
        changed = bool(out)
        for (dataset, partition), buf in sorted(self._buffers.items()):
            if buf.records:
                self._write_shard(dataset, partition, buf)
                changed = True
        self._buffers.clear()
        self._buffered = 0
        for name, ds in sorted(self.state.datasets.items()):
            spec = self._registry.lookup(name)
            if spec is not None and policy_due(spec, ds, now):
                out.append(self._commit_version(name, now))
                changed = True
            PENDING.labels(name).set(ds.new_records)
        if changed or self._dirty:
            out.append(OutRecord(self._state_topic, json.dumps(self.state.to_json()).encode(), STATE_KEY))
            self._dirty = False
        return out

    def _write_shard(self, dataset: str, partition: int, buf: _Buffer) -> None:
        spec = self._registry.get(dataset)
        recs = buf.records
        columns = {
            "id": np.array([r.id for r in recs]),
            "label": np.array([r.label for r in recs], dtype=np.int16),
            "split": np.array([1 if r.holdout else 0 for r in recs], dtype=np.uint8),
            "offset": np.array(buf.offsets, dtype=np.int64),
        }
        if spec.task is Task.TEXT:
            columns["text"] = np.array([r.text or "" for r in recs])
        else:
            columns["x"] = np.stack([r.x for r in recs if r.x is not None]).astype(spec.dtype)
        key = Shard.key_for(dataset, partition, buf.first, buf.last)
        self._store.put_bytes(DATASETS_BUCKET, key, encode_shard(columns))
        holdout = int(columns["split"].sum())
        hist = Counter(spec.labels[r.label] for r in recs)
        shard = Shard(key, partition, buf.first, buf.last, len(recs), len(recs) - holdout, holdout, dict(hist))
        self.state.dataset(dataset).shards.append(shard)

    def _commit_version(self, name: str, now: float) -> OutRecord:
        spec = self._registry.get(name)
        ds = self.state.datasets[name]
        version = ds.version + 1
        manifest = build_manifest(spec, ds, version, now, self._raw_topic)
        uri = self._store.put_json(DATASETS_BUCKET, f"{name}/versions/{version}.json", manifest)
        msg = events_pb2.DataUpdated(
            dataset=name,
            version=version,
            manifest_uri=uri,
            total_records=manifest["total_records"],
            new_records=manifest["new_records"],
            train_records=manifest["train_records"],
            holdout_records=manifest["holdout_records"],
            schema_hash=manifest["schema_hash"],
        )
        for r in manifest["offset_ranges"]:
            msg.offset_ranges.add(topic=r["topic"], partition=r["partition"], first=r["first"], last=r["last"])
        for label, n in manifest["label_histogram"].items():
            msg.label_histogram[label] = n
        msg.created_at.FromSeconds(int(now))
        ds.version = version
        ds.versioned_shards = len(ds.shards)
        ds.last_version_at = now
        VERSIONS.labels(name).inc()
        log.info(
            "dataset version committed", dataset=name, version=version, total=msg.total_records, new=msg.new_records
        )
        # the event id is the natural key: one data.updated per dataset version
        event = Event(msg, source=self._source, id=f"{name}/v{version}", key=name)
        return OutRecord.of(self._updated_topic, event)
