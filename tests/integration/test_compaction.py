"""Long runs stay bounded (real Kafka and MinIO): on a trickle of records the state
snapshot keeps its size, small shards are merged without changing what any version
holds, and objects nothing names are swept."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka import Producer as KProducer

from cdl.datasets import DATASETS_BUCKET, DatasetSpec, Task, load_version
from cdl.events import InBatch, decode
from cdl.kafka import read_latest
from cdl.kafka.security import secured
from cdl.store import ObjectStore
from services.ingest.compaction import CompactionPolicy, sweep
from services.ingest.partitions import dataset_state_key
from services.ingest.processor import IngestProcessor
from services.ingest.registry import DatasetRegistry
from tests.integration.test_ingest import LABELS, _json, _register

#: a version's content: id -> (label index, features)
Content = dict[str, tuple[int, tuple[float, ...]]]


def _content(store: ObjectStore, dataset: str, version: int) -> Content:
    data = load_version(store, dataset, version)
    assert data.x is not None
    ids = [str(i) for i in data.ids]
    assert len(ids) == len(set(ids))
    return {rid: (int(lab), tuple(float(v) for v in x)) for rid, lab, x in zip(ids, data.labels, data.x, strict=True)}


class _Versions:
    """data.updated as it comes (one consumer kept open, not a re-read per version)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = Consumer(
            secured(
                {
                    "bootstrap.servers": bootstrap,
                    "group.id": f"t-{uuid.uuid4().hex}",
                    "isolation.level": "read_committed",
                }
            )
        )
        self._consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        self.latest = 0

    def wait_for(self, version: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.latest < version:
            assert time.monotonic() < deadline, f"version {version} did not come (latest {self.latest})"
            for msg in self._consumer.consume(10, 0.1):
                if msg.error() is None:
                    event = decode(msg.key(), msg.value(), list(msg.headers() or []))
                    self.latest = max(self.latest, int(event.payload.version))  # type: ignore[attr-defined]

    def close(self) -> None:
        self._consumer.close()


def test_a_trickle_of_versions_keeps_the_snapshot_small_and_compaction_keeps_every_version(
    ingest_factory: Any, ingest_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    svc = ingest_factory(flush_interval_s="0.2").start()
    name = f"trickle-{uuid.uuid4().hex[:6]}"
    _register(svc, name, min_new_records=6)
    producer = KProducer(secured({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0}))
    versions = _Versions(kafka_bootstrap, ingest_topics["updated"])
    sent: Content = {}
    seen: dict[int, Content] = {}
    rounds, n = 45, 0
    for v in range(1, rounds + 1):
        for _ in range(6):  # one version a round, over the three partitions: many small shards
            features = [float(n), 0.5, -1.0, float(v)]
            producer.produce(ingest_topics["raw"], _json(name, f"r{n}", features, LABELS[n % 3]), partition=n % 3)
            sent[f"r{n}"] = (n % 3, tuple(features))
            n += 1
        producer.flush()
        versions.wait_for(v)
        seen[v] = _content(object_store, name, v)  # as it was published, before any later merge
    versions.close()

    snapshot = read_latest(kafka_bootstrap, ingest_topics["state"], dataset_state_key(name))
    assert snapshot is not None
    assert len(snapshot) < 2000, len(snapshot)  # listing every shard, it was ~30 kB here and grew on

    manifests = [object_store.get_json(DATASETS_BUCKET, f"{name}/versions/{v}.json") for v in range(1, rounds + 1)]
    latest_keys = [e["key"] for e in manifests[-1]["shards"]]
    flush_shards = {e["key"] for m in manifests for e in m["shards"] if "-m" not in e["key"].rsplit("/", 1)[1]}
    assert any("-m" in k.rsplit("/", 1)[1] for k in latest_keys), latest_keys  # later versions name merged shards
    assert len(latest_keys) < len(flush_shards) // 2, (len(latest_keys), len(flush_shards))

    # every version holds what was sent up to it, and reads the same after the merges
    for v in range(1, rounds + 1):
        assert seen[v] == {f"r{i}": sent[f"r{i}"] for i in range(6 * v)}, v
        assert _content(object_store, name, v) == seen[v], v

    # the sweep: an object that nothing names and is older than the grace period goes, the rest stays
    svc.stop()  # (merged shards it had not put in a version yet are orphans now too)
    orphans = [
        f"{name}/shards/p000-000009999990-000009999999.npz",
        f"{name}/unlabelled/p001-000000000001-000000000002.npz",
    ]
    for key in orphans:
        object_store.put_bytes(DATASETS_BUCKET, key, b"left by an aborted flush")
    keep = {e["key"] for e in manifests[-1]["shards"]}  # what the committed state names (nothing pending now)
    named = {e["key"] for m in manifests for e in m["shards"]}
    young = sweep(object_store, name, keep, older_than=time.time() - 3600)  # within the grace period: kept
    assert young == []
    deleted = sweep(object_store, name, keep, older_than=time.time() + 1)
    assert set(orphans) <= set(deleted) and not set(deleted) & named
    left = {o.key for o in object_store.list(DATASETS_BUCKET, prefix=f"{name}/")}
    assert named <= left and not set(orphans) & left
    for v in range(1, rounds + 1):
        assert _content(object_store, name, v) == seen[v], v

    # a restarted service recovers from the latest manifest and goes on
    ingest_factory(flush_interval_s="0.2").start()
    versions = _Versions(kafka_bootstrap, ingest_topics["updated"])
    for _ in range(6):
        features = [float(n), 0.5, -1.0, 0.0]
        producer.produce(ingest_topics["raw"], _json(name, f"r{n}", features, LABELS[n % 3]), partition=n % 3)
        sent[f"r{n}"] = (n % 3, tuple(features))
        n += 1
    producer.produce(ingest_topics["raw"], _json(name, "r0", [0, 0, 0, 0], "a"))  # a duplicate, still known
    producer.flush()
    versions.wait_for(rounds + 1)
    versions.close()
    assert _content(object_store, name, rounds + 1) == sent


def test_the_processor_s_sweep_removes_only_old_orphans(object_store: ObjectStore) -> None:
    name = f"sweep-{uuid.uuid4().hex[:6]}"
    registry = DatasetRegistry(object_store)
    registry.register(DatasetSpec(name=name, task=Task.TABULAR, labels=("a", "b"), input_shape=(4,), min_new_records=3))
    policy = CompactionPolicy(min_shards=0, grace_s=1.0, sweep_interval_s=0.5)
    p = IngestProcessor(registry=registry, store=object_store, source="/t", state_topic="s", compaction=policy)
    p.restore(None)

    def feed(first: int) -> None:
        values: list[bytes | None] = [_json(name, f"r{first + k}", [k, 0, 0, 0], "a") for k in range(3)]
        p.on_batch(InBatch.from_values("data.raw", [0, 0, 0], np.arange(first, first + 3), None, values, None))
        p.flush()

    feed(0)  # version 1
    old = f"{name}/shards/p002-000000000100-000000000200.npz"
    object_store.put_bytes(DATASETS_BUCKET, old, b"orphan")
    feed(3)  # version 2
    p.on_batch(InBatch.from_values("data.raw", [1], [7], None, [_json(name, "pending", [1, 1, 1, 1], "b")], None))
    p.flush()  # a pending shard, named only by the state
    time.sleep(1.6)  # the orphan and every shard so far are older than the grace period now
    young = f"{name}/unlabelled/p002-000000000300-000000000300.npz"
    object_store.put_bytes(DATASETS_BUCKET, young, b"orphan, but young")
    p.flush()  # the sweep is due: it starts in the background
    assert p._housekeeping.job is not None
    p._housekeeping.job.result(timeout=30)
    left = {o.key for o in object_store.list(DATASETS_BUCKET, prefix=f"{name}/")}
    ds = p.state.datasets[name]
    assert old not in left and young in left
    assert {s.key for s in ds.shards} <= left and len(ds.pending) == 1
    assert sorted(map(str, load_version(object_store, name, 2).ids)) == [f"r{i}" for i in range(6)]
    p.close()


def test_pending_shards_of_a_distant_count_policy_keep_the_snapshot_under_its_cap(
    ingest_factory: Any, ingest_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    """A count policy far away, a trickle over the three partitions: a pending shard per
    partition and flush, each ~213 bytes in the snapshot. Over state_max_bytes they are
    merged (before, ~4,700 of them passed Kafka's 1 MB and every flush failed from then on)."""
    cap = 4000
    svc = ingest_factory(flush_interval_s="0.2", state_max_bytes=str(cap), compact_min_shards="0").start()
    name = f"distant-{uuid.uuid4().hex[:6]}"
    _register(svc, name, min_new_records=1_000_000)
    producer = KProducer(secured({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0}))
    sent: Content = {}
    sizes: list[int] = []
    n = 0
    for _ in range(25):
        for partition in range(3):
            features = [float(n), 0.5, -1.0, 2.0]
            producer.produce(ingest_topics["raw"], _json(name, f"r{n}", features, LABELS[n % 3]), partition=partition)
            sent[f"r{n}"] = (n % 3, tuple(features))
            n += 1
        producer.flush()
        deadline = time.monotonic() + 30
        while True:  # until a snapshot holds every record sent (one flush or more later)
            snapshot = read_latest(kafka_bootstrap, ingest_topics["state"], dataset_state_key(name))
            doc = json.loads(snapshot) if snapshot else {"datasets": {}}
            pending = doc["datasets"].get(name, {}).get("pending", [])
            if sum(s["records"] for s in pending) == n:
                break
            assert time.monotonic() < deadline, (n, pending)
            time.sleep(0.1)
        assert snapshot is not None
        sizes.append(len(snapshot))
    assert max(sizes) <= cap, sizes
    assert any("-m" in s["key"] for s in pending) and len(pending) < 25 * 3 // 2, pending
    # a version (the policy lowered) holds every record once, merged shards and all
    _register(svc, name, min_new_records=1)
    producer.produce(ingest_topics["raw"], _json(name, f"r{n}", [float(n), 0.5, -1.0, 2.0], "a"), partition=0)
    sent[f"r{n}"] = (0, (float(n), 0.5, -1.0, 2.0))
    producer.flush()
    # the lowered policy may cut version 1 from the pending records before r75 is read, then
    # version 2 adds it: each version holds every record once, and the last one holds them all
    versions = _Versions(kafka_bootstrap, ingest_topics["updated"])
    versions.wait_for(1)
    older = {f"r{i}": sent[f"r{i}"] for i in range(n)}
    if _content(object_store, name, 1) != sent:
        assert _content(object_store, name, 1) == older
        versions.wait_for(2)
    versions.close()
    assert _content(object_store, name, versions.latest) == sent
