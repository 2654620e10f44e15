"""The ingest stream's domain logic: validate, dead-letter, shard, version.

Transport-free: the Kafka loop hands batches of ``data.raw`` records to
:meth:`IngestProcessor.on_batch` and, every flush, publishes what
:meth:`IngestProcessor.flush` returns (dead letters, records handed on to their
dataset's owner, ``data.updated`` events and the state snapshots) in one
transaction with the input offsets.

Two modes. The service runs *partitioned* (:meth:`IngestProcessor.start_partitioned`,
then :meth:`IngestProcessor.assign` at every assignment): it owns the datasets whose home
partition of ``data.raw`` it holds, hands records of the others on, and writes one snapshot
per dataset (:mod:`~services.ingest.partitions`). A processor driven by
:meth:`IngestProcessor.restore` / :meth:`IngestProcessor.recover` alone owns every dataset
and writes one snapshot of all of them under :data:`STATE_KEY` (tests, tools).

The processor orchestrates; each concern has its module beside it:
:mod:`~services.ingest.buffers` (buffers and sealing, the shard writes),
:mod:`~services.ingest.late_labels` (records waiting for their labels),
:mod:`~services.ingest.commit` (the version policy and commit, the snapshot guard),
:mod:`~services.ingest.housekeeping` (compaction and the sweep in the background),
:mod:`~services.ingest.deadletters` (dead letters, cut to size),
:mod:`~services.ingest.trimming` (handing free memory back),
:mod:`~services.ingest.fastscan` (the C scan of a batch).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter as PromCounter

from cdl.datasets import DATASETS_BUCKET, DatasetSpec, decode_shard
from cdl.errors import DecodeError, InvalidInputError
from cdl.events import Headers, InBatch, InRecord, OutRecord, Topics, decode
from cdl.feedback import is_served_record_id, parse_feedback
from cdl.logging import get_logger
from cdl.store import ObjectStore
from cdl.v1 import events_pb2
from services.ingest import fastscan
from services.ingest.buffers import ShardBuffers
from services.ingest.claims import DEFAULT_BUCKETS, DEFAULT_MAX_BYTES, Claims
from services.ingest.commit import StateTooLargeError, Versions, snapshot
from services.ingest.compaction import CompactionPolicy
from services.ingest.deadletters import DeadLetters
from services.ingest.housekeeping import Housekeeping
from services.ingest.late_labels import LateLabels, Rejected
from services.ingest.partitions import (
    LEGACY_STATE_KEY,
    ROUTE_DRIFT,
    ROUTE_FEEDBACK,
    ROUTE_HEADER,
    Routing,
    dataset_docs,
    dataset_of_key,
    dataset_state_key,
    route_of,
)
from services.ingest.records import Limits, Reason, RecordError, clean, content_type_of, is_protobuf, parse
from services.ingest.registry import DatasetRegistry
from services.ingest.settings import IngestSettings
from services.ingest.trimming import Trimmer
from services.ingest.versioning import DatasetState, IngestState

__all__ = ["STATE_KEY", "IngestProcessor", "StateTooLargeError"]

log = get_logger(__name__)

#: the key of the snapshot of every dataset (a processor that owns them all; the first releases)
STATE_KEY = LEGACY_STATE_KEY

RECORDS = PromCounter("cdl_ingest_records_total", "Records seen by ingest", ["dataset", "outcome"])
DRIFT_ALERTS = PromCounter(
    "cdl_ingest_drift_alerts_total", "drift.detected alerts that make a dataset cut its next version early", ["dataset"]
)
HANDED_ON = PromCounter(
    "cdl_ingest_handed_on_total",
    "Records of datasets another instance owns, produced again to their home partition of data.raw "
    "(kind: record, feedback, drift)",
    ["kind"],
)
#: handed-on records waiting for the flush that makes it flush at once
_HAND_ON_FLUSH_COUNT = 10_000


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
        self._state_topic = state_topic
        self._raw_topic = raw_topic
        self._feedback_topic = feedback_topic
        self._drift_topic = drift_topic
        self._limits = limits or Limits()
        self._claims = claims or Claims(store, DEFAULT_BUCKETS, DEFAULT_MAX_BYTES)
        #: a snapshot over this is brought back under it by merging shards, or the flush fails
        self._state_max_bytes = state_max_bytes
        self._flush_bytes = deadletter_flush_bytes
        #: partitioned (the service): owns the datasets of the data.raw partitions it holds
        #: (``_routing``; None: none yet) and writes a snapshot per dataset; else owns them all
        self._partitioned = False
        self._routing: Routing | None = None
        self._dead = DeadLetters(
            topic=deadletter_topic,
            origin_topic=raw_topic,
            group=group,
            max_value_bytes=deadletter_max_value_bytes,
            flush_bytes=deadletter_flush_bytes,
        )
        self._labels = LateLabels()
        self._versions = Versions(
            registry=registry, store=store, source=source, raw_topic=raw_topic, updated_topic=updated_topic
        )
        self._shards = ShardBuffers(
            registry=registry,
            store=store,
            shard_max_records=shard_max_records,
            shard_text_bytes=shard_text_bytes,
            labels=self._labels,
            versions=self._versions,
            on_change=self._state_changed,
        )
        self._scanner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-scan")
        self._housekeeping = Housekeeping(
            store=store,
            policy=compaction or CompactionPolicy(target_records=shard_max_records),
            labels=self._labels,
            on_change=self._state_changed,
        )
        self.state = IngestState()
        self._reset()

    def _reset(self) -> None:
        """Hold nothing but an empty state: what a freshly constructed processor holds."""
        self.state = IngestState()
        self._labels.clear()
        #: per dataset, every id taken so far (C hash set; see fastscan.IdSet)
        self._seen: dict[str, fastscan.IdSet] = defaultdict(fastscan.IdSet)
        self._shards.reset()
        self._dead.reset()
        #: the batch being scanned in the scan thread: (batch, rows for the careful path, scan)
        self._inflight: tuple[InBatch, list[int], Future[fastscan.BatchScan] | None] | None = None
        #: the state changed since the last flush (a shard sealed, shards merged, a drift alert)
        self._sealed = False
        self._versions.reset()
        self._trimmer = Trimmer()
        self._housekeeping.reset()
        #: records of datasets another instance owns, produced again to their home partition
        self._handed_on: list[OutRecord] = []
        self._handed_on_bytes = 0
        #: per dataset, its snapshot as last written or read (partitioned): unchanged ones are not written
        self._written: dict[str, bytes] = {}

    def _state_changed(self) -> None:
        """The state changed (a shard sealed, shards merged): the next flush writes its snapshot."""
        self._sealed = True

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
        self._partitioned, self._routing = False, None
        self.state = IngestState.from_json(doc, self._read_manifest) if doc else IngestState()
        self._seen.clear()
        self._labels.clear()
        for name, ds in self.state.datasets.items():
            self._load(name, ds)
        log.info(
            "ingest state recovered",
            datasets={
                n: {"version": d.version, "shards": len(d.versioned), "pending": len(d.pending)}
                for n, d in self.state.datasets.items()
            },
        )

    def _load(self, name: str, ds: DatasetState) -> None:
        """Rebuild what ``ds`` (the committed state of ``name``) implies in memory: every
        committed shard's ids in the seen-id set, the records of its unlabelled shards that no
        labelled shard took waiting for their labels."""
        for shard in ds.shards:
            cols = decode_shard(self._store.get_bytes(DATASETS_BUCKET, shard.key))
            self._seen[name].add_all(cols["id"].tolist())
        for shard in ds.unlabelled:
            cols = decode_shard(self._store.get_bytes(DATASETS_BUCKET, shard.key))
            self._labels.recover(name, shard, cols, self._seen[name])

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
        self._drop_background()
        self._reset()
        self.recover(snapshot)

    def _drop_background(self) -> None:
        """Wait for the batch in the scan thread, the shard writes and the housekeeping job; their
        outcomes, failures included, are dropped with them."""
        pending: list[Future[Any]] = list(self._shards.writes)
        if self._inflight is not None and self._inflight[2] is not None:
            pending.append(self._inflight[2])
        if self._housekeeping.job is not None:
            pending.append(self._housekeeping.job)
        wait(pending)

    # ---------------------------------------------------------------- ownership
    def start_partitioned(self) -> None:
        """Drop everything not committed (as :meth:`restore` does) and own no dataset until
        :meth:`assign` says which partitions this instance holds: the service's loop calls this
        at the start of every session."""
        self._drop_background()
        self._reset()
        self.state = IngestState()
        self._seen.clear()
        self._labels.clear()
        self._partitioned, self._routing = True, None

    def release(self) -> None:
        """Partitions are being revoked, and what was consumed from them is committed: the
        housekeeping job in flight is waited for (none of this instance's jobs then works on a
        dataset another instance will write)."""
        self._housekeeping.settle(self.state)

    def assign(self, partitions: int, owned: Collection[int], read_state: Callable[[], Mapping[bytes, bytes]]) -> None:
        """This instance holds the partitions ``owned`` of ``data.raw`` (of ``partitions``): it
        owns the datasets whose home partition is one of them.

        Datasets it held and no longer owns are dropped from memory (their state was committed
        when their partitions were revoked). The datasets of partitions it gained are read from
        their committed snapshots (``read_state()``: the state topic's newest values by key; read
        only when something was gained) and recovered as at start-up. A dataset without a
        snapshot of its own is taken from the snapshot of every dataset of the first releases and
        written under its own key at the next flush (the migration).
        """
        if not self._partitioned:
            raise RuntimeError("assign() is for a partitioned processor (start_partitioned)")
        self._finish_inflight()
        new, old = Routing(partitions, frozenset(owned)), self._routing
        if new == old:
            return
        held = set(self.state.datasets) | set(self._seen) | set(self._labels.waiting) | set(self._versions.pending)
        held |= {name for name, _ in self._shards.labelled} | {name for name, _ in self._shards.unlabelled}
        lost = sorted(n for n in held if not new.owns(n))
        if lost:
            buffered = [k for k, b in (*self._shards.labelled.items(), *self._shards.unlabelled.items()) if b.count]
            if any(name in lost for name, _ in buffered):
                raise RuntimeError("records not committed are held for datasets this instance no longer owns")
            self._housekeeping.settle(self.state)
            for name in lost:
                self._forget(name)
        gained = set(new.owned) if old is None or old.partitions != partitions else set(new.owned - old.owned)
        self._routing = new
        adopted: list[str] = []
        if gained:
            values = read_state()
            own_keys = {n for n in map(dataset_of_key, values) if n is not None}
            for name, doc in sorted(dataset_docs(values).items()):
                if new.home(name) not in gained or name in self.state.datasets:
                    continue
                ds = IngestState.from_json(doc, self._read_manifest).datasets.get(name)
                if ds is None:
                    continue
                self.state.datasets[name] = ds
                self._load(name, ds)
                if name in own_keys:  # else from the old snapshot: written under its own key next flush
                    self._written[name] = self._dataset_bytes(name, ds)
                adopted.append(name)
        log.info(
            "ingest partitions assigned",
            partitions=sorted(new.owned),
            of=partitions,
            adopted={n: self.state.datasets[n].version for n in adopted},
            dropped=lost,
        )

    def _forget(self, name: str) -> None:
        """Drop everything of dataset ``name`` from memory (another instance owns it now)."""
        self.state.datasets.pop(name, None)
        self._seen.pop(name, None)
        self._labels.forget(name)
        self._versions.forget(name)
        self._housekeeping.forget(name)
        self._written.pop(name, None)
        for buffers in (self._shards.labelled, self._shards.unlabelled):
            for key in [k for k in buffers if k[0] == name]:
                del buffers[key]

    def _owns(self, dataset: str) -> bool:
        """Whether this processor owns ``dataset`` (all of them unless partitioned)."""
        if not self._partitioned:
            return True
        if self._routing is None:
            raise RuntimeError("records arrived before the processor was told its partitions")
        return self._routing.owns(dataset)

    def _hand_on(self, incoming: InRecord, dataset: str, route: str | None = None) -> None:
        """Produce ``incoming`` again to ``dataset``'s home partition of ``data.raw``, keyed by the
        dataset (in the flush's transaction, with the offset it was consumed at); ``route`` says
        what a record that is not an ordinary one is (a late label, a drift alert)."""
        assert self._routing is not None  # (_owns said no: partitioned, with a routing)
        _, _, _, value, headers = incoming
        kept = tuple(
            (str(k), v if isinstance(v, bytes) else str(v).encode())
            for k, v in headers or ()
            if v is not None and k != ROUTE_HEADER
        )
        if route is not None:
            kept += ((ROUTE_HEADER, route.encode()),)
        home = self._routing.home(dataset)
        self._handed_on.append(OutRecord(self._raw_topic, value, dataset.encode(), kept, home))
        self._handed_on_bytes += len(value or b"")
        HANDED_ON.labels(route or "record").inc()

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
            if not batch.plain:  # (a record handed on with a cdl-route header is a label or an alert)
                json_rows &= np.fromiter(
                    (
                        not (nulls is not None and nulls[i])
                        and not is_protobuf(content_type_of(batch.header(i)))
                        and route_of(batch.header(i)) is None
                        for i in range(n)
                    ),
                    dtype=bool,
                    count=n,
                )
            eligible, slow = np.flatnonzero(json_rows), np.flatnonzero(~json_rows).tolist()
        scanning = (
            self._scanner.submit(fastscan.scan_batch, batch, eligible, self._registry.lookup, self._limits)
            if len(eligible)
            else None
        )
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
                if self._owns(spec.name):
                    self._keep_fast(spec, batch, rows, sc)
                else:  # another instance's dataset
                    for i in rows.tolist():
                        self._hand_on(batch.row(int(i)), spec.name)
            slow = slow + undecided
        for i in sorted(slow):
            self._one(batch.row(i))
        self._shards.seal_full(self.state)

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
        self._shards.add_scanned(spec.name, batch.partitions[rows], column, labels, holdout, batch.offsets[rows], x)
        self._versions.note(spec, len(rows), self.state)
        RECORDS.labels(spec.name, "accepted").inc(len(rows))

    def _one(self, incoming: InRecord) -> None:
        """The careful path: one record, with the precise reason when it is rejected."""
        partition, offset, _, value, headers = incoming
        route = route_of(headers) if headers else None
        if route == ROUTE_FEEDBACK:  # a late label another instance handed on
            self._feedback(incoming, self._raw_topic)
            return
        if route == ROUTE_DRIFT:  # a drift alert another instance handed on
            self._drift(incoming, self._raw_topic)
            return
        content_type = content_type_of(headers)
        dataset = "?"  # the metrics' label: only registered names, whatever records say
        try:
            self._limits.check_size(value)  # before anything is parsed
            raw = parse(value, content_type)
            spec = self._registry.lookup(raw.dataset)
            if spec is None:
                raise RecordError(Reason.UNKNOWN_DATASET, "dataset is not registered", dataset=raw.dataset[:200])
            dataset = spec.name
            if not self._owns(dataset):  # another instance's: it decides about the record
                self._hand_on(incoming, dataset)
                return
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
            buf = self._shards.buffer_for(rec.dataset, partition, rec.text, self.state, unlabelled=True)
            self._labels.wait(partition, offset, rec)
            buf.add(rec, offset)
            RECORDS.labels(rec.dataset, "unlabelled").inc()
            return
        self._shards.buffer_for(rec.dataset, partition, rec.text, self.state).add(rec, offset)
        self._versions.note(spec, 1, self.state)
        RECORDS.labels(rec.dataset, "accepted").inc()

    def _duplicate(self, incoming: InRecord, dataset: str, rid: str) -> None:
        """A record whose id the dataset already holds: the monitor's replay of a labelled served
        request (after its restart) is a no-op; any other is dead-lettered as ``duplicate_id``."""
        if is_served_record_id(rid):
            RECORDS.labels(dataset, "replayed").inc()
            return
        err = RecordError(Reason.DUPLICATE_ID, "record id already ingested", dataset=dataset, id=rid)
        self._reject(incoming, err, dataset)

    def _drift(self, incoming: InRecord, origin: str | None = None) -> None:
        """A ``drift.detected`` alert: its dataset cuts a version as soon as it has new records.

        The alert is part of the state (the snapshot of this transaction), so it survives a
        restart and is dropped by the version it brought forward (docs/monitor.md).
        """
        _, _, key, value, headers = incoming
        try:
            event = decode(key, value, headers)
        except DecodeError as exc:
            malformed = RecordError(Reason.MALFORMED, f"not a drift.detected event: {exc}")
            self._reject(incoming, malformed, "?", origin=origin or self._drift_topic)
            return
        alert = event.payload
        if not isinstance(alert, events_pb2.DriftDetected):
            log.info("event ignored", type=event.type, topic=self._drift_topic)
            return
        spec = self._registry.lookup(alert.dataset) if alert.dataset else None
        if spec is None:
            log.info("drift alert for a dataset that is not registered", dataset=alert.dataset[:200], model=alert.model)
            return
        if not self._owns(spec.name):  # its owner applies it
            self._hand_on(incoming, spec.name, ROUTE_DRIFT)
            return
        ds = self.state.dataset(spec.name, self._versions.first_seen.get(spec.name))
        ds.drift_alert = f"{alert.model} v{alert.version}: {alert.test} {alert.statistic:.4g} > {alert.threshold:.4g}"
        self._sealed = True  # the state changed: the flush writes its snapshot
        DRIFT_ALERTS.labels(alert.dataset).inc()
        log.info("drift alert: the next version comes early", dataset=alert.dataset, alert=ds.drift_alert)

    def _feedback(self, incoming: InRecord, origin: str | None = None) -> None:
        """A late label: the waiting record becomes a labelled record at its original offset.
        A label of a dataset another instance owns is handed on to it."""
        _, _, _, value, headers = incoming
        if self._partitioned:
            owner_of = self._labelled_dataset(value, headers)
            if owner_of is not None and not self._owns(owner_of):
                self._hand_on(incoming, owner_of, ROUTE_FEEDBACK)
                return
        got = self._labels.take(value, headers, self._registry, self._limits, self._seen)
        if isinstance(got, Rejected):
            self._reject(incoming, got.error, got.dataset, origin=origin or self._feedback_topic)
            return
        if got is None:
            return
        dataset = got.spec.name
        self._shards.buffer_for(dataset, got.partition, got.record.text, self.state).add(got.record, got.offset)
        self._versions.note(got.spec, 1, self.state)
        RECORDS.labels(dataset, "labelled_later").inc()

    def _labelled_dataset(self, value: bytes | None, headers: Headers | None) -> str | None:
        """The registered dataset a ``data.feedback`` record labels a record of; None for any
        other (a label of a served request, one that cannot be read: those are decided here)."""
        if value is None or len(value) > self._limits.record_bytes:
            return None
        try:
            fb = parse_feedback(value, content_type_of(headers))
        except InvalidInputError:
            return None
        if not fb.record_id or not fb.dataset:
            return None
        spec = self._registry.lookup(fb.dataset)
        return spec.name if spec is not None else None

    def _reject(self, incoming: InRecord, exc: RecordError, dataset: str, origin: str | None = None) -> None:
        """Dead-letter a record (see :class:`services.ingest.deadletters.DeadLetters`)."""
        self._dead.add(incoming, exc, origin)
        RECORDS.labels(dataset, "rejected").inc()

    def wants_flush(self) -> bool:
        """Flush now: a version is due (by count or by time) or many dead letters wait
        (10,000, or ``deadletter_flush_bytes``).

        A batch whose scan has ended is finished here, so the last batch of a burst
        waits for no further input.
        """
        if self._inflight is not None and (self._inflight[2] is None or self._inflight[2].done()):
            self._finish_inflight()
        if self._versions.due or self._dead.full():
            return True
        if len(self._handed_on) >= _HAND_ON_FLUSH_COUNT or self._handed_on_bytes >= self._flush_bytes:
            return True
        return self._versions.time_due(self.state)

    # ---------------------------------------------------------------- flush
    def flush(self, now: float | None = None) -> list[OutRecord]:
        """Write buffered shards, commit due versions; return what the transaction must publish.

        Also hands the housekeeping (merging small shards, sweeping unreferenced
        objects) to its background thread, and takes what a finished job merged.
        """
        self._finish_inflight()
        # what the committed state names, when a sweep may be due: the state holds nothing
        # else yet but shards sealed since (merges taken below, and this flush, change it)
        committed = self.state.referenced() if self._housekeeping.sweep_time() else None
        self._housekeeping.take(self.state)
        keep = committed if committed is not None and self._housekeeping.sweep_due() else None
        now = time.time() if now is None else now
        out = self._dead.take()
        out.extend(self._handed_on)
        self._handed_on, self._handed_on_bytes = [], 0
        self._shards.write_all(self.state)
        changed = bool(out) or self._sealed
        self._sealed = False
        changed |= self._labels.drop_labelled_out(self.state)
        self._shards.wait_for_writes()
        self._versions.flushed()
        versions = self._versions.commit_due(self.state, now, self._housekeeping.merged_for)
        out.extend(versions)
        changed |= bool(versions)
        if self._partitioned:
            out.extend(self._dataset_snapshots())
        elif changed:
            out.append(OutRecord(self._state_topic, self._snapshot(), STATE_KEY))
        self._housekeeping.start(self.state, None if keep is None else keep | self.state.referenced())
        self._trimmer.maybe_trim()
        return out

    def _dataset_bytes(self, name: str, ds: DatasetState) -> bytes:
        return json.dumps(IngestState(datasets={name: ds}).to_json()).encode()

    def _dataset_snapshots(self) -> list[OutRecord]:
        """A snapshot of every dataset whose state changed since it was last written (partitioned),
        each within ``state_max_bytes`` (see :func:`services.ingest.commit.snapshot`)."""
        out: list[OutRecord] = []
        for name, ds in sorted(self.state.datasets.items()):
            data = self._dataset_bytes(name, ds)
            if data == self._written.get(name):
                continue
            if len(data) > self._state_max_bytes:
                merge_now = lambda: self._housekeeping.merge_unversioned_now(self.state)  # noqa: E731
                data = snapshot(IngestState(datasets={name: ds}), self._state_max_bytes, merge_now)
            self._written[name] = data
            out.append(OutRecord(self._state_topic, data, dataset_state_key(name)))
        return out

    def _snapshot(self) -> bytes:
        """The state snapshot, within ``state_max_bytes`` (see :func:`services.ingest.commit.snapshot`)."""
        return snapshot(self.state, self._state_max_bytes, lambda: self._housekeeping.merge_unversioned_now(self.state))

    def close(self) -> None:
        """Finish (or give up on) background scans, shard writes and housekeeping."""
        self._scanner.shutdown(wait=True)
        self._shards.close()
        self._housekeeping.close()
