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
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from cdl import tracing
from cdl.datasets import DATASETS_BUCKET, DatasetSpec, Shard, Task, decode_shard, shard_parts
from cdl.errors import CdlError, DecodeError, InvalidInputError
from cdl.events import (
    CONTENT_JSON,
    Event,
    Headers,
    InBatch,
    InRecord,
    OutRecord,
    Topics,
    dead_letter,
    decode,
    header_dict,
    new_traceparent,
)
from cdl.feedback import is_served_record_id, parse_feedback
from cdl.logging import get_logger
from cdl.memory import release_memory, resident_bytes
from cdl.store import ObjectStore
from cdl.v1 import events_pb2
from services.ingest import fastscan
from services.ingest.claims import DEFAULT_BUCKETS, DEFAULT_MAX_BYTES, Claims
from services.ingest.compaction import WHERE, CompactionPolicy, ManifestRefs, Merged, merge, plan, sweep
from services.ingest.records import (
    CleanRecord,
    Limits,
    Reason,
    RecordError,
    clean,
    is_protobuf,
    label_value,
    parse,
)
from services.ingest.registry import DatasetRegistry
from services.ingest.settings import IngestSettings
from services.ingest.versioning import IngestState, build_manifest, manifest_key, policy_due

__all__ = ["STATE_KEY", "IngestProcessor", "StateTooLargeError"]

log = get_logger(__name__)

STATE_KEY = b"ingest-state"
#: seconds between two hand-backs of the heap's free memory to the kernel (cdl.service.release_memory)
TRIM_INTERVAL_S = 60.0
#: ... or sooner (but not within TRIM_MIN_S of the last), at a flush, once resident memory is this
#: much above what it was after the last one
TRIM_GROWTH_BYTES = 8 << 20
TRIM_MIN_S = 5.0

RECORDS = PromCounter("cdl_ingest_records_total", "Records seen by ingest", ["dataset", "outcome"])
REJECTED = PromCounter("cdl_ingest_rejected_total", "Records dead-lettered by ingest, by reason", ["reason"])
VERSIONS = PromCounter("cdl_ingest_versions_total", "Dataset versions committed", ["dataset"])
FEEDBACK_SKIPPED = PromCounter(
    "cdl_ingest_feedback_skipped_total",
    "data.feedback records for served requests (request_id, no record_id): the monitor's, not ingest's",
)
DRIFT_ALERTS = PromCounter(
    "cdl_ingest_drift_alerts_total", "drift.detected alerts that make a dataset cut its next version early", ["dataset"]
)
PENDING = Gauge("cdl_ingest_pending_records", "Valid records not yet in a version", ["dataset"])
MERGED = PromCounter("cdl_ingest_shards_merged_total", "Small shards merged into larger ones", ["dataset"])
SWEPT = PromCounter("cdl_ingest_objects_swept_total", "Unreferenced shard objects removed", ["dataset"])
STATE_BYTES = Gauge("cdl_ingest_state_bytes", "Size of the latest ingest state snapshot")
STATE_OVER = PromCounter(
    "cdl_ingest_state_over_limit_total",
    "Snapshots over state_max_bytes, by outcome (merged: back under it by merging shards; failed: still over)",
    ["outcome"],
)
#: what a dead letter keeps of a rejected record's key, and of its reason
_DEAD_KEY_BYTES = 1 << 12
_DEAD_REASON_CHARS = 1000
#: headers are kept on a dead letter up to this many bytes in all
_DEAD_HEADER_BYTES = 1 << 16


class StateTooLargeError(CdlError):
    """The state snapshot stays over ``state_max_bytes`` even with its shards merged: the
    flush cannot be committed (Kafka would refuse the record). Raised, logged and counted
    (``cdl_ingest_state_over_limit_total{outcome="failed"}``) at every flush until fixed."""


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
    text_width: int = 0  # the longest text: the shard's text column is padded to it

    def add(self, rec: CleanRecord, offset: int) -> None:
        """One record (the careful path)."""
        x = None if rec.x is None else rec.x.reshape(1, *rec.x.shape)
        self.extend(np.array([rec.id]), np.array([rec.label]), np.array([rec.holdout]), np.array([offset]), x)
        if rec.text is not None:
            self.text.append(rec.text)
            self.text_width = max(self.text_width, len(rec.text))

    def takes(self, text: str | None, text_bytes: int) -> bool:
        """Whether one more record (with ``text``) keeps the text column, padded to its
        longest text as a shard's ``<U`` column is (4 bytes a character), within
        ``text_bytes``. An empty buffer takes any record: one text is bounded by the limits."""
        if text is None or not self.count:
            return True
        return (self.count + 1) * max(self.text_width, len(text)) * 4 <= text_bytes

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


@dataclass(slots=True)
class _ShardRef:
    """Which unlabelled shard holds some waiting records (shared by them: a merge re-points
    every record of its inputs by changing the few refs, not the records)."""

    key: str


@dataclass(slots=True)
class _Waiting:
    """An unlabelled record waiting for its label, and the unlabelled shard holding it
    (None until its buffer is written)."""

    partition: int
    offset: int
    rec: CleanRecord
    shard: _ShardRef | None = None


