"""A live view of the local stack: components, topics and stored artifacts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cdl.events import Topics
from cdl.store import BUCKETS, ObjectStore

__all__ = ["Snapshot", "StackObserver"]


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

    def object_counts(self) -> dict[str, int]:
        return {b: sum(1 for _ in self._store.list(b)) for b in BUCKETS}

    def datasets(self) -> list[dict[str, Any]]:
        """Each registered dataset with its newest version's counts."""
        from cdl.datasets import DATASETS_BUCKET

        rows = []
        names = sorted(
            {o.key.split("/")[0] for o in self._store.list(DATASETS_BUCKET) if o.key.endswith("/dataset.json")}
        )
        for name in names:
            versions = [
                int(o.key.rsplit("/", 1)[1].split(".")[0])
                for o in self._store.list(DATASETS_BUCKET, prefix=f"{name}/versions/")
            ]
            row: dict[str, Any] = {"dataset": name, "version": max(versions, default=0)}
            if versions:
                m = self._store.get_json(DATASETS_BUCKET, f"{name}/versions/{row['version']}.json")
                row |= {
                    "records": m["total_records"],
                    "new": m["new_records"],
                    "holdout": m["holdout_records"],
                    "shards": len(m["shards"]),
                }
            rows.append(row)
        return rows

    def models(self) -> list[dict[str, Any]]:
        """Each model with its newest version's verdict and the champion."""
        from cdl.registry import MODELS_BUCKET, ModelRegistry

        registry = ModelRegistry(self._store)
        names = sorted({o.key.split("/")[0] for o in self._store.list(MODELS_BUCKET) if o.key.endswith("/claim.json")})
        rows = []
        for name in names:
            versions = registry.versions(name)
            newest = versions[-1] if versions else 0
            result = registry.result(name, newest) if newest else None
            row: dict[str, Any] = {"model": name, "version": newest, "champion": registry.champion(name) or "-"}
            if result is None:
                row["verdict"] = "training"
            else:
                row["verdict"] = "accepted" if result["accepted"] else "rejected"
                row["accuracy"] = f"{result['challenger_accuracy']:.4f}"
            compressed = [v for v in versions[-5:] if self._store.exists(MODELS_BUCKET, f"{name}/{v}/compression.json")]
            if compressed:
                doc = self._store.get_json(MODELS_BUCKET, f"{name}/{compressed[-1]}/compression.json")
                row["compressed"] = f"v{compressed[-1]} {doc['chosen'] or 'failed'}"
            rows.append(row)
        return rows

    def snapshot(self, components: list[dict[str, Any]]) -> Snapshot:
        snap = Snapshot(components)
        try:
            snap.topics = self.topic_counts()
        except Exception as exc:  # noqa: BLE001 - shown to the user, view goes on
            snap.errors.append(f"kafka: {exc}")
        try:
            snap.objects = self.object_counts()
            snap.datasets = self.datasets()
            snap.models = self.models()
        except Exception as exc:  # noqa: BLE001
            snap.errors.append(f"minio: {exc}")
        return snap

    def close(self) -> None:
        self._consumer.close()
