"""Ingest state and version policy (pure logic, JSON-serialisable).

The state is what must survive a crash: per dataset the committed shards, how
many of them the latest version holds, the latest version and its time. It is
written to a compacted Kafka topic in the same transaction as the input
offsets, the dead letters and the ``data.updated`` events it accounts for, so
after a kill -9 the service resumes exactly where the last transaction left it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cdl.datasets import DatasetSpec, Shard
from cdl.events import Topics

__all__ = ["DatasetState", "IngestState", "build_manifest", "policy_due"]


@dataclass
class DatasetState:
    version: int = 0
    last_version_at: float = 0.0
    shards: list[Shard] = field(default_factory=list)
    versioned_shards: int = 0  # shards[:versioned_shards] are in the latest version
    unlabelled: list[Shard] = field(default_factory=list)  # records waiting for a label (data.feedback)

    @property
    def pending(self) -> list[Shard]:
        return self.shards[self.versioned_shards :]

    @property
    def new_records(self) -> int:
        return sum(s.records for s in self.pending)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "last_version_at": self.last_version_at,
            "versioned_shards": self.versioned_shards,
            "shards": [s.to_json() for s in self.shards],
            "unlabelled": [s.to_json() for s in self.unlabelled],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DatasetState:
        return cls(
            version=int(doc["version"]),
            last_version_at=float(doc["last_version_at"]),
            shards=[Shard.from_json(s) for s in doc["shards"]],
            versioned_shards=int(doc["versioned_shards"]),
            unlabelled=[Shard.from_json(s) for s in doc.get("unlabelled", [])],
        )


@dataclass
class IngestState:
    datasets: dict[str, DatasetState] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    def dataset(self, name: str, first_seen: float | None = None) -> DatasetState:
        """The dataset's state; a new dataset's time policy counts from its first record."""
        if name not in self.datasets:
            self.datasets[name] = DatasetState(last_version_at=first_seen or time.time())
        return self.datasets[name]

    def to_json(self) -> dict[str, Any]:
        return {"datasets": {n: d.to_json() for n, d in sorted(self.datasets.items())}}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> IngestState:
        return cls(datasets={n: DatasetState.from_json(d) for n, d in doc.get("datasets", {}).items()})


def policy_due(spec: DatasetSpec, state: DatasetState, now: float) -> bool:
    """Should a new version be committed now?"""
    new = state.new_records
    if new <= 0:
        return False
    if spec.min_new_records > 0 and new >= spec.min_new_records:
        return True
    return spec.max_interval_s > 0 and now - state.last_version_at >= spec.max_interval_s


def build_manifest(
    spec: DatasetSpec, state: DatasetState, version: int, now: float, raw_topic: str = Topics.DATA_RAW
) -> dict[str, Any]:
    """The manifest of ``version``: every committed shard, the new ones marked."""
    histogram: Counter[str] = Counter()
    new_histogram: Counter[str] = Counter()
    ranges: dict[int, list[int]] = {}
    shards = []
    for i, shard in enumerate(state.shards):
        is_new = i >= state.versioned_shards
        histogram.update(shard.label_histogram)
        if is_new:
            new_histogram.update(shard.label_histogram)
        lo_hi = ranges.setdefault(shard.partition, [shard.first_offset, shard.last_offset])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], shard.first_offset), max(lo_hi[1], shard.last_offset)
        shards.append({**shard.to_json(), "new": is_new})
    return {
        "dataset": spec.name,
        "version": version,
        "previous_version": version - 1 if version > 1 else None,
        "created_at": now,
        "schema_hash": spec.schema_hash,
        "spec": spec.to_json(),
        "shards": shards,
        "total_records": sum(s.records for s in state.shards),
        "new_records": state.new_records,
        "train_records": sum(s.train for s in state.shards),
        "holdout_records": sum(s.holdout for s in state.shards),
        "label_histogram": dict(sorted(histogram.items())),
        "new_label_histogram": dict(sorted(new_histogram.items())),
        "offset_ranges": [
            {"topic": raw_topic, "partition": p, "first": lo, "last": hi} for p, (lo, hi) in sorted(ranges.items())
        ],
    }