#: what a batch's scan gives: per dataset (spec, accepted rows, scan), and the undecided rows
_Scanned = tuple[list[tuple[DatasetSpec, npt.NDArray[np.int64], fastscan.Scan]], list[int]]


def _keys(shards: list[Shard]) -> tuple[str, ...]:
    return tuple(s.key for s in shards)


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
    """Validates ``data.raw`` records, buffers the good ones as shards, commits versions.

    Everything it holds between two flushes is either committed already or
    rebuilt from the committed state (:meth:`restore`) when a transaction fails.
    """

    def __init__(
        self,
        *,
        registry: DatasetRegistry,
        store: ObjectStore,
        source: str,
        state_topic: str,
        raw_topic: str = Topics.DATA_RAW,
        feedback_topic: str = Topics.DATA_FEEDBACK,
        drift_topic: str = Topics.DRIFT_DETECTED,
        deadletter_topic: str = Topics.DATA_DEADLETTER,
        updated_topic: str = Topics.DATA_UPDATED,
        shard_max_records: int = 20000,
        group: str = "cdl-ingest",
        limits: Limits | None = None,
        deadletter_max_value_bytes: int = 900_000,
        deadletter_flush_bytes: int = 64 << 20,
        compaction: CompactionPolicy | None = None,
        shard_text_bytes: int = 64 << 20,
        state_max_bytes: int = 512 << 10,
        claims: Claims | None = None,
    ) -> None:
        self._registry = registry
        self._store = store
        self._source = source
        self._state_topic = state_topic
        self._raw_topic = raw_topic
        self._feedback_topic = feedback_topic
        self._drift_topic = drift_topic
        self._deadletter_topic = deadletter_topic
        self._updated_topic = updated_topic
        self._shard_max = shard_max_records
        self._group = group
        self._limits = limits or Limits()
        self._claims = claims or Claims(store, DEFAULT_BUCKETS, DEFAULT_MAX_BYTES)
        self._dead_value_max = deadletter_max_value_bytes
        self._dead_flush_bytes = deadletter_flush_bytes
        self._compaction = compaction or CompactionPolicy(target_records=shard_max_records)
        #: a text shard's text column (padded to its longest text) takes at most this many bytes
        self._text_bytes = shard_text_bytes
        #: a snapshot over this is brought back under it by merging shards, or the flush fails
        self._state_max_bytes = state_max_bytes
        self._writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ingest-shards")
        self._scanner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-scan")
        #: compaction and the sweep, one job at a time (see services/ingest/compaction.py)
        self._housekeeper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-housekeeping")
        self._manifest_refs = ManifestRefs()
        self.state = IngestState()
        self._reset()

    def _reset(self) -> None:
        """Hold nothing but an empty state: what a freshly constructed processor holds."""
        self.state = IngestState()
        #: unlabelled records waiting for data.feedback: dataset -> id -> where it is
        self._waiting: dict[str, dict[str, _Waiting]] = defaultdict(dict)
        #: per unlabelled shard, how many of its records still wait (a shard without any is dropped)
        self._waiting_in: Counter[str] = Counter()
        #: per unlabelled shard, the refs its waiting records hold (see _ShardRef)
        self._refs: dict[str, list[_ShardRef]] = {}
        self._unlabelled: dict[tuple[str, int], _Buffer] = {}
        #: per dataset, every id taken so far (C hash set; see fastscan.IdSet)
        self._seen: dict[str, fastscan.IdSet] = defaultdict(fastscan.IdSet)
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        self._dead: list[OutRecord] = []
        self._dead_bytes = 0
        #: shards being written in the background; the next flush waits for them
        self._writes: list[Future[str]] = []
        #: the batch being scanned in the scan thread: (batch, rows for the careful path, scan)
        self._inflight: tuple[InBatch, list[int], Future[_Scanned] | None] | None = None
        #: the state changed since the last flush (a shard sealed, shards merged)
        self._sealed = False
        self._pending: dict[str, int] = {}
        self._version_due = False
        self._last_time_check = 0.0
        self._first_seen: dict[str, float] = {}
        self._trimmed_at = time.monotonic()
        self._trimmed_rss = resident_bytes() or 0
        #: the housekeeping job in flight, and merged shards waiting for the dataset's next version
        self._housekeeping: Future[tuple[list[Merged], list[tuple[str, ...]]]] | None = None
        self._merges: dict[str, list[Merged]] = defaultdict(list)
        #: groups of shards (their keys) a job could not merge: not tried again
        self._unmergeable: set[tuple[str, ...]] = set()
        self._next_sweep = time.monotonic() + self._compaction.sweep_interval_s

    @classmethod
    def from_settings(
        cls, settings: IngestSettings, *, registry: DatasetRegistry, store: ObjectStore, source: str
    ) -> IngestProcessor:
        """A processor configured by the service's settings."""
        return cls(
            registry=registry,
            store=store,
            source=source,
            state_topic=settings.state_topic,
            raw_topic=settings.raw_topic,
            feedback_topic=settings.feedback_topic,
            drift_topic=settings.drift_topic,
            deadletter_topic=settings.deadletter_topic,
            updated_topic=settings.updated_topic,
            shard_max_records=settings.shard_max_records,
            group=settings.group_id,
            limits=Limits(
                record_bytes=settings.max_record_bytes,
                id_bytes=settings.max_id_bytes,
                text_chars=settings.max_text_chars,
                label_bytes=settings.max_label_bytes,
            ),
            deadletter_max_value_bytes=settings.deadletter_max_value_bytes,
            deadletter_flush_bytes=settings.deadletter_flush_bytes,
            state_max_bytes=settings.state_max_bytes,
            claims=Claims(store, settings.claim_buckets, settings.claim_max_bytes),
            compaction=CompactionPolicy(
                min_shards=settings.compact_min_shards,
                target_records=settings.compact_target_records or settings.shard_max_records,
                target_bytes=settings.compact_target_bytes,
                grace_s=settings.gc_grace_s,
                sweep_interval_s=settings.gc_interval_s,
            ),
        )

    # ---------------------------------------------------------------- recovery
    def recover(self, snapshot: bytes | None) -> None:
        """Restore the state of the last committed transaction; rebuild the seen ids.

        The latest version's shards are read from its manifest (a snapshot names
        it), every committed shard's ids go into the seen-id sets, and the records
        of the unlabelled shards that no labelled shard took wait for their labels.
        """
        doc = json.loads(snapshot) if snapshot else None
        self.state = IngestState.from_json(doc, self._read_manifest) if doc else IngestState()
        self._seen.clear()
        self._waiting.clear()
        self._waiting_in.clear()
        self._refs.clear()
        for name, ds in self.state.datasets.items():
            for shard in ds.shards:
                cols = decode_shard(self._store.get_bytes(DATASETS_BUCKET, shard.key))
                self._seen[name].add_all(cols["id"].tolist())
            for shard in ds.unlabelled:
                cols = decode_shard(self._store.get_bytes(DATASETS_BUCKET, shard.key))
                ids = cols["id"].tolist()
                ref = _ShardRef(shard.key)
                self._refs[shard.key] = [ref]
                # an id not taken by a labelled shard still waits for its label
                for j in np.flatnonzero(self._seen[name].add_all(ids)).tolist():
                    rid = ids[j]
                    x = cols["x"][j] if "x" in cols else None
                    text = str(cols["text"][j]) if "text" in cols else None
                    rec = CleanRecord(name, rid, -1, bool(cols["split"][j]), x, text)
                    self._waiting[name][rid] = _Waiting(shard.partition, int(cols["offset"][j]), rec, ref)
                    self._waiting_in[shard.key] += 1
        log.info(
            "ingest state recovered",
            datasets={
                n: {"version": d.version, "shards": len(d.versioned), "pending": len(d.pending)}
                for n, d in self.state.datasets.items()
            },
        )

    def _read_manifest(self, key: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._store.get_json(DATASETS_BUCKET, key)
        return doc

    def restore(self, snapshot: bytes | None) -> None:
        """Drop everything not committed, then recover from ``snapshot`` as :meth:`recover` does.

        For the loop after a transaction that failed or was aborted, with the
        latest committed snapshot: the batch in the scan thread is waited for
        and discarded, so are the shard writes in flight (their results and
        errors ignored) and the housekeeping job (its merged shards are never
        used; the sweep removes them later); buffers, waiting dead letters,
        counters and merged shards not yet in a version are dropped. Afterwards
        the processor behaves exactly as a new one given ``recover(snapshot)``.
        """
        pending: list[Future[Any]] = list(self._writes)
        if self._inflight is not None and self._inflight[2] is not None:
            pending.append(self._inflight[2])
        if self._housekeeping is not None:
            pending.append(self._housekeeping)
        wait(pending)  # their outcomes, failures included, are dropped with them
        self._reset()
        self.recover(snapshot)

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
        if batch.topic == self._drift_topic:
            for i in range(len(batch)):
                self._drift(batch.row(i))
            return
        n = len(batch)
        slow: list[int] = []
        # a record over the size limit is never scanned: the careful path rejects it unparsed
        big = np.diff(batch.bounds) > self._limits.record_bytes
        if batch.plain and not big.any():  # as most producers send
            eligible = np.arange(n, dtype=np.int64)
        else:  # JSON records (a value, no protobuf content-type) may be scanned; the rest go the careful way
            nulls = batch.null_values
            json_rows = ~big
            if not batch.plain:
                json_rows &= np.fromiter(
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
        """Write every buffer, labelled or not, that holds a shard's worth of records, in the background.

        The stream goes on meanwhile; the shard enters the state now and the
        next flush waits for the write before its transaction commits. (A text
        column is kept within ``shard_text_bytes`` as records are added:
        :meth:`_buffer_for`.)
        """
        for key in [k for k, buf in self._buffers.items() if buf.count >= self._shard_max]:
            self._seal(key)
        for key in [k for k, buf in self._unlabelled.items() if buf.count >= self._shard_max]:
            self._seal(key, unlabelled=True)

    def _seal(self, key: tuple[str, int], unlabelled: bool = False) -> None:
        """Write the buffer of ``key`` (dataset, partition) as a shard, in the background."""
        dataset, partition = key
        if unlabelled:
            self._write_shard(dataset, partition, self._unlabelled.pop(key), unlabelled=True)
        else:
            n = self._write_shard(dataset, partition, self._buffers.pop(key))
            self._pending[dataset] = self._pending.get(dataset, 0) - n  # now counted in the state
        self._sealed = True

    def _buffer_for(self, dataset: str, partition: int, text: str | None, unlabelled: bool = False) -> _Buffer:
        """The buffer one more record of ``dataset`` and ``partition`` (on the careful path or
        a late label) goes into. The one there is written first when it holds
        ``shard_max_records`` records, or when the record's text would take its text column,
        padded to its longest text as a shard stores it, past ``shard_text_bytes``: so a
        shard's text column never passes that (one text alone is bounded by the limits)."""
        buffers = self._unlabelled if unlabelled else self._buffers
        key = (dataset, partition)
        buf = buffers.get(key)
        if buf is not None and (buf.count >= self._shard_max or not buf.takes(text, self._text_bytes)):
            self._seal(key, unlabelled)
            buf = None
        if buf is None:
            buf = buffers[key] = _Buffer()
        return buf

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
            if spec is None or spec.task in (Task.TEXT, Task.REGRESSION):  # the careful path names the reason
                undecided.append(int(pending[0]))
                pending = pending[1:]
                name = _dataset_of(batch.value(int(pending[0])) or b"") if len(pending) else None
                continue
            sc = fastscan.scan(joined, pending, spec, max_id_bytes=self._limits.for_spec(spec).id_bytes)
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
        starts, lengths = sc.id_starts, sc.id_lengths
        limit = self._limits.for_spec(spec).record_bytes
        long_labels = spec.longest_label_bytes > self._limits.label_bytes  # (registered before the check)
        if limit < self._limits.record_bytes or long_labels:  # the dataset's own size limit, or such labels
            fits = batch.bounds[rows + 1] - batch.bounds[rows] <= limit
            too_long = np.zeros(len(rows), dtype=bool)
            if long_labels:  # as the careful path would, after the size: label_too_long
                bad = [i for i, lab in enumerate(spec.labels) if len(lab.encode()) > self._limits.label_bytes]
                too_long = fits & np.isin(labels, bad)
            if not fits.all() or too_long.any():
                for j in np.flatnonzero(~fits | too_long).tolist():
                    incoming = batch.row(int(rows[j]))
                    size = len(incoming[3] or b"")
                    if fits[j]:
                        nbytes = len(spec.labels[int(labels[j])].encode())
                        detail = f"label is {nbytes} bytes, the limit is {self._limits.label_bytes}"
                        err = RecordError(Reason.LABEL_TOO_LONG, detail)
                    else:
                        err = RecordError(Reason.RECORD_TOO_LARGE, f"record is {size} bytes, the limit is {limit}")
                    self._reject(incoming, err, spec.name)
                fits &= ~too_long
                rows, column, starts, lengths = rows[fits], column[fits], starts[fits], lengths[fits]
                labels, holdout, x = labels[fits], holdout[fits], x[fits]
        # in stream order: the first record with an id is kept, any later one rejected
        fresh = self._seen[spec.name].add_bytes(sc.id_bytes, starts, lengths)
        if not fresh.all():
            for j in np.flatnonzero(~fresh).tolist():
                lo = int(starts[j])
                rid = sc.id_bytes[lo : lo + int(lengths[j])].decode("ascii")
                self._duplicate(batch.row(int(rows[j])), spec.name, rid)
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
        dataset = "?"  # the metrics' label: only registered names, whatever records say
        try:
            self._limits.check_size(value)  # before anything is parsed
            raw = parse(value, content_type)
            spec = self._registry.lookup(raw.dataset)
            if spec is None:
                raise RecordError(Reason.UNKNOWN_DATASET, "dataset is not registered", dataset=raw.dataset[:200])
            dataset = spec.name
            limits = self._limits.for_spec(spec)
            limits.check_size(value)
            if raw.features_uri and raw.features is None:  # a claim check: the tensor is in the store
                raw.raw = self._claims.fetch(raw.features_uri)
            rec = clean(raw, spec, allow_unlabelled=True, limits=limits)
        except RecordError as exc:
            self._reject(incoming, exc, dataset)
            return
        if rec.id in self._seen[rec.dataset]:
            self._duplicate(incoming, rec.dataset, rec.id)
            return
        self._seen[rec.dataset].add(rec.id)
        if spec.is_unlabelled(rec.label):  # waits for its label on data.feedback
            buf = self._buffer_for(rec.dataset, partition, rec.text, unlabelled=True)
            self._waiting[rec.dataset][rec.id] = _Waiting(partition, offset, rec)
            buf.add(rec, offset)
            RECORDS.labels(rec.dataset, "unlabelled").inc()
            return
        self._buffer_for(rec.dataset, partition, rec.text).add(rec, offset)
        self._note_pending(spec, 1)
        RECORDS.labels(rec.dataset, "accepted").inc()

    def _duplicate(self, incoming: InRecord, dataset: str, rid: str) -> None:
        """A record whose id the dataset already holds: the monitor's replay of a labelled served
        request (after its restart) is a no-op; any other is dead-lettered as ``duplicate_id``."""
        if is_served_record_id(rid):
            RECORDS.labels(dataset, "replayed").inc()
            return
        err = RecordError(Reason.DUPLICATE_ID, "record id already ingested", dataset=dataset, id=rid)
        self._reject(incoming, err, dataset)

    def _drift(self, incoming: InRecord) -> None:
        """A ``drift.detected`` alert: its dataset cuts a version as soon as it has new records.

        The alert is part of the state (the snapshot of this transaction), so it survives a
        restart and is dropped by the version it brought forward (docs/monitor.md).
        """
        _, _, key, value, headers = incoming
        try:
            event = decode(key, value, headers)
        except DecodeError as exc:
            malformed = RecordError(Reason.MALFORMED, f"not a drift.detected event: {exc}")
            self._reject(incoming, malformed, "?", origin=self._drift_topic)
            return
        alert = event.payload
        if not isinstance(alert, events_pb2.DriftDetected):
            log.info("event ignored", type=event.type, topic=self._drift_topic)
            return
        spec = self._registry.lookup(alert.dataset) if alert.dataset else None
        if spec is None:
            log.info("drift alert for a dataset that is not registered", dataset=alert.dataset[:200], model=alert.model)
            return
        ds = self.state.dataset(spec.name, self._first_seen.get(spec.name))
        ds.drift_alert = f"{alert.model} v{alert.version}: {alert.test} {alert.statistic:.4g} > {alert.threshold:.4g}"
        self._sealed = True  # the state changed: the flush writes its snapshot
        DRIFT_ALERTS.labels(alert.dataset).inc()
        log.info("drift alert: the next version comes early", dataset=alert.dataset, alert=ds.drift_alert)

    def _feedback(self, incoming: InRecord) -> None:
        """A late label: the waiting record becomes a labelled record at its original offset."""
        _, _, _, value, headers = incoming
        content_type = _content_type(headers)
        dataset = "?"  # the metrics' label: only registered names
        try:
            self._limits.check_size(value)
            try:
                fb = parse_feedback(value, content_type)
            except InvalidInputError as exc:
                raise RecordError(Reason.MALFORMED, str(exc)) from exc
            if not fb.record_id:  # a label for a served request: the monitor joins it (data.raw)
                FEEDBACK_SKIPPED.inc()
                return
            name, rid, label = fb.dataset, fb.record_id, fb.label
            self._limits.check_label(label)
            spec = self._registry.lookup(name)
            if spec is None:
                raise RecordError(Reason.UNKNOWN_DATASET, "dataset is not registered", dataset=name[:200])
            dataset = spec.name
            limits = self._limits.for_spec(spec)
            limits.check_size(value)  # the dataset's own size limit
            limits.check_id(rid)
            target = label_value(spec, label)
            waiting = self._waiting[dataset].pop(rid, None)
            if waiting is None:
                reason = Reason.ALREADY_LABELLED if rid in self._seen[dataset] else Reason.UNKNOWN_RECORD
                raise RecordError(reason, "no unlabelled record with this id is waiting", dataset=dataset, id=rid)
        except RecordError as exc:
            self._reject(incoming, exc, dataset, origin=self._feedback_topic)
            return
        partition, offset, rec = waiting.partition, waiting.offset, waiting.rec
        if waiting.shard is not None:
            self._waiting_in[waiting.shard.key] -= 1
        labelled = CleanRecord(rec.dataset, rec.id, target, rec.holdout, rec.x, rec.text)
        self._buffer_for(dataset, partition, rec.text).add(labelled, offset)
        self._note_pending(spec, 1)
        RECORDS.labels(dataset, "labelled_later").inc()

    def _reject(self, incoming: InRecord, exc: RecordError, dataset: str, origin: str | None = None) -> None:
        """Dead-letter a record: its key, value and headers as they came, cut down to what a
        Kafka record can carry whatever the record held (the reason says what was cut)."""
        partition, offset, key, value, headers = incoming
        reason = str(exc)
        if len(reason) > _DEAD_REASON_CHARS:
            reason = reason[:_DEAD_REASON_CHARS] + "..."
        if value is not None and len(value) > self._dead_value_max:
            reason += f" (the dead letter keeps the first {self._dead_value_max} of {len(value)} bytes)"
            value = value[: self._dead_value_max]
        if key is not None and len(key) > _DEAD_KEY_BYTES:
            reason += f" (the key is cut to {_DEAD_KEY_BYTES} of {len(key)} bytes)"
            key = key[:_DEAD_KEY_BYTES]
        header_bytes = sum(len(n) + len(v or b"") for n, v in headers) if headers else 0
        if header_bytes > _DEAD_HEADER_BYTES:
            reason += f" (its headers, over {_DEAD_HEADER_BYTES} bytes, are left out)"
            headers, header_bytes = None, 0
        # what the dead letter holds: value, key, the headers kept, the reason and cdl-* headers
        self._dead_bytes += len(value or b"") + len(key or b"") + header_bytes + len(reason) + 256
        self._dead.append(
            dead_letter(
                self._deadletter_topic,
                value,
                key,
                headers,
                reason=reason,
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
        """Flush now: a version is due (by count or by time) or many dead letters wait
        (10,000, or ``deadletter_flush_bytes``).

        A batch whose scan has ended is finished here, so the last batch of a burst
        waits for no further input.
        """
        if self._inflight is not None and (self._inflight[2] is None or self._inflight[2].done()):
            self._finish_inflight()
        if self._version_due or len(self._dead) >= 10000 or self._dead_bytes >= self._dead_flush_bytes:
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
        """Write buffered shards, commit due versions; return what the transaction must publish.

        Also hands the housekeeping (merging small shards, sweeping unreferenced
        objects) to its background thread, and takes what a finished job merged.
        """
        self._finish_inflight()
        # what the committed state names, when a sweep may be due: the state holds nothing
        # else yet but shards sealed since (merges taken below, and this flush, change it)
        committed = self.state.referenced() if self._sweep_time() else None
        self._take_housekeeping()
        keep = committed if committed is not None and self._sweep_due() else None
        now = time.time() if now is None else now
        out: list[OutRecord] = list(self._dead)
        self._dead.clear()
        self._dead_bytes = 0
        for (dataset, partition), buf in sorted(self._buffers.items()):
            if buf.count:
                self._write_shard(dataset, partition, buf)
                self._sealed = True
        self._buffers.clear()
        for (dataset, partition), buf in sorted(self._unlabelled.items()):
            if buf.count:
                self._write_shard(dataset, partition, buf, unlabelled=True)
                self._sealed = True
        self._unlabelled.clear()
        changed = bool(out) or self._sealed
        self._sealed = False
        changed |= self._drop_labelled_out()
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
            out.append(OutRecord(self._state_topic, self._snapshot(), STATE_KEY))
        self._start_housekeeping(None if keep is None else keep | self.state.referenced())
        self._maybe_trim()
        return out

    def _maybe_trim(self) -> None:
        """Hand the heap's free pages back once a minute, or as soon as they pile up.

        The heap keeps what it faulted in (keep_freed_memory): that pays at full speed, but
        on a long run its free pages would only pile up. On a clock alone resident memory
        swung by ~50 MiB within each minute (bench/soak read 100 or 150 MiB depending on
        when it looked); trimming also when it is ``TRIM_GROWTH_BYTES`` above its level after
        the last trim bounds the swing at the cost of some page faults (at most one trim every ``TRIM_MIN_S``).
        """
        rss = resident_bytes() or 0
        now = time.monotonic()
        since = now - self._trimmed_at
        if since >= TRIM_INTERVAL_S or (since >= TRIM_MIN_S and rss - self._trimmed_rss >= TRIM_GROWTH_BYTES):
            release_memory()
            self._trimmed_at = time.monotonic()
            self._trimmed_rss = resident_bytes() or 0

    def _snapshot(self) -> bytes:
        """The state snapshot, at most ``state_max_bytes``.

        A larger one (pending shards of many partitions on a trickle, unlabelled shards whose
        labels never come) has its pending and unlabelled shards merged now; if that is not
        enough, :class:`StateTooLargeError`, logged and counted: Kafka would refuse it.
        """
        data = json.dumps(self.state.to_json()).encode()
        if len(data) > self._state_max_bytes:
            log.warning(
                "ingest state over state_max_bytes: merging its pending and unlabelled shards now",
                bytes=len(data),
                limit=self._state_max_bytes,
            )
            self._merge_unversioned_now()
            data = json.dumps(self.state.to_json()).encode()
            if len(data) > self._state_max_bytes:
                STATE_OVER.labels("failed").inc()
                lists = {
                    n: {"pending": len(d.pending), "unlabelled": len(d.unlabelled)}
                    for n, d in self.state.datasets.items()
                }
                log.error(
                    "ingest state too large to commit even with its shards merged: nothing is committed; "
                    "raise CDL_INGEST_STATE_MAX_BYTES (Kafka's max.message.bytes bounds it) or let versions "
                    "come sooner (a lower min_new_records, a max_interval_s), label or drop waiting records",
                    bytes=len(data),
                    limit=self._state_max_bytes,
                    shards=lists,
                )
                raise StateTooLargeError(
                    "ingest state snapshot over state_max_bytes", bytes=len(data), limit=self._state_max_bytes
                )
            STATE_OVER.labels("merged").inc()
        STATE_BYTES.set(len(data))
        return data

    def _merge_unversioned_now(self) -> None:
        """Merge every run of two or more small pending or unlabelled shards per partition, in
        this thread, and put the merged shards in the state at once (each written in full
        first). The housekeeping job in flight is waited for first, so its sweep cannot race
        a merged shard this writes or finds already there."""
        if self._housekeeping is not None:
            wait([self._housekeeping])
            self._take_housekeeping()
        policy = replace(self._compaction, min_shards=2)
        for name, ds in sorted(self.state.datasets.items()):
            for where in ("pending", "unlabelled"):
                for group in plan(getattr(ds, where), policy):
                    m = merge(self._store, name, group, policy, where)
                    if m is not None and self._merge_now(m):
                        MERGED.labels(name).inc(len(m.inputs))

    def _drop_labelled_out(self) -> bool:
        """Leave unlabelled shards none of whose records still waits out of the state
        (their records are in labelled shards now); whether any was left out."""
        dropped = False
        for ds in self.state.datasets.values():
            kept = [s for s in ds.unlabelled if self._waiting_in.get(s.key, 0) > 0]
            if len(kept) != len(ds.unlabelled):
                for gone in {s.key for s in ds.unlabelled} - {s.key for s in kept}:
                    self._waiting_in.pop(gone, None)
                    self._refs.pop(gone, None)
                ds.unlabelled = kept
                dropped = True
        return dropped

    # ---------------------------------------------------------------- housekeeping
    def _take_housekeeping(self) -> None:
        """Take what a finished housekeeping job merged: merges of versioned shards wait for
        the dataset's next version; those of pending and unlabelled shards go into the state
        now (committed by this flush, which the job's start followed)."""
        job = self._housekeeping
        if job is None or not job.done():
            return
        self._housekeeping = None
        try:
            merged, unmergeable = job.result()
        except Exception as exc:  # noqa: BLE001 - housekeeping never stops the stream; the next job tries again
            log.warning("ingest housekeeping failed", error=str(exc))
            return
        for m in merged:
            if m.where == "versioned":
                self._merges[m.dataset].append(m)
            else:
                self._merge_now(m)
        self._unmergeable.update(unmergeable)

    def _merge_now(self, m: Merged) -> bool:
        """Put the merged pending or unlabelled shard ``m`` in the state in its inputs' place
        (its waiting records now in it); False, changing nothing, when they are not all there.

        Safe before any version names it: no manifest names a pending or unlabelled shard,
        only the state, and the state that names ``m`` is committed in one transaction; the
        state committed before still names the inputs, and they stay until the sweep finds
        neither names them."""
        ds = self.state.datasets.get(m.dataset)
        if ds is None or not ds.replace(m.where, m.inputs, m.shard):
            return False
        if m.where == "unlabelled":
            refs = [ref for key in m.inputs for ref in self._refs.pop(key, [])]
            for ref in refs:
                ref.key = m.shard.key
            self._refs[m.shard.key] = refs
            self._waiting_in[m.shard.key] += sum(self._waiting_in.pop(key, 0) for key in m.inputs)
        self._sealed = True
        return True

    def _sweep_time(self) -> bool:
        """The sweep's interval has passed."""
        interval = self._compaction.sweep_interval_s
        return interval > 0 and time.monotonic() >= self._next_sweep

    def _sweep_due(self) -> bool:
        """A sweep can start at this flush: its interval has passed and no job runs."""
        return self._housekeeping is None and self._sweep_time()

    def _start_housekeeping(self, keep: set[str] | None) -> None:
        """Start a job when none runs and there is work: merges (of the latest version's shards
        for datasets with none waiting for a version; of pending and unlabelled shards), and a
        sweep when ``keep`` is given (see :meth:`_sweep_due`).

        ``keep`` holds every key the committed state and the state being built
        name; merged shards waiting for a version are added. Objects written after
        this call are newer than the sweep's cut-off, so none of them is swept.
        Every shard the state names is written by now (the flush waited for them).
        """
        if self._housekeeping is not None:
            return
        policy = self._compaction
        work: list[tuple[str, str, list[list[Shard]]]] = []
        for name, ds in sorted(self.state.datasets.items()):
            for where in WHERE:
                if where == "versioned" and self._merges.get(name):
                    continue
                groups = [g for g in plan(getattr(ds, where), policy) if _keys(g) not in self._unmergeable]
                if groups:
                    work.append((name, where, groups))
        datasets: list[str] = []
        if keep is not None:
            self._next_sweep = time.monotonic() + policy.sweep_interval_s
            keep = keep | {m.shard.key for ms in self._merges.values() for m in ms}
            datasets = sorted(self.state.datasets)
        if not work and not datasets:
            return
        cutoff = time.time() - policy.grace_s
        self._housekeeping = self._housekeeper.submit(self._housekeep, work, datasets, keep or set(), cutoff)

    def _housekeep(
        self, work: list[tuple[str, str, list[list[Shard]]]], datasets: list[str], keep: set[str], cutoff: float
    ) -> tuple[list[Merged], list[tuple[str, ...]]]:
        """The housekeeping job (in its thread; no state is touched): merge, then sweep.

        Returns the merged shards, and the groups that could not be merged (not planned again).
        """
        merged: list[Merged] = []
        unmergeable: list[tuple[str, ...]] = []
        for name, where, groups in work:
            for group in groups:
                m = merge(self._store, name, group, self._compaction, where)
                if m is None:
                    unmergeable.append(_keys(group))
                    continue
                merged.append(m)
                MERGED.labels(name).inc(len(m.inputs))
        # a merged shard found already written (by a session whose merge never got into a
        # committed state) keeps its old time: it must not be swept as an old orphan
        keep = keep | {m.shard.key for m in merged}
        for name in datasets:
            SWEPT.labels(name).inc(len(sweep(self._store, name, keep, cutoff, self._manifest_refs)))
        return merged, unmergeable

    def _wait_for_writes(self) -> None:
        """Every shard the state names must be in MinIO before the state is committed.

        Every write is waited for, failed or not, before a failure is raised: none is
        left running untracked (:meth:`restore` waits for what ``_writes`` holds).
        """
        wait(self._writes)
        writes, self._writes = self._writes, []
        for write in writes:
            write.result()  # a failed write raises: the transaction must not commit

    def close(self) -> None:
        """Finish (or give up on) background scans, shard writes and housekeeping."""
        self._scanner.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self._housekeeper.shutdown(wait=True, cancel_futures=True)

    def _write_shard(self, dataset: str, partition: int, buf: _Buffer, unlabelled: bool = False) -> int:
        """Record the shard in the state and write it in the background; returns its record count."""
        spec = self._registry.get(dataset)
        labels = np.concatenate(buf.labels).astype(spec.label_dtype)
        splits = np.concatenate(buf.splits).astype(np.uint8)
        ids = np.concatenate(buf.ids)
        columns: dict[str, npt.NDArray[Any] | list[npt.NDArray[Any]]] = {
            "id": ids,
            "label": labels,
            "split": splits,
            "offset": np.concatenate(buf.offsets).astype(np.int64),
        }
        if spec.task is Task.TEXT:
            columns["text"] = np.array(buf.text)
        else:  # the features' chunks are written one after the other, not joined first
            columns["x"] = [chunk.astype(spec.dtype, copy=False) for chunk in buf.x]
        key = Shard.key_for(dataset, partition, buf.first, buf.last, unlabelled=unlabelled)
        if unlabelled:  # which of its records still wait, so that it can be dropped once none does
            waiting = self._waiting[dataset]
            ref = _ShardRef(key)
            self._refs[key] = [ref]
            for rid in ids.tolist():
                w = waiting.get(rid)
                if w is not None and w.shard is None:
                    w.shard = ref
                    self._waiting_in[key] += 1
        if len(self._writes) >= 4:  # bound the memory held by writes in flight
            self._writes.pop(0).result()
        self._writes.append(self._writer.submit(self._put_shard, key, columns))
        n = buf.count
        holdout = int(splits.sum())
        if spec.task.regression:  # the target's name: how many values it has
            counts = [int(np.count_nonzero(~np.isnan(labels)))]
        else:
            counts = np.bincount(labels[labels >= 0], minlength=len(spec.labels)).tolist()
        hist = {label: c for label, c in zip(spec.labels, counts, strict=False) if c}
        shard = Shard(key, partition, buf.first, buf.last, n, n - holdout, holdout, hist)
        ds = self.state.dataset(dataset, self._first_seen.get(dataset))
        (ds.unlabelled if unlabelled else ds.pending).append(shard)
        return n

    def _put_shard(self, key: str, columns: dict[str, npt.NDArray[Any] | list[npt.NDArray[Any]]]) -> str:
        return self._store.put_bytes(DATASETS_BUCKET, key, shard_parts(columns))

    def _commit_version(self, name: str, now: float) -> OutRecord:
        # a dataset version starts its trace: training, compression and rollout join it
        ds = self.state.datasets[name]
        attrs = {"cdl.dataset": name, "cdl.version": ds.version + 1, "cdl.drift_alert": bool(ds.drift_alert)}
        with tracing.span("ingest dataset version", None, attrs):
            return self._commit_version_traced(name, now)

    def _commit_version_traced(self, name: str, now: float) -> OutRecord:
        spec = self._registry.get(name)
        ds = self.state.datasets[name]
        for m in self._merges.pop(name, []):  # merged shards take their inputs' place from this version on
            ds.replace_versioned(m.inputs, m.shard)
        version = ds.version + 1
        manifest = build_manifest(spec, ds, version, now, self._raw_topic)
        # written (with every shard it names) before the transaction that publishes it commits
        uri = self._store.put_json(DATASETS_BUCKET, manifest_key(name, version), manifest)
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
        ds.versioned, ds.pending = ds.shards, []
        ds.last_version_at = now
        if ds.drift_alert:
            log.info("drift alert answered by a new version", dataset=name, version=version, alert=ds.drift_alert)
            ds.drift_alert = ""
        VERSIONS.labels(name).inc()
        log.info(
            "dataset version committed", dataset=name, version=version, total=msg.total_records, new=msg.new_records
        )
        # the event id is the natural key: one data.updated per dataset version
        traceparent = tracing.current_traceparent() or new_traceparent()
        event = Event(msg, source=self._source, id=f"{name}/v{version}", key=name, traceparent=traceparent)
        return OutRecord.of(self._updated_topic, event)
