"""A live view of the local stack: components, topics and stored artifacts."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from cdl.events import Topics
from cdl.kafka.security import secured
from cdl.store import BUCKETS
from cdl_tools.stack import stack_store

__all__ = ["HealthReader", "Snapshot", "StackObserver"]

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
    health: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class StackObserver:
    """Reads record counts per topic and object counts per bucket."""

    def __init__(self, state: dict[str, Any]) -> None:
        from confluent_kafka import Consumer

        self._consumer = Consumer(
            secured(
                {
                    "bootstrap.servers": state["kafka"]["bootstrap"],
                    "group.id": "cdl-cli-observer",
                    "enable.auto.commit": False,
                    "log_level": 0,
                }
            )
        )
        self._store = stack_store(state)

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
        from cdl.registry import MODELS_BUCKET, ModelRegistry, score_of

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
                row["score"] = f"{result.get('metric', 'accuracy')} {score_of(result, 'challenger') or 0.0:.4f}"
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


class HealthReader:
    """The monitor's output, read from the start and then as it comes: the newest health window
    of each (model, version) on ``model.health`` and every alert on ``drift.detected``.

    An alert is open while no newer version of its model has served (has a health window
    that ended after the alert); the version trained on what came since answers it.

    ``also``: more topics to read; with ``keep``, every decoded event of every topic is kept in
    :attr:`history` as ``(topic, Kafka timestamp in seconds, payload)`` (the report's input).
    """

    def __init__(
        self,
        bootstrap: str,
        topics: tuple[str, str] = (Topics.MODEL_HEALTH, Topics.DRIFT_DETECTED),
        also: tuple[str, ...] = (),
        keep: bool = False,
    ) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self._health_topic, self._drift_topic = topics
        self._keep = keep
        self.history: list[tuple[str, float, Any]] = []
        self._consumer = Consumer(
            secured(
                {
                    "bootstrap.servers": bootstrap,
                    "group.id": "cdl-cli-health",
                    "enable.auto.commit": False,
                    "log_level": 0,
                }
            )
        )
        md = self._consumer.list_topics(timeout=5)
        parts = [
            TopicPartition(t, p, OFFSET_BEGINNING)
            for t in (*topics, *also)
            if (found := md.topics.get(t)) is not None and found.error is None
            for p in found.partitions
        ]
        self._consumer.assign(parts)
        self._parts = parts
        self.latest: dict[tuple[str, int], Any] = {}
        self.alerts: dict[tuple[str, int], Any] = {}

    def _behind(self, read: dict[tuple[str, int], int]) -> bool:
        """Whether some partition has records past what was read. The consumer's position counts
        too: on a transactional topic the last offset is a commit marker, never delivered, which
        the position steps over."""
        positions = {(tp.topic, tp.partition): tp.offset for tp in self._consumer.position(self._parts)}
        for tp in self._parts:
            _, high = self._consumer.get_watermark_offsets(tp, timeout=2, cached=False)
            at = max(read.get((tp.topic, tp.partition), -1) + 1, positions.get((tp.topic, tp.partition), -1))
            if at < high:
                return True
        return False

    def poll(self, timeout_s: float = 2.0) -> None:
        """Read what arrived: up to the end of every partition as it is now (or ``timeout_s``)."""
        import time

        from cdl.errors import DecodeError
        from cdl.events import decode
        from cdl.v1 import events_pb2

        deadline = time.monotonic() + timeout_s
        read: dict[tuple[str, int], int] = {}
        for tp in self._consumer.position(self._parts):
            if tp.offset >= 0:
                read[(tp.topic, tp.partition)] = tp.offset - 1
        while time.monotonic() < deadline:
            msgs = self._consumer.consume(500, timeout=0.3)
            for msg in msgs:
                if msg.error() is None:
                    read[(msg.topic() or "", msg.partition() or 0)] = msg.offset() or 0
            if not msgs and not self._behind(read):
                return
            for msg in msgs:
                if msg.error() is not None:
                    continue
                try:
                    raw = msg.headers() or []
                    headers = list(raw.items()) if isinstance(raw, dict) else list(raw)
                    event = decode(msg.key(), msg.value(), headers)
                except DecodeError:
                    continue
                pl = event.payload
                if self._keep:
                    self.history.append((msg.topic() or "", (msg.timestamp()[1] or 0) / 1000.0, pl))
                if isinstance(pl, events_pb2.ModelHealth):
                    key = (pl.model, int(pl.version))
                    old = self.latest.get(key)
                    if old is None or old.window_end.ToNanoseconds() <= pl.window_end.ToNanoseconds():
                        self.latest[key] = pl
                elif isinstance(pl, events_pb2.DriftDetected):
                    self.alerts[(pl.model, int(pl.version))] = pl  # a re-sent alert is the same alert

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for (model, version), h in sorted(self.latest.items()):
            out.append(
                {
                    "model": model,
                    "version": version,
                    "window_end": h.window_end.ToJsonString(),
                    "requests": h.requests,
                    "errors": h.errors,
                    "p50_ms": round(h.latency_p50_ms, 3),
                    "p99_ms": round(h.latency_p99_ms, 3),
                    "score": round(h.score, 4) if h.feedback else None,
                    "metric": h.metric or "accuracy",
                    "feedback": h.feedback,
                    "drift": round(h.drift_statistic, 5) if h.drift_threshold else None,
                    "drift_threshold": round(h.drift_threshold, 5) if h.drift_threshold else None,
                }
            )
        return out

    def alert_rows(self) -> list[dict[str, Any]]:
        out = []
        for a in self.alerts.values():
            at = a.window_end.ToNanoseconds()
            newer = [
                v
                for (m, v), h in self.latest.items()
                if m == a.model and v > a.version and h.window_end.ToNanoseconds() > at
            ]
            out.append(
                {
                    "model": a.model,
                    "version": a.version,
                    "dataset": a.dataset,
                    "test": a.test,
                    "statistic": round(a.statistic, 5),
                    "threshold": round(a.threshold, 5),
                    "at": a.window_end.ToJsonString(),
                    "state": f"answered by v{min(newer)}" if newer else "open",
                }
            )
        return out

    def close(self) -> None:
        self._consumer.close()
