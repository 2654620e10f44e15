"""Ingest as replicas, without servers (issue 28): which instance owns a dataset, records handed on
to their dataset's owner, snapshots per dataset, the handover of a dataset between instances and
the one-time split of the snapshot of the first releases.

The processors run against the in-memory object store of tests/fakes.py; a dict stands for the
compacted state topic (each flush's snapshots applied to it, as a committed transaction would).
tests/integration/test_ingest_replicas.py runs two ingest processes on the real broker.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest

from cdl.datasets import DatasetSpec, Task
from cdl.events import Event, InBatch, OutRecord, encode
from cdl.v1 import events_pb2
from services.ingest.compaction import CompactionPolicy
from services.ingest.partitions import (
    LEGACY_STATE_KEY,
    ROUTE_DRIFT,
    ROUTE_FEEDBACK,
    ROUTE_HEADER,
    Routing,
    dataset_docs,
    dataset_of_key,
    dataset_state_key,
    home_partition,
    route_of,
    split_snapshot,
)
from services.ingest.processor import STATE_KEY, IngestProcessor
from services.ingest.registry import DatasetRegistry
from tests.fakes import MemoryStore

# home partitions of 3 (CRC-32 of the name modulo 3): "d" 0, "tab" 1, "gamma" 2
D0 = DatasetSpec(name="d", task=Task.TABULAR, labels=("a", "b"), input_shape=(4,), min_new_records=10)
D1 = DatasetSpec(name="tab", task=Task.TABULAR, labels=("a", "b"), input_shape=(4,), min_new_records=10)
D2 = DatasetSpec(name="gamma", task=Task.TABULAR, labels=("a", "b"), input_shape=(4,), min_new_records=10)
SPECS = (D0, D1, D2)


def _processor(store: MemoryStore) -> IngestProcessor:
    registry = DatasetRegistry(store)
    for spec in SPECS:
        if registry.lookup(spec.name) is None:
            registry.register(spec)
    policy = CompactionPolicy(min_shards=0, sweep_interval_s=0)
    return IngestProcessor(registry=registry, store=store, source="/test", state_topic="state", compaction=policy)


def _rec(dataset: str, rid: str, label: str | None = "a") -> bytes:
    doc: dict[str, Any] = {"dataset": dataset, "id": rid, "features": [1.0, 2, 3, 4]}
    if label is not None:
        doc["label"] = label
    return json.dumps(doc).encode()


def _batch(
    values: list[bytes],
    first_offset: int,
    partition: int,
    topic: str = "data.raw",
    headers: list[Any] | None = None,
    keys: list[bytes | None] | None = None,
) -> InBatch:
    n = len(values)
    batch = InBatch.from_values(topic, [partition] * n, range(first_offset, first_offset + n), keys, values, headers)
    batch.caught_up = True
    return batch


def _apply(topic: dict[bytes, bytes], out: list[OutRecord]) -> None:
    """What a committed flush leaves in the compacted state topic."""
    for rec in out:
        if rec.topic == "state" and rec.key is not None and rec.value is not None:
            topic[rec.key] = rec.value


def _of(out: list[OutRecord], topic: str) -> list[OutRecord]:
    return [r for r in out if r.topic == topic]


def test_the_home_partition_is_librdkafkas_consistent_partitioner() -> None:
    assert zlib.crc32(b"123456789") == 0xCBF43926  # the CRC-32 librdkafka's rd_crc32 computes
    assert [home_partition(s.name, 3) for s in SPECS] == [0, 1, 2]
    assert home_partition("tab", 1) == 0
    routing = Routing(3, frozenset({0, 2}))
    assert routing.owns("d") and not routing.owns("tab") and routing.owns("gamma")


def test_snapshot_keys_split_and_the_newest_per_dataset() -> None:
    assert dataset_state_key("tab") == b"ingest-state/tab"
    assert dataset_of_key(b"ingest-state/tab") == "tab"
    assert dataset_of_key(LEGACY_STATE_KEY) is None and dataset_of_key(b"ingest-state/") is None
    legacy = {"format": 2, "datasets": {"a": {"version": 3}, "b": {"version": 1}}}
    assert split_snapshot(legacy) == {
        "a": {"format": 2, "datasets": {"a": {"version": 3}}},
        "b": {"format": 2, "datasets": {"b": {"version": 1}}},
    }
    own = json.dumps({"format": 2, "datasets": {"a": {"version": 4}}}).encode()
    docs = dataset_docs({LEGACY_STATE_KEY: json.dumps(legacy).encode(), b"ingest-state/a": own})
    assert docs["a"]["datasets"]["a"]["version"] == 4  # its own snapshot wins over the old one
    assert docs["b"]["datasets"]["b"]["version"] == 1  # not written under its own key yet: the old one
    assert route_of(None) is None and route_of([("content-type", b"x")]) is None
    assert route_of([(ROUTE_HEADER, b"feedback")]) == ROUTE_FEEDBACK


def test_records_of_datasets_owned_elsewhere_are_handed_on_to_their_home_partition() -> None:
    store = MemoryStore()
    p = _processor(store)
    p.start_partitioned()
    p.assign(3, [1], lambda: {})  # holds partition 1: owns "tab" only
    values = [_rec("d", "x0"), _rec("tab", "t0"), _rec("gamma", "g0"), _rec("tab", "t1"), b"{broken"]
    values += [_rec("d", "x1", label=None), _rec("nope", "n0")]  # careful path: unlabelled; unknown dataset
    p.on_batch(_batch(values, 0, partition=1))
    out = p.flush()
    handed = _of(out, "data.raw")
    assert [(r.key, r.partition) for r in handed] == [(b"d", 0), (b"gamma", 2), (b"d", 0)]
    assert [r.value for r in handed] == [values[0], values[2], values[5]]  # the original bytes
    assert {r.headers for r in handed} == {()}
    # what is decided without the owner is decided here: unreadable, unknown dataset
    assert len(_of(out, "data.deadletter")) == 2
    assert set(p.state.datasets) == {"tab"} and p.state.datasets["tab"].new_records == 2
    # one snapshot per dataset, under its own key; no snapshot of every dataset
    assert [r.key for r in _of(out, "state")] == [b"ingest-state/tab"]
    assert not any(r.key == STATE_KEY for r in out)
    assert not _of(p.flush(), "state")  # unchanged: not written again
    p.close()


def test_late_labels_and_drift_alerts_reach_the_owner_through_data_raw() -> None:
    store = MemoryStore()
    owner, other = _processor(store), _processor(store)
    for proc, parts in ((owner, [1]), (other, [0, 2])):
        proc.start_partitioned()
        proc.assign(3, parts, lambda: {})
    owner.on_batch(_batch([_rec("tab", "t0", label=None)], 0, partition=1))
    owner.flush()
    assert "t0" in owner._labels.waiting["tab"]
    # the label and an alert arrive at the instance that does not own "tab"
    label = json.dumps({"dataset": "tab", "record_id": "t0", "label": "b"}).encode()
    other.on_batch(_batch([label], 0, partition=0, topic="data.feedback"))
    alert = events_pb2.DriftDetected(model="m", version=1, dataset="tab", test="mmd", statistic=0.5, threshold=0.1)
    key, value, headers = encode(Event(alert, source="/test", key="m"))
    other.on_batch(_batch([value], 0, partition=0, topic="drift.detected", headers=[headers], keys=[key]))
    handed = _of(other.flush(), "data.raw")
    assert [(r.key, r.partition) for r in handed] == [(b"tab", 1), (b"tab", 1)]
    assert dict(handed[0].headers)[ROUTE_HEADER] == ROUTE_FEEDBACK.encode()
    assert dict(handed[1].headers)[ROUTE_HEADER] == ROUTE_DRIFT.encode()
    assert dict(handed[1].headers)["content-type"] == b"application/protobuf"
    # the owner consumes them from data.raw (its home partition), after the records before them
    routed = _batch(
        [r.value or b"" for r in handed], 1, partition=1, headers=[list(r.headers) for r in handed], keys=[b"tab"] * 2
    )
    owner.on_batch(routed)
    out = owner.flush()
    assert not _of(out, "data.deadletter")
    [updated] = _of(out, "data.updated")  # the alert cut a version with the labelled record
    assert updated.key == b"tab"
    ds = owner.state.datasets["tab"]
    assert ds.version == 1 and ds.unlabelled == [] and not owner._labels.waiting["tab"]
    owner.close()
    other.close()


def test_a_dataset_changes_owner_with_its_state_and_versions_go_on_without_gaps() -> None:
    store = MemoryStore()
    topic: dict[bytes, bytes] = {}
    a, b = _processor(store), _processor(store)
    a.start_partitioned()
    a.assign(3, [0, 1, 2], lambda: dict(topic))  # alone: owns every dataset
    offset = 0
    for spec in SPECS:
        a.on_batch(
            _batch([_rec(spec.name, f"{spec.name}-{i}") for i in range(12)], offset, home_partition(spec.name, 3))
        )
        offset += 12
    _apply(topic, out := a.flush())
    assert {r.key for r in _of(out, "data.updated")} == {b"d", b"tab", b"gamma"}  # version 1 of each
    # b joins: the group gives it partition 1 ("tab"); a commits on the revoke and keeps 0 and 2
    a.release()
    a.assign(3, [0, 2], lambda: dict(topic))
    b.start_partitioned()
    b.assign(3, [1], lambda: dict(topic))
    assert set(a.state.datasets) == {"d", "gamma"} and "tab" not in a._seen
    assert set(b.state.datasets) == {"tab"} and b.state.datasets["tab"].version == 1
    # b knows the ids "tab" holds (a duplicate is caught) and cuts version 2
    b.on_batch(_batch([_rec("tab", "tab-3")] + [_rec("tab", f"tab-new-{i}") for i in range(10)], 100, partition=1))
    out = b.flush()
    assert [r.value for r in _of(out, "data.updated")] and b.state.datasets["tab"].version == 2
    assert len(_of(out, "data.deadletter")) == 1  # tab-3 again: duplicate_id
    _apply(topic, out)
    # a record of "tab" that still reaches a goes to b's partition
    a.on_batch(_batch([_rec("tab", "tab-late")], 200, partition=0))
    assert [(r.key, r.partition) for r in _of(a.flush(), "data.raw")] == [(b"tab", 1)]
    # b leaves: a takes partition 1 back and goes on from b's version 2
    b.release()
    a.assign(3, [0, 1, 2], lambda: dict(topic))
    assert a.state.datasets["tab"].version == 2 and "tab-new-3" in a._seen["tab"]
    a.on_batch(_batch([_rec("tab", f"tab-more-{i}") for i in range(10)], 300, partition=1))
    out = a.flush()
    assert a.state.datasets["tab"].version == 3
    assert not _of(out, "data.deadletter")
    a.close()
    b.close()


def test_the_snapshot_of_the_first_releases_is_split_once() -> None:
    store = MemoryStore()
    old = _processor(store)  # a processor owning every dataset writes one snapshot (as releases did)
    old.recover(None)
    for spec in SPECS:
        old.on_batch(_batch([_rec(spec.name, f"{spec.name}-{i}") for i in range(12)], 0, home_partition(spec.name, 3)))
    out = old.flush()
    [legacy] = [r for r in out if r.key == STATE_KEY]
    old.close()
    topic: dict[bytes, bytes] = {STATE_KEY: legacy.value or b""}
    # two instances of the new release: each takes its datasets from the old snapshot...
    a, b = _processor(store), _processor(store)
    a.start_partitioned()
    a.assign(3, [0, 2], lambda: dict(topic))
    b.start_partitioned()
    b.assign(3, [1], lambda: dict(topic))
    assert set(a.state.datasets) == {"d", "gamma"} and set(b.state.datasets) == {"tab"}
    assert all(ds.version == 1 for proc in (a, b) for ds in proc.state.datasets.values())
    # ...and writes them under their own keys at its next flush, once
    out_a, out_b = a.flush(), b.flush()
    assert sorted(r.key for r in _of(out_a, "state")) == [b"ingest-state/d", b"ingest-state/gamma"]
    assert [r.key for r in _of(out_b, "state")] == [b"ingest-state/tab"]
    _apply(topic, out_a + out_b)
    assert not _of(a.flush(), "state") and not _of(b.flush(), "state")
    # from then on the datasets' own snapshots decide (the old one is no longer read for them)
    b.on_batch(_batch([_rec("tab", f"n{i}") for i in range(10)], 50, partition=1))
    _apply(topic, b.flush())
    c = _processor(store)
    c.start_partitioned()
    c.assign(3, [1], lambda: dict(topic))
    assert c.state.datasets["tab"].version == 2
    for proc in (a, b, c):
        proc.close()


def test_a_processor_without_partitions_refuses_records_and_assign_needs_partitioned_mode() -> None:
    store = MemoryStore()
    p = _processor(store)
    p.recover(None)
    with pytest.raises(RuntimeError):  # a processor owning every dataset
        p.assign(3, [0], lambda: {})
    p.start_partitioned()
    with pytest.raises(RuntimeError):  # records before the partitions were assigned
        p.on_batch(_batch([_rec("d", "x")], 0, partition=0))
    p.close()
