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

    def snapshot(self, components: list[dict[str, Any]]) -> Snapshot:
        snap = Snapshot(components)
        try:
            snap.topics = self.topic_counts()
        except Exception as exc:  # noqa: BLE001 - shown to the user, view goes on
            snap.errors.append(f"kafka: {exc}")
        try:
            snap.objects = self.object_counts()
        except Exception as exc:  # noqa: BLE001
            snap.errors.append(f"minio: {exc}")
        return snap

    def close(self) -> None:
        self._consumer.close()
