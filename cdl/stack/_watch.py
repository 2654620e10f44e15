"""A live view of the local stack: components, topics and stored artifacts."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from cdl.events import Topics
from cdl.store import BUCKETS, ObjectStore

__all__ = ["Snapshot", "StackObserver"]

_DATASET_VERSION = re.compile(r"^([^/]+)/versions/(\d+)\.json$")
_MODEL_FILE = re.compile(r"^([^/]+)/(\d+)/(claim|compression)\.json$")
_STUDY_FILE = re.compile(r"^([^/]+)/studies/(.+)-(\d+)\.json$")


@dataclass
class Snapshot:
    components: list[dict[str, Any]]
    topics: dict[str, int] = field(default_factory=dict)
    objects: dict[str, int] = field(default_factory=dict)
    datasets: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class StackObserver:
    """Reads record counts per topic and object counts per bucket."""

    def __init__(self, state: dict[str, Any]) -> None:
        from confluent_kafka import Consumer

        self._consumer = Consumer(
            {
                "bootstrap.servers": state["kafka"]["bootstrap"],
                "group.id": "cdl-cli-observer",
                "enable.auto.commit": False,
                "log_level": 0,
            }
        )
        m = state["minio"]
        self._store = ObjectStore(m["endpoint"], m["access_key"], m["secret_key"])

    def topic_counts(self) -> dict[str, int]:
        from confluent_kafka import TopicPartition

        counts: dict[str, int] = {}
        md = self._consumer.list_topics(timeout=2)
        for name in Topics.PARTITIONS:
            topic = md.topics.get(name)
            if topic is None:
                continue
            total = 0
            for p in topic.partitions:
                low, high = self._consumer.get_watermark_offsets(TopicPartition(name, p), timeout=2)
                total += max(0, high - low)
            counts[name] = total
        return counts

    def datasets(self, keys: list[str]) -> list[dict[str, Any]]:
        """Each registered dataset with its newest version's counts (``keys``: the bucket's listing)."""
        from cdl.datasets import DATASETS_BUCKET

        names = sorted({k.split("/")[0] for k in keys if k.endswith("/dataset.json")})
        versions: dict[str, list[int]] = defaultdict(list)
        for k in keys:
            m = _DATASET_VERSION.match(k)
            if m:
                versions[m.group(1)].append(int(m.group(2)))
        rows = []
        for name in names:
            row: dict[str, Any] = {"dataset": name, "version": max(versions[name], default=0)}
            if versions[name]:
                m = self._store.get_json(DATASETS_BUCKET, f"{name}/versions/{row['version']}.json")
                row |= {
                    "records": m["total_records"],
                    "new": m["new_records"],
                    "holdout": m["holdout_records"],
                    "shards": len(m["shards"]),
                }
            rows.append(row)
        return rows

    def models(self, keys: list[str]) -> list[dict[str, Any]]:
        """Each model with its newest version's verdict, the champion and the newest compression."""
        from cdl.registry import MODELS_BUCKET, ModelRegistry

        registry = ModelRegistry(self._store)
        versions: dict[str, list[int]] = defaultdict(list)
        compressed: dict[str, list[int]] = defaultdict(list)
        studies: dict[str, dict[int, str]] = defaultdict(dict)
        for k in keys:
            st = _STUDY_FILE.match(k)
            if st:
                studies[st.group(1)][int(st.group(3))] = k
                continue
            m = _MODEL_FILE.match(k)
            if m and m.group(3) == "claim":
                versions[m.group(1)].append(int(m.group(2)))
            elif m and m.group(3) == "compression":
                compressed[m.group(1)].append(int(m.group(2)))
        rows = []
        for name in sorted(versions):
            newest = max(versions[name])
            result = registry.result(name, newest)
            row: dict[str, Any] = {"model": name, "version": newest, "champion": registry.champion(name) or "-"}
            if result is None:
                row["verdict"] = "training"
            else:
                row["verdict"] = "accepted" if result["accepted"] else "rejected"
                row["accuracy"] = f"{result['challenger_accuracy']:.4f}"
            if compressed[name]:
                last = max(compressed[name])
                doc = self._store.get_json(MODELS_BUCKET, f"{name}/{last}/compression.json")
                row["compressed"] = f"v{last} {doc['chosen'] or 'failed'}"
            if studies[name]:
                doc = self._store.get_json(MODELS_BUCKET, studies[name][max(studies[name])])
                best = doc["objective_values"][0] if doc["objective_values"] else float("nan")
                row["tuned"] = f"{doc['study']} {best:.4f} ({doc['complete']} done, {doc['pruned']} pruned)"
            rows.append(row)
        return rows

    def snapshot(self, components: list[dict[str, Any]]) -> Snapshot:
        from cdl.datasets import DATASETS_BUCKET
        from cdl.registry import MODELS_BUCKET

        snap = Snapshot(components)
        try:
            snap.topics = self.topic_counts()
        except Exception as exc:  # noqa: BLE001 - shown to the user, view goes on
            snap.errors.append(f"kafka: {exc}")
        try:
            keys = {b: [o.key for o in self._store.list(b)] for b in BUCKETS}  # one listing per bucket
            snap.objects = {b: len(k) for b, k in keys.items()}
            snap.datasets = self.datasets(keys[DATASETS_BUCKET])
            snap.models = self.models(keys[MODELS_BUCKET])
        except Exception as exc:  # noqa: BLE001
            snap.errors.append(f"minio: {exc}")
        return snap

    def close(self) -> None:
        self._consumer.close()
