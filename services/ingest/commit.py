"""The version commit: when a dataset's next version is due, committing it, and the snapshot guard.

Owns the running part of the version policy (the rule itself, ``policy_due``, and the state
are :mod:`services.ingest.versioning`'s): valid records are counted as they are buffered, so
that a count policy makes the loop flush at once; the time policy is checked every half
second; the time each dataset's first record came is kept (a new dataset's time policy counts
from it). Committing a version writes its manifest and makes the ``data.updated`` event that
publishes it, in a trace of its own (:class:`Versions`). The snapshot guard keeps the state
snapshot within ``state_max_bytes``: a larger one has its pending and unlabelled shards merged
at once, or the flush fails (:func:`snapshot`, :class:`StateTooLargeError`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from cdl import tracing
from cdl.datasets import DATASETS_BUCKET, DatasetSpec
from cdl.errors import CdlError
from cdl.events import Event, OutRecord, new_traceparent
from cdl.logging import get_logger
from cdl.store import BlobStore
from cdl.v1 import events_pb2
from services.ingest.compaction import Merged
from services.ingest.registry import DatasetRegistry
from services.ingest.versioning import IngestState, build_manifest, manifest_key, policy_due

__all__ = ["STATE_OVER", "StateTooLargeError", "Versions", "snapshot"]

log = get_logger(__name__)

VERSIONS = PromCounter("cdl_ingest_versions_total", "Dataset versions committed", ["dataset"])
PENDING = Gauge("cdl_ingest_pending_records", "Valid records not yet in a version", ["dataset"])
STATE_BYTES = Gauge("cdl_ingest_state_bytes", "Size of the latest ingest state snapshot")
STATE_OVER = PromCounter(
    "cdl_ingest_state_over_limit_total",
    "Snapshots over state_max_bytes, by outcome (merged: back under it by merging shards; failed: still over)",
    ["outcome"],
)


class StateTooLargeError(CdlError):
    """The state snapshot stays over ``state_max_bytes`` even with its shards merged: the
    flush cannot be committed (Kafka would refuse the record). Raised, logged and counted
    (``cdl_ingest_state_over_limit_total{outcome="failed"}``) at every flush until fixed."""


class Versions:
    """When each dataset's next version is due, and its commit."""

    def __init__(
        self, *, registry: DatasetRegistry, store: BlobStore, source: str, raw_topic: str, updated_topic: str
    ) -> None:
        self._registry = registry
        self._store = store
        self._source = source
        self._raw_topic = raw_topic
        self._updated_topic = updated_topic
        self.reset()

    def reset(self) -> None:
        """Nothing counted, nothing due: what a freshly constructed processor holds."""
        #: per dataset, valid records buffered and not yet in a shard of the state
        self.pending: dict[str, int] = {}
        #: a count policy is reached: the loop flushes at once
        self.due = False
        self._last_time_check = 0.0
        #: when each dataset's first record came (a new dataset's time policy counts from it)
        self.first_seen: dict[str, float] = {}

    def note(self, spec: DatasetSpec, n: int, state: IngestState) -> None:
        """``n`` records of ``spec`` were buffered: flush as soon as a count policy is reached
        (freshness), not at the next interval."""
        self.pending[spec.name] = self.pending.get(spec.name, 0) + n
        self.first_seen.setdefault(spec.name, time.time())
        ds = state.datasets.get(spec.name)
        committed = ds.new_records if ds is not None else 0
        if spec.min_new_records > 0 and committed + self.pending[spec.name] >= spec.min_new_records:
            self.due = True

    def forget(self, dataset: str) -> None:
        """Count nothing of ``dataset`` any more (another instance owns it now)."""
        self.pending.pop(dataset, None)
        self.first_seen.pop(dataset, None)

    def sealed(self, dataset: str, n: int) -> None:
        """A buffer of ``n`` records of ``dataset`` became a shard: now counted in the state."""
        self.pending[dataset] = self.pending.get(dataset, 0) - n

    def time_due(self, state: IngestState) -> bool:
        """A dataset with new records has reached its time policy (looked at every half second)."""
        now = time.monotonic()
        if now - self._last_time_check < 0.5:
            return False
        self._last_time_check = now
        wall = time.time()
        for name in set(self.pending) | {n for n, d in state.datasets.items() if d.pending}:
            spec = self._registry.lookup(name)
            ds = state.datasets.get(name)
            last = ds.last_version_at if ds is not None else self.first_seen.get(name, wall)
            if spec is not None and spec.max_interval_s > 0 and wall - last >= spec.max_interval_s:
                return True
        return False

    def flushed(self) -> None:
        """The flush wrote every buffer: nothing is pending, no version is due."""
        self.pending.clear()
        self.due = False

    def commit_due(self, state: IngestState, now: float, merged: Callable[[str], list[Merged]]) -> list[OutRecord]:
        """Commit a version of every dataset of ``state`` whose policy is due at ``now``; their
        ``data.updated`` events. ``merged(name)`` hands over the merged shards waiting for the
        dataset's next version."""
        out: list[OutRecord] = []
        for name, ds in sorted(state.datasets.items()):
            spec = self._registry.lookup(name)
            if spec is not None and policy_due(spec, ds, now):
                out.append(self._commit(state, name, now, merged))
            PENDING.labels(name).set(ds.new_records)
        return out

    def _commit(self, state: IngestState, name: str, now: float, merged: Callable[[str], list[Merged]]) -> OutRecord:
        # a dataset version starts its trace: training, compression and rollout join it
        ds = state.datasets[name]
        attrs = {"cdl.dataset": name, "cdl.version": ds.version + 1, "cdl.drift_alert": bool(ds.drift_alert)}
        with tracing.span("ingest dataset version", None, attrs):
            return self._commit_traced(state, name, now, merged)

    def _commit_traced(
        self, state: IngestState, name: str, now: float, merged: Callable[[str], list[Merged]]
    ) -> OutRecord:
        spec = self._registry.get(name)
        ds = state.datasets[name]
        for m in merged(name):  # merged shards take their inputs' place from this version on
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


def snapshot(state: IngestState, max_bytes: int, merge_now: Callable[[], None]) -> bytes:
    """The snapshot of ``state``, at most ``max_bytes`` (``state_max_bytes``).

    A larger one (pending shards of many partitions on a trickle, unlabelled shards whose
    labels never come) has its pending and unlabelled shards merged now (``merge_now``); if
    that is not enough, :class:`StateTooLargeError`, logged and counted: Kafka would refuse it.
    """
    data = json.dumps(state.to_json()).encode()
    if len(data) > max_bytes:
        log.warning(
            "ingest state over state_max_bytes: merging its pending and unlabelled shards now",
            bytes=len(data),
            limit=max_bytes,
        )
        merge_now()
        data = json.dumps(state.to_json()).encode()
        if len(data) > max_bytes:
            STATE_OVER.labels("failed").inc()
            lists = {n: {"pending": len(d.pending), "unlabelled": len(d.unlabelled)} for n, d in state.datasets.items()}
            log.error(
                "ingest state too large to commit even with its shards merged: nothing is committed; "
                "raise CDL_INGEST_STATE_MAX_BYTES (Kafka's max.message.bytes bounds it) or let versions "
                "come sooner (a lower min_new_records, a max_interval_s), label or drop waiting records",
                bytes=len(data),
                limit=max_bytes,
                shards=lists,
            )
            raise StateTooLargeError("ingest state snapshot over state_max_bytes", bytes=len(data), limit=max_bytes)
        STATE_OVER.labels("merged").inc()
    STATE_BYTES.set(len(data))
    return data
