"""Ingest as replicas on the real broker (issue 28): separate ``python -m services.ingest``
processes in one group share ``data.raw``'s partitions; each dataset is owned by the instance
holding its home partition (services/ingest/partitions.py). An instance added and one killed -9
mid-stream lose and double nothing: every record is in exactly one committed version's new
shards, each dataset's versions are numbered 1, 2, 3, ... once each, and nothing is
dead-lettered (a record read twice would be a ``duplicate_id``)."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

from confluent_kafka import Producer as KProducer

from cdl.datasets import DATASETS_BUCKET, decode_shard
from cdl.kafka.security import secured
from cdl.store import ObjectStore
from services.ingest.partitions import home_partition
from tests.helpers import read_committed, wait_for
from tests.integration.test_ingest import LABELS, _check_manifest, _json, _register, _updates


def _names(uid: str) -> list[str]:
    """Three dataset names whose home partitions (of 3) are 0, 1 and 2."""
    by_home: dict[int, str] = {}
    k = 0
    while len(by_home) < 3:
        name = f"rep{k}-{uid}"
        by_home.setdefault(home_partition(name, 3), name)
        k += 1
    return [by_home[p] for p in range(3)]


def _committed_versions(log: str) -> int:
    return log.count("dataset version committed")


def test_two_instances_share_datasets_and_survive_an_added_and_a_killed_instance(
    ingest_factory: Any, ingest_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    raw, feedback = ingest_topics["raw"], ingest_topics["feedback"]
    settings = {"shard_max_records": "600", "batch_size": "300"}
    a = ingest_factory(instance="a", **settings).start()
    b = ingest_factory(instance="b", **settings).start()
    names = _names(uuid.uuid4().hex[:6])
    for name in names:
        _register(a, name, min_new_records=300, max_interval_s=1.0)
    producer = KProducer(secured({"bootstrap.servers": kafka_bootstrap, "linger.ms": 10}))
    homes: Counter[tuple[str, int]] = Counter()

    def delivered(err: Any, msg: Any) -> None:
        assert err is None, err
        homes[(msg.key().decode() if msg.key() else "", msg.partition())] += 1

    sent: dict[str, set[str]] = {name: set() for name in names}
    unlabelled: dict[str, list[str]] = {name: [] for name in names}

    def wave(start: int, n: int) -> None:
        for i in range(start, start + n):
            for d, name in enumerate(names):
                rid = f"r{i}"
                label: Any = LABELS[i % 3]
                if i < 30:  # waits for its label on data.feedback (sent later, to any instance)
                    label = None
                    unlabelled[name].append(rid)
                value = _json(name, rid, [float(i), float(d), 0.5, -1.0], label)
                if i % 20 == 7:  # keyed otherwise: handed on to the dataset's owner
                    producer.produce(raw, value, partition=(home_partition(name, 3) + 1) % 3)
                else:  # keyed by dataset: librdkafka's partitioner puts it on its home partition
                    producer.produce(raw, value, key=name.encode(), on_delivery=delivered)
                sent[name].add(rid)
            producer.poll(0)
        producer.flush(30)

    def latest(name: str) -> int:  # records in the dataset's latest committed version
        versions = [v for v in _updates(kafka_bootstrap, ingest_topics["updated"], 10**6, 2) if v.dataset == name]
        return versions[-1].total_records if versions else 0

    replicas = [a, b]
    try:
        wave(0, 600)
        # the test's producer (librdkafka's partitioner, as the gRPC API's) puts a dataset where ingest says
        assert all(p == home_partition(name, 3) for name, p in homes), homes
        # every labelled record in a version: the unlabelled ones (handed on before the later
        # records of their partition) are committed by their owner; now their labels may come
        labelled = 600 - 30
        wait_for(lambda: all(latest(n) >= labelled for n in names), 90, "the first records in versions")
        assert all("dataset version committed" in r.log_path.read_text() for r in replicas), "both did work"
        fb = KProducer(secured({"bootstrap.servers": kafka_bootstrap}))
        for name in names:
            for rid in unlabelled[name]:
                fb.produce(feedback, f'{{"dataset": "{name}", "record_id": "{rid}", "label": "a"}}'.encode())
        fb.flush(30)
        c = ingest_factory(instance="c", **settings).start()  # an instance added under load
        replicas.append(c)
        wave(600, 400)
        a.kill()  # kill -9 mid-stream; restarted under its name (as a StatefulSet's pod is): it fences its past
        wave(1000, 300)
        replicas[0] = ingest_factory(instance="a", **settings).start()
        wave(1300, 300)
        wait_for(lambda: all(latest(n) == len(sent[n]) for n in names), 90, "every record in a version")
    finally:
        producer.flush(10)
        dead = read_committed(kafka_bootstrap, ingest_topics["deadletter"], expected=10**6, timeout_s=2)
        assert not dead, [(d.headers.get("cdl-reason"), d.value[:80]) for d in dead[:5]]
    updates = _updates(kafka_bootstrap, ingest_topics["updated"], 10**6, 3)
    for name in names:
        numbers = [v.version for v in updates if v.dataset == name]
        assert numbers == list(range(1, len(numbers) + 1)), (name, numbers)  # once each, no gap, no clash
        news: list[str] = []
        for version in numbers:
            manifest = _check_manifest(object_store, name, version)  # ids unique within a version
            for entry in manifest["shards"]:
                if entry["new"]:
                    news += [str(i) for i in decode_shard(object_store.get_bytes(DATASETS_BUCKET, entry["key"]))["id"]]
        doubled = [rid for rid, k in Counter(news).items() if k > 1]
        assert not doubled, (name, doubled[:10])  # new in one version only
        assert set(news) == sent[name], (name, len(sent[name] - set(news)), "missing")
        last = object_store.get_json(DATASETS_BUCKET, f"{name}/versions/{numbers[-1]}.json")
        assert last["total_records"] == len(sent[name])
