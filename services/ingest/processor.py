"""The ingest stream's domain logic: validate, dead-letter, shard, version.

Transport-free: the Kafka loop hands each ``data.raw`` record to
:meth:`IngestProcessor.on_record` and, every flush, publishes what
:meth:`IngestProcessor.flush` returns (dead letters, ``data.updated`` events and
the state snapshot) in one transaction with the input offsets.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from cdl.datasets import DATASETS_BUCKET, DatasetSpec, Shard, Task, decode_shard, shard_parts
from cdl.events import CONTENT_JSON, Event, Headers, InBatch, InRecord, OutRecord, Topics, dead_letter, header_dict
from cdl.logging import get_logger
from cdl.store import ObjectStore
from cdl.v1 import events_pb2
from services.ingest import fastscan
from services.ingest.records import (
    CleanRecord,
    Reason,
    RecordError,
    clean,
    is_protobuf,
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
    """Valid records of one dataset and partition, waiting to become a shard.

    Columns are kept as chunks (one per batch) and joined once, when written.
    """

    first: int = -1
    last: int = -1
    count: int = 0
    ids: list[npt.NDArray[np.str_]] = field(default_factory=list)
    labels: list[npt.NDArray[Any]] = field(default_factory=list)
    splits: list[npt.NDArray[Any]] = field(default_factory=list)
    offsets: list[npt.NDArray[Any]] = field(default_factory=list)
    x: list[npt.NDArray[Any]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def add(self, rec: CleanRecord, offset: int) -> None:
        """One record (the careful path)."""
        x = None if rec.x is None else rec.x.reshape(1, *rec.x.shape)
        self.extend(np.array([rec.id]), np.array([rec.label]), np.array([rec.holdout]), np.array([offset]), x)
        if rec.text is not None:
            self.text.append(rec.text)

    def extend(
        self,
        ids: npt.NDArray[np.str_],
        labels: npt.NDArray[Any],
        splits: npt.NDArray[Any],
        offsets: npt.NDArray[Any],
        x: npt.NDArray[Any] | None,
    ) -> None:
        lo, hi = int(offsets.min()), int(offsets.max())
        self.first = lo if self.first < 0 else min(self.first, lo)
        self.last = max(self.last, hi)
        self.count += len(ids)
        self.ids.append(ids)
        self.labels.append(labels)
        self.splits.append(splits)
        self.offsets.append(offsets)
        if x is not None:
            self.x.append(x)


#: what a batch's scan gives: per dataset (spec, accepted rows, scan), and the undecided rows
_Scanned = tuple[list[tuple[DatasetSpec, npt.NDArray[np.int64], fastscan.Scan]], list[int]]


def _content_type(headers: Headers | None) -> str:
    return header_dict(headers).get("content-type", CONTENT_JSON) if headers else CONTENT_JSON


def _dataset_of(value: bytes) -> str | None:
    """The ``dataset`` field of a JSON record, or None (the careful path will say why)."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    name = doc.get("dataset") if type(doc) is dict else None
    return name if type(name) is str and name else None


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
        shard_max_records: int = 20000,
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
        #: per dataset, every id taken so far (C hash set; see fastscan.IdSet)
        self._seen: dict[str, fastscan.IdSet] = defaultdict(fastscan.IdSet)
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        self._dead: list[OutRecord] = []
        #: shards being written in the background; the next flush waits for them
        self._writes: list[Future[str]] = []
        self._writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ingest-shards")
        #: the batch being scanned in the scan thread: (batch, rows for the careful path, scan)
        self._inflight: tuple[InBatch, list[int], Future[_Scanned] | None] | None = None
        self._scanner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-scan")
        self._sealed = False
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
                self._seen[name].add_all(cols["id"].tolist())
            for shard in ds.unlabelled:
                cols = decode_shard(self._store.get_bytes(DATASETS_BUCKET, shard.key))
                ids = cols["id"].tolist()
                # an id not taken by a labelled shard still waits for its label
                for j in np.flatnonzero(self._seen[name].add_all(ids)).tolist():
                    rid = ids[j]
                    x = cols["x"][j] if "x" in cols else None
                    text = str(cols["text"][j]) if "text" in cols else None
                    rec = CleanRecord(name, rid, -1, bool(cols["split"][j]), x, text)
                    self._waiting[name][rid] = (shard.partition, int(cols["offset"][j]), rec)
        log.info(
            "ingest state recovered",
            datasets={n: {"version": d.version, "shards": len(d.shards)} for n, d in self.state.datasets.items()},
        )

    # ---------------------------------------------------------------- records
    def on_batch(self, batch: InBatch) -> None:
        """Validate a batch of ``data.raw`` records: buffer the good, dead-letter the rest.

        A batch from the feedback topic labels records that arrived unlabelled.
        Plain JSON records of tensor datasets take the C fast path
        (:mod:`services.ingest.fastscan`); whatever it leaves undecided takes
        the careful path, one record at a time, which names the reason.

        Pipelined by one batch: this batch is scanned in a worker thread (the C
        scan runs without the GIL) while the previous one is finished here.
        Batches are finished strictly in order, and :meth:`wants_flush` and
        :meth:`flush` finish whatever is still in flight first.
        """
        if batch.topic == self._feedback_topic:
            self._finish_inflight()  # labels apply to records consumed before them
            for i in range(len(batch)):
                self._feedback(batch.row(i))
            return
        n = len(batch)
        slow: list[int] = []
        if batch.plain:  # as most producers send
            eligible = np.arange(n, dtype=np.int64)
        else:  # JSON records (a value, no protobuf content-type) may be scanned; the rest go the careful way
            nulls = batch.null_values
            json_rows = np.fromiter(
                (
                    not (nulls is not None and nulls[i]) and not is_protobuf(_content_type(batch.header(i)))
                    for i in range(n)
                ),
                dtype=bool,
                count=n,
            )
            eligible, slow = np.flatnonzero(json_rows), np.flatnonzero(~json_rows).tolist()
        scanning = self._scanner.submit(self._scan, batch, eligible) if len(eligible) else None
        self._finish_inflight()
        self._inflight = (batch, slow, scanning)
        if batch.caught_up:  # nothing else to overlap with: finish now (a version may be due)
            self._finish_inflight()

    def _finish_inflight(self) -> None:
        """Buffer the scanned batch in flight, then take its careful path."""
        if self._inflight is None:
            return
        batch, slow, scanning = self._inflight
        self._inflight = None
        if scanning is not None:
            accepted, undecided = scanning.result()
            for spec, rows, sc in accepted:
                self._keep_fast(spec, batch, rows, sc)
            slow = slow + undecided
        for i in sorted(slow):
            self._one(batch.row(i))
        self._seal_full()

    def _seal_full(self) -> None:
        """Write every buffer that holds a shard's worth of records, in the background.

        The stream goes on meanwhile; the shard enters the state now and the
        next flush waits for the write before its transaction commits.
        """
        for key in [k for k, buf in self._buffers.items() if buf.count >= self._shard_max]:
            dataset, partition = key
            n = self._write_shard(dataset, partition, self._buffers.pop(key))
            self._pending[dataset] = self._pending.get(dataset, 0) - n  # now counted in the state
            self._sealed = True

    def _scan(self, batch: InBatch, eligible: npt.NDArray[np.int64]) -> _Scanned:
        """Scan JSON records in C, one dataset at a time (in the scan thread; no state is touched).

        Returns, per dataset, the rows of ``batch`` accepted and their scan; and the rows left undecided.
        """
        joined = fastscan.JsonBatch(batch.data, batch.bounds)  # the batch's own buffer, not a copy
        pending = eligible
        accepted: list[tuple[DatasetSpec, npt.NDArray[np.int64], fastscan.Scan]] = []
        undecided: list[int] = []
        name = _dataset_of(batch.value(int(pending[0])) or b"")
        while len(pending):
            spec = self._registry.lookup(name) if name else None
            if spec is None or spec.task is Task.TEXT:  # the careful path names the reason
                undecided.append(int(pending[0]))
                pending = pending[1:]
                name = _dataset_of(batch.value(int(pending[0])) or b"") if len(pending) else None
                continue
            sc = fastscan.scan(joined, pending, spec)
            if sc is None:  # no C scanner here: everything takes the careful path
                undecided.extend(pending.tolist())
                break
            undecided.extend(pending[sc.status == fastscan.UNDECIDED].tolist())
            if len(sc.id_starts):  # (sc.ids would make a str per record)
                accepted.append((spec, pending[sc.status == fastscan.ACCEPTED], sc))
            others = sc.status == fastscan.OTHER_DATASET
            name = sc.other[int(np.flatnonzero(others)[0])] if others.any() else None
            pending = pending[others]
        return accepted, undecided

    def _keep_fast(self, spec: DatasetSpec, batch: InBatch, rows: npt.NDArray[np.int64], sc: fastscan.Scan) -> None:
        """Buffer records the fast path accepted (``rows`` index ``batch``), but not twice."""
        column, labels, holdout, x = sc.id_column, sc.labels, sc.holdout, sc.x
        # in stream order: the first record with an id is kept, any later one rejected
        fresh = self._seen[spec.name].add_bytes(sc.id_bytes, sc.id_starts, sc.id_lengths)
        if not fresh.all():
            for j in np.flatnonzero(~fresh).tolist():
                rid = sc.id_at(j)
                err = RecordError(Reason.DUPLICATE_ID, "record id already ingested", dataset=spec.name, id=rid)
                self._reject(batch.row(int(rows[j])), err, spec.name)
            rows, column = rows[fresh], column[fresh]
            labels, holdout, x = labels[fresh], holdout[fresh], x[fresh]
        if not len(rows):
            return
        partitions = batch.partitions[rows]
        offsets = batch.offsets[rows]
        first = int(partitions[0])
        if (partitions == first).all():  # one partition: no regrouping
            self._buffers.setdefault((spec.name, first), _Buffer()).extend(column, labels, holdout, offsets, x)
        else:
            for p in np.unique(partitions).tolist():
                sel = np.flatnonzero(partitions == p)
                self._buffers.setdefault((spec.name, p), _Buffer()).extend(
                    column[sel], labels[sel], holdout[sel], offsets[sel], x[sel]
                )
        self._note_pending(spec, len(rows))
        RECORDS.labels(spec.name, "accepted").inc(len(rows))

    def _one(self, incoming: InRecord) -> None:
        """The careful path: one record, with the precise reason when it is rejected."""
        partition, offset, _, value, headers = incoming
        content_type = _content_type(headers)
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
        self._note_pending(spec, 1)
        RECORDS.labels(rec.dataset, "accepted").inc()

    def _feedback(self, incoming: InRecord) -> None:
        """A late label: the waiting record becomes a labelled record at its original offset."""
        _, _, _, value, headers = incoming
        content_type = _content_type(headers)
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
        self._note_pending(spec, 1)
        RECORDS.labels(dataset, "labelled_later").inc()

    def _reject(self, incoming: InRecord, exc: RecordError, dataset: str, origin: str | None = None) -> None:
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
        """Flush now: a version is due (by count or by time) or many dead letters wait.

        A batch whose scan has ended is finished here, so the last batch of a burst
        waits for no further input.
        """
        if self._inflight is not None and (self._inflight[2] is None or self._inflight[2].done()):
            self._finish_inflight()
        if self._version_due or len(self._dead) >= 10000:
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
        self._finish_inflight()
        now = time.time() if now is None else now
        out: list[OutRecord] = list(self._dead)
        self._dead.clear()
        changed = bool(out) or self._sealed
        self._sealed = False
        for (dataset, partition), buf in sorted(self._buffers.items()):
            if buf.count:
                self._write_shard(dataset, partition, buf)
                changed = True
        self._buffers.clear()
        for (dataset, partition), buf in sorted(self._unlabelled.items()):
            if buf.count:
                self._write_shard(dataset, partition, buf, unlabelled=True)
                changed = True
        self._unlabelled.clear()
        self._wait_for_writes()
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

    def _wait_for_writes(self) -> None:
        """Every shard the state names must be in MinIO before the state is committed."""
        writes, self._writes = self._writes, []
        for write in writes:
            write.result()  # a failed write raises: the transaction must not commit

    def close(self) -> None:
        """Finish (or give up on) background scans and shard writes."""
        self._scanner.shutdown(wait=True)
        self._writer.shutdown(wait=True)

    def _write_shard(self, dataset: str, partition: int, buf: _Buffer, unlabelled: bool = False) -> int:
        """Record the shard in the state and write it in the background; returns its record count."""
        spec = self._registry.get(dataset)
        labels = np.concatenate(buf.labels).astype(np.int16)
        splits = np.concatenate(buf.splits).astype(np.uint8)
        columns: dict[str, npt.NDArray[Any] | list[npt.NDArray[Any]]] = {
            "id": np.concatenate(buf.ids),
            "label": labels,
            "split": splits,
            "offset": np.concatenate(buf.offsets).astype(np.int64),
        }
        if spec.task is Task.TEXT:
            columns["text"] = np.array(buf.text)
        else:  # the features' chunks are written one after the other, not joined first
            columns["x"] = [chunk.astype(spec.dtype, copy=False) for chunk in buf.x]
        key = Shard.key_for(dataset, partition, buf.first, buf.last, unlabelled=unlabelled)
        if len(self._writes) >= 4:  # bound the memory held by writes in flight
            self._writes.pop(0).result()
        self._writes.append(self._writer.submit(self._put_shard, key, columns))
        n = buf.count
        holdout = int(splits.sum())
        counts = np.bincount(labels[labels >= 0], minlength=len(spec.labels)).tolist()
        hist = {label: c for label, c in zip(spec.labels, counts, strict=False) if c}
        shard = Shard(key, partition, buf.first, buf.last, n, n - holdout, holdout, hist)
        ds = self.state.dataset(dataset, self._first_seen.get(dataset))
        (ds.unlabelled if unlabelled else ds.shards).append(shard)
        return n

    def _put_shard(self, key: str, columns: dict[str, npt.NDArray[Any] | list[npt.NDArray[Any]]]) -> str:
        return self._store.put_bytes(DATASETS_BUCKET, key, shard_parts(columns))

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
