"""Ingest state and version policy (pure logic, JSON-serialisable).

The state is what must survive a crash: per dataset the latest version (its
number, time and manifest), the shards committed since (``pending``, not yet
in a version) and the shards of records waiting for a label. It is written to
a compacted Kafka topic in the same transaction as the input offsets, the dead
letters and the ``data.updated`` events it accounts for, so after a kill -9
the service resumes exactly where the last transaction left it.

The snapshot stays small however long the service runs: the shards of the
latest version (``versioned``) are not in it but in that version's manifest,
which is written to the object store before the transaction that publishes the
version commits, and read back on recovery. Snapshots written before this
format (every shard listed, ``versioned_shards`` counting those in the latest
version) still load.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cdl.datasets import DatasetSpec, Shard, manifest_key
from cdl.errors import ConflictError
from cdl.events import Topics

__all__ = ["STATE_FORMAT", "DatasetState", "IngestState", "build_manifest", "manifest_key", "policy_due"]

#: the snapshot format :meth:`IngestState.to_json` writes (1: every shard listed)
STATE_FORMAT = 2

#: reads a manifest by key (the processor's object store; a dict in tests)
ManifestReader = Callable[[str], dict[str, Any]]


@dataclass
class DatasetState:
    """One dataset's part of the ingest state.

    ``versioned`` (the shards of the latest version, in manifest order) lives in
    memory only; :meth:`to_json` writes ``pending`` and ``unlabelled`` in full and
    of the versioned shards only their totals.
    """

    version: int = 0
    last_version_at: float = 0.0
    versioned: list[Shard] = field(default_factory=list)
    pending: list[Shard] = field(default_factory=list)  # committed, not yet in a version
    unlabelled: list[Shard] = field(default_factory=list)  # records waiting for a label (data.feedback)
    drift_alert: str = ""  # a standing drift.detected alert: the next version comes with any new record

    @property
    def shards(self) -> list[Shard]:
        """Every labelled shard committed: the latest version's, then the pending ones."""
        return self.versioned + self.pending

    @property
    def new_records(self) -> int:
        return sum(s.records for s in self.pending)

    def to_json(self, name: str) -> dict[str, Any]:
        return {
            "version": self.version,
            "last_version_at": self.last_version_at,
            "manifest": manifest_key(name, self.version) if self.version else None,
            "versioned": {
                "shards": len(self.versioned),
                "records": sum(s.records for s in self.versioned),
                "train": sum(s.train for s in self.versioned),
                "holdout": sum(s.holdout for s in self.versioned),
            },
            "pending": [s.to_json() for s in self.pending],
            "unlabelled": [s.to_json() for s in self.unlabelled],
            **({"drift_alert": self.drift_alert} if self.drift_alert else {}),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], read_manifest: ManifestReader | None = None) -> DatasetState:
        """The state from :meth:`to_json`'s document (the versioned shards read from the
        latest manifest with ``read_manifest``), or from a format 1 document."""
        unlabelled = [Shard.from_json(s) for s in doc.get("unlabelled", [])]
        version, at = int(doc["version"]), float(doc["last_version_at"])
        if "shards" in doc:  # format 1: every shard, the first versioned_shards in the latest version
            shards = [Shard.from_json(s) for s in doc["shards"]]
            n = int(doc["versioned_shards"])
            return cls(version, at, shards[:n], shards[n:], unlabelled, str(doc.get("drift_alert", "")))
        versioned: list[Shard] = []
        if doc.get("manifest"):
            if read_manifest is None:
                raise ValueError("a snapshot naming a manifest needs read_manifest")
            manifest = read_manifest(str(doc["manifest"]))
            versioned = [Shard.from_json({k: v for k, v in e.items() if k != "new"}) for e in manifest["shards"]]
            expected = doc.get("versioned", {})
            got = {"shards": len(versioned), "records": sum(s.records for s in versioned)}
            if int(manifest["version"]) != version or any(expected.get(k, v) != v for k, v in got.items()):
                raise ConflictError("ingest state and manifest disagree", manifest=doc["manifest"], state=expected)
        pending = [Shard.from_json(s) for s in doc["pending"]]
        return cls(version, at, versioned, pending, unlabelled, str(doc.get("drift_alert", "")))

    def referenced(self) -> set[str]:
        """Keys of every object this state refers to."""
        return {s.key for s in self.versioned} | {s.key for s in self.pending} | {s.key for s in self.unlabelled}

    def replace_versioned(self, inputs: list[str], merged: Shard) -> bool:
        """Put ``merged`` where the versioned shards ``inputs`` were (compaction); False,
        changing nothing, when they are not all there any more."""
        return self.replace("versioned", inputs, merged)

    def replace(self, where: str, inputs: list[str], merged: Shard) -> bool:
        """Put ``merged`` where the shards ``inputs`` of the list ``where`` (``versioned``,
        ``pending`` or ``unlabelled``) were; False, changing nothing, when they are not all
        there any more."""
        if where not in ("versioned", "pending", "unlabelled"):
            raise ValueError(f"no shard list {where!r}")
        shards: list[Shard] = getattr(self, where)
        keys = [s.key for s in shards]
        if not inputs or any(k not in keys for k in inputs):
            return False
        drop = set(inputs)
        at = keys.index(inputs[0])
        kept = [s for s in shards if s.key not in drop]
        kept.insert(sum(1 for k in keys[:at] if k not in drop), merged)
        setattr(self, where, kept)
        return True


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
        return {"format": STATE_FORMAT, "datasets": {n: d.to_json(n) for n, d in sorted(self.datasets.items())}}

    @classmethod
    def from_json(cls, doc: dict[str, Any], read_manifest: ManifestReader | None = None) -> IngestState:
        """The state of a snapshot (any format); ``read_manifest`` reads the latest manifests."""
        return cls(datasets={n: DatasetState.from_json(d, read_manifest) for n, d in doc.get("datasets", {}).items()})

    def referenced(self) -> set[str]:
        """Keys of every object the state refers to, over all datasets."""
        return set().union(*(d.referenced() for d in self.datasets.values()))


def policy_due(spec: DatasetSpec, state: DatasetState, now: float) -> bool:
    """Should a new version be committed now?"""
    new = state.new_records
    if new <= 0:
        return False
    if state.drift_alert:  # the served inputs moved away from the training data: retrain on what came
        return True
    if spec.min_new_records > 0 and new >= spec.min_new_records:
        return True
    return spec.max_interval_s > 0 and now - state.last_version_at >= spec.max_interval_s


def build_manifest(
    spec: DatasetSpec, state: DatasetState, version: int, now: float, raw_topic: str = Topics.DATA_RAW
) -> dict[str, Any]:
    """The manifest of ``version``: every committed shard, the new (pending) ones marked."""
    histogram: Counter[str] = Counter()
    new_histogram: Counter[str] = Counter()
    ranges: dict[int, list[int]] = {}
    shards = []
    every = state.shards
    for i, shard in enumerate(every):
        is_new = i >= len(state.versioned)
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
        "total_records": sum(s.records for s in every),
        "new_records": state.new_records,
        "train_records": sum(s.train for s in every),
        "holdout_records": sum(s.holdout for s in every),
        "label_histogram": dict(sorted(histogram.items())),
        "new_label_histogram": dict(sorted(new_histogram.items())),
        "offset_ranges": [
            {"topic": raw_topic, "partition": p, "first": lo, "last": hi} for p, (lo, hi) in sorted(ranges.items())
        ],
    }
