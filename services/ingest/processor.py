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
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from cdl.datasets import DATASETS_BUCKET, DatasetSpec, Shard, Task, decode_shard, encode_shard
from cdl.events import CONTENT_JSON, Event, OutRecord, Topics, dead_letter, header_dict
from cdl.logging import get_logger
from cdl.store import ObjectStore
from cdl.v1 import events_pb2
from services.ingest.records import (
    CleanRecord,
    FastBatch,
    Reason,
    RecordError,
    clean,
    clean_json_batch,
    parse,
    parse_feedback,
)
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
    ids: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    splits: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    x: list[npt.NDArray[Any]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def add(self, rec: CleanRecord, offset: int) -> None:
        if self.first < 0 or offset < self.first:
            self.first = offset
        self.last = max(self.last, offset)
        self.ids.append(rec.id)
        self.labels.append(rec.label)
        self.splits.append(1 if rec.holdout else 0)
        self.offsets.append(offset)
        if rec.text is not None:
            self.text.append(rec.text)
        if rec.x is not None:
            self.x.append(rec.x.reshape(1, *rec.x.shape))

    def extend(
        self, ids: list[str], labels: list[int], splits: list[int], offsets: list[int], x: npt.NDArray[Any]
    ) -> None:
        lo, hi = min(offsets), max(offsets)
        self.first = lo if self.first < 0 else min(self.first, lo)
        self.last = max(self.last, hi)
        self.ids.extend(ids)
        self.labels.extend(labels)
        self.splits.extend(splits)
        self.offsets.extend(offsets)
        self.x.append(x)


Incoming = tuple[int, int, bytes | None, bytes | None, Sequence[tuple[str, bytes]] | None]


class IngestProcessor:
    def __init__(
        self,
        *,
        registry: DatasetRegistry,
        store: ObjectStore,
        source: str,
        state_topic: str,
        raw_topic: str = Topics.DATA_RAW,
        feedback_topic: str = Topics.DATA_FEEDBACK,
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
        self._feedback_topic = feedback_topic
        #: unlabelled records waiting for data.feedback: dataset -> id -> (partition, offset, record)
        self._waiting: dict[str, dict[str, tuple[int, int, CleanRecord]]] = defaultdict(dict)
        self._unlabelled: dict[tuple[str, int], _Buffer] = {}
        self._deadletter_topic = deadletter_topic
        self._updated_topic = updated_topic
        self._shard_max = shard_max_records
        self._group = group
        self.state = IngestState()
        self._seen: dict[str, set[str]] = defaultdict(set)
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        self._dead: list[OutRecord] = []
        self._buffered = 0
        self._pending: dict[str, int] = {}
        self._version_due = False
        self._last_time_check = 0.0
        self._first_seen: dict[str, float] = {}

    # ---------------------------------------------------------------- recovery
    def recover(self, snapshot: bytes | None) -> None:
        """Restore the state of the last committed transaction; rebuild the seen ids."""
        self.state = IngestState.from_json(json.loads(snapshot)) if snapshot else IngestState()
        self._seen.clear()
        self._waiting.clear()
        for name, ds in self.state.datasets.items():
            for shard in ds.shards:
                cols = decode_shard(self._store.get_bytes(DATASETS_BUCKET, shard.key))
                self._seen[name].update(str(i) for i in cols["id"])
            labelled = set(self._seen[name])
            for shard in ds.unlabelled:
                cols = decode_shard(self._store.get_bytes(DATASETS_BUCKET, shard.key))
                for j, rid in enumerate(str(i) for i in cols["id"]):
                    self._seen[name].add(rid)
                    if rid not in labelled:
                        x = cols["x"][j] if "x" in cols else None
                        text = str(cols["text"][j]) if "text" in cols else None
                        rec = CleanRecord(name, rid, -1, bool(cols["split"][j]), x, text)
                        self._waiting[name][rid] = (shard.partition, int(cols["offset"][j]), rec)
        log.info(
            "ingest state recovered",
            datasets={n: {"version": d.version, "shards": len(d.shards)} for n, d in self.state.datasets.items()},
        )

    # ---------------------------------------------------------------- records
    def on_batch(self, batch: Sequence[Incoming], topic: str | None = None) -> None:
        """Validate a batch of ``data.raw`` records: buffer the good, dead-letter the rest.

        A batch from the feedback topic labels records that arrived unlabelled.
        """
        if topic is not None and topic == self._feedback_topic:
            for incoming in batch:
                self._feedback(incoming)
            return
        loads = orjson.loads
        groups: dict[str, list[int]] = defaultdict(list)
        docs: dict[int, dict[str, Any]] = {}
        slow: list[int] = []
        parsed: list[Any] | None = None
        if all(b[4] is None and b[3] is not None for b in batch):  # plain JSON, as most producers send
            try:
                parsed = [loads(b[3] or b"") for b in batch]
            except orjson.JSONDecodeError:
                parsed = None
        if parsed is not None:
            names = [d.get("dataset") if type(d) is dict else None for d in parsed]
            first = names[0] if names else None
            if type(first) is str and names.count(first) == len(names):
                groups[first] = list(range(len(batch)))
                docs = dict(enumerate(parsed))
            else:
                for i, (name, doc) in enumerate(zip(names, parsed, strict=True)):
                    if type(name) is str:
                        groups[name].append(i)
                        docs[i] = doc
                    else:
                        slow.append(i)
        else:
            for i, (_, _, _, value, headers) in enumerate(batch):
                content_type = header_dict(headers).get("content-type", CONTENT_JSON) if headers else CONTENT_JSON
                if value is None or content_type != CONTENT_JSON:
                    slow.append(i)
                    continue
                try:
                    doc = loads(value)
                except orjson.JSONDecodeError:
                    slow.append(i)
                    continue
                name = doc.get("dataset") if type(doc) is dict else None
                if type(name) is not str:
                    slow.append(i)
                    continue
                groups[name].append(i)
                docs[i] = doc
        for name, idxs in groups.items():
            spec = self._registry.lookup(name)
            if spec is None or spec.task is Task.TEXT:
                slow.extend(idxs)
                continue
            fast = clean_json_batch([docs[i] for i in idxs], [batch[i][3] or b"" for i in idxs], spec)
            slow.extend(idxs[j] for j in fast.undecided)
            self._keep_fast(spec, batch, [idxs[j] for j in fast.rows], fast)
        for i in sorted(slow):
            self._one(batch[i])

    def _keep_fast(self, spec: DatasetSpec, batch: Sequence[Incoming], idx: list[int], fast: FastBatch) -> None:
        seen = self._seen[spec.name]
        rows_by_partition: dict[int, list[int]] = defaultdict(list)
        if len(set(fast.ids)) == len(fast.ids) and seen.isdisjoint(fast.ids):  # the usual case: no duplicates
            seen.update(fast.ids)
            for row, i in enumerate(idx):
                rows_by_partition[batch[i][0]].append(row)
        else:
            for row, i in enumerate(idx):
                rid = fast.ids[row]
                if rid in seen:
                    err = RecordError(Reason.DUPLICATE_ID, "record id already ingested", dataset=spec.name, id=rid)
                    self._reject(batch[i], err, spec.name)
                    continue
                seen.add(rid)
                rows_by_partition[batch[i][0]].append(row)
        kept = 0
        for partition, rows in rows_by_partition.items():
            buf = self._buffers.setdefault((spec.name, partition), _Buffer())
            buf.extend(
                [fast.ids[r] for r in rows],
                [fast.labels[r] for r in rows],
                [fast.holdout[r] for r in rows],
                [batch[idx[r]][1] for r in rows],
                fast.x[rows],
            )
            kept += len(rows)
        self._buffered += kept
        if kept:
            self._note_pending(spec, kept)
            RECORDS.labels(spec.name, "accepted").inc(kept)

    def _one(self, incoming: Incoming) -> None:
        """The careful path: one record, with the precise reason when it is rejected."""
        partition, offset, _, value, headers = incoming
        content_type = header_dict(headers).get("content-type", CONTENT_JSON) if headers else CONTENT_JSON
        dataset = "?"
        try:
            raw = parse(value, content_type)
            dataset = raw.dataset
            spec = self._registry.lookup(raw.dataset)
            if spec is None:
                raise RecordError(Reason.UNKNOWN_DATASET, "dataset is not registered", dataset=raw.dataset)
            rec = clean(raw, spec, allow_unlabelled=True)
            if rec.id in self._seen[rec.dataset]:
                raise RecordError(Reason.DUPLICATE_ID, "record id already ingested", dataset=rec.dataset, id=rec.id)
        except RecordError as exc:
            self._reject(incoming, exc, dataset)
            return
        self._seen[rec.dataset].add(rec.id)
        if rec.label < 0:  # waits for its label on data.feedback
            self._waiting[rec.dataset][rec.id] = (partition, offset, rec)
            self._unlabelled.setdefault((rec.dataset, partition), _Buffer()).add(rec, offset)
            RECORDS.labels(rec.dataset, "unlabelled").inc()
            return
        self._buffers.setdefault((rec.dataset, partition), _Buffer()).add(rec, offset)
        self._buffered += 1
        self._note_pending(spec, 1)
        RECORDS.labels(rec.dataset, "accepted").inc()

    def _feedback(self, incoming: Incoming) -> None:
        """A late label: the waiting record becomes a labelled record at its original offset."""
        _, _, _, value, headers = incoming
        content_type = header_dict(headers).get("content-type", CONTENT_JSON) if headers else CONTENT_JSON
        dataset = "?"
        try:
            dataset, rid, label = parse_feedback(value, content_type)
            spec = self._registry.lookup(dataset)
            if spec is None:
                raise RecordError(Reason.UNKNOWN_DATASET, "dataset is not registered", dataset=dataset)
            if label not in spec.labels:
                raise RecordError(Reason.UNKNOWN_LABEL, f"label {label!r} is not one of the dataset's labels")
            waiting = self._waiting[dataset].get(rid)
            if waiting is None:
                reason = Reason.ALREADY_LABELLED if rid in self._seen[dataset] else Reason.UNKNOWN_RECORD
                raise RecordError(reason, "no unlabelled record with this id is waiting", dataset=dataset, id=rid)
        except RecordError as exc:
            self._reject(incoming, exc, dataset, origin=self._feedback_topic)
            return
        partition, offset, rec = waiting
        del self._waiting[dataset][rid]
        labelled = CleanRecord(rec.dataset, rec.id, spec.label_index(label), rec.holdout, rec.x, rec.text)
        self._buffers.setdefault((dataset, partition), _Buffer()).add(labelled, offset)
        self._buffered += 1
        self._note_pending(spec, 1)
        RECORDS.labels(dataset, "labelled_later").inc()

    def _reject(self, incoming: Incoming, exc: RecordError, dataset: str, origin: str | None = None) -> None:
        partition, offset, key, value, headers = incoming
        self._dead.append(
            dead_letter(
                self._deadletter_topic,
                value,
                key,
                headers,
                reason=str(exc),
                error=exc.reason.value,
                origin_topic=origin or self._raw_topic,
                partition=partition,
                offset=offset,
                group=self._group,
            )
        )
        REJECTED.labels(exc.reason.value).inc()
        RECORDS.labels(dataset, "rejected").inc()

    def wants_flush(self) -> bool:
        """Flush now: a version is due (by count or by time) or the buffers are full."""
        if self._version_due or self._buffered >= self._shard_max or len(self._dead) >= 10000:
            return True
        now = time.monotonic()
        if now - self._last_time_check < 0.5:
            return False
        self._last_time_check = now
        wall = time.time()
        for name in set(self._pending) | {n for n, d in self.state.datasets.items() if d.pending}:
            spec = self._registry.lookup(name)
            ds = self.state.datasets.get(name)
            last = ds.last_version_at if ds is not None else self._first_seen.get(name, wall)
            if spec is not None and spec.max_interval_s > 0 and wall - last >= spec.max_interval_s:
                return True
        return False

    def _note_pending(self, spec: DatasetSpec, n: int) -> None:
        """Flush as soon as a count policy is reached (freshness), not at the next interval."""
        self._pending[spec.name] = self._pending.get(spec.name, 0) + n
        self._first_seen.setdefault(spec.name, time.time())
        ds = self.state.datasets.get(spec.name)
        committed = ds.new_records if ds is not None else 0
        if spec.min_new_records > 0 and committed + self._pending[spec.name] >= spec.min_new_records:
            self._version_due = True

    # ---------------------------------------------------------------- flush
    def flush(self, now: float | None = None) -> list[OutRecord]:
        """Write buffered shards, commit due versions; return what the transaction must publish."""
        now = time.time() if now is None else now
        out: list[OutRecord] = list(self._dead)
        self._dead.clear()
        changed = bool(out)
        for (dataset, partition), buf in sorted(self._buffers.items()):
            if buf.ids:
                self._write_shard(dataset, partition, buf)
                changed = True
        self._buffers.clear()
        for (dataset, partition), buf in sorted(self._unlabelled.items()):
            if buf.ids:
                self._write_shard(dataset, partition, buf, unlabelled=True)
                changed = True
        self._unlabelled.clear()
        self._buffered = 0
        self._pending.clear()
        self._version_due = False
        for name, ds in sorted(self.state.datasets.items()):
            spec = self._registry.lookup(name)
            if spec is not None and policy_due(spec, ds, now):
                out.append(self._commit_version(name, now))
                changed = True
            PENDING.labels(name).set(ds.new_records)
        if changed:
            out.append(OutRecord(self._state_topic, json.dumps(self.state.to_json()).encode(), STATE_KEY))
        return out

    def _write_shard(self, dataset: str, partition: int, buf: _Buffer, unlabelled: bool = False) -> None:
        spec = self._registry.get(dataset)
        columns: dict[str, npt.NDArray[Any]] = {
            "id": np.array(buf.ids),
            "label": np.array(buf.labels, dtype=np.int16),
            "split": np.array(buf.splits, dtype=np.uint8),
            "offset": np.array(buf.offsets, dtype=np.int64),
        }
        if spec.task is Task.TEXT:
            columns["text"] = np.array(buf.text)
        else:
            columns["x"] = np.concatenate(buf.x).astype(spec.dtype, copy=False)
        key = Shard.key_for(dataset, partition, buf.first, buf.last, unlabelled=unlabelled)
        self._store.put_bytes(DATASETS_BUCKET, key, encode_shard(columns))
        n = len(buf.ids)
        holdout = int(columns["split"].sum())
        hist = Counter(spec.labels[i] for i in buf.labels if i >= 0)
        shard = Shard(key, partition, buf.first, buf.last, n, n - holdout, holdout, dict(hist))
        ds = self.state.dataset(dataset, self._first_seen.get(dataset))
        (ds.unlabelled if unlabelled else ds.shards).append(shard)

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
