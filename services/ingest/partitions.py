"""Which instance owns a dataset, and the state snapshots per dataset (pure logic, no Kafka).

Ingest runs as several instances in one consumer group; partitions of ``data.raw`` are the unit
of parallelism. A dataset is *owned* by the instance that holds its **home partition**: the
partition its name, as a record key, goes to under librdkafka's default partitioner (CRC-32 of
the key modulo the partition count: :func:`home_partition`), which is where the gRPC API and any
producer keying by dataset put its records. The owner alone buffers the dataset's records, cuts
its versions (one writer: version numbers have no gaps and no clashes) and writes its state.

An instance that meets a record of a dataset it does not own (a producer that keyed otherwise,
or none) hands it on: the record is produced again, keyed by its dataset, to the home partition,
in the same transaction that commits the offset it was consumed at (so it is neither lost nor
doubled), and counted. Late labels (``data.feedback``) and drift alerts (``drift.detected``, keyed
by model) are handed on the same way, to ``data.raw`` with the header ``cdl-route`` saying what
they are: so they reach the dataset's owner after the records consumed before them, whatever
the other topics' partition counts are (:data:`ROUTE_HEADER`).

The state is one snapshot **per dataset**, key ``ingest-state/<dataset>`` of the compacted
state topic, each an ordinary state document holding one dataset (:func:`dataset_state_key`).
A dataset's snapshot follows the dataset, not a partition: when the partition count grows and a
dataset's home moves, its new owner finds its state under the same key. The snapshot of the
first releases, every dataset under one key (``ingest-state``, :data:`LEGACY_STATE_KEY`), is
split on the way in: a dataset without a snapshot of its own is taken from it
(:func:`dataset_docs`), and its owner writes it under its own key at its next flush.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cdl.events import Headers, key_partition

__all__ = [
    "DATASET_KEY_PREFIX",
    "LEGACY_STATE_KEY",
    "ROUTE_DRIFT",
    "ROUTE_FEEDBACK",
    "ROUTE_HEADER",
    "Routing",
    "dataset_docs",
    "dataset_of_key",
    "dataset_snapshot",
    "dataset_state_key",
    "home_partition",
    "route_of",
    "split_snapshot",
]

#: the key of the snapshot of the first releases: every dataset in one document
LEGACY_STATE_KEY = b"ingest-state"
#: the keys of the per-dataset snapshots: ``ingest-state/<dataset>``
DATASET_KEY_PREFIX = b"ingest-state/"
#: the header of a late label or a drift alert handed on to ``data.raw``: what the record is
ROUTE_HEADER = "cdl-route"
ROUTE_FEEDBACK = "feedback"
ROUTE_DRIFT = "drift"


def home_partition(dataset: str, partitions: int) -> int:
    """The partition of ``data.raw`` (of ``partitions``) a record keyed by ``dataset`` goes to:
    librdkafka's default partitioner (``consistent_random``: CRC-32 of the key modulo the count),
    as the gRPC API's and any librdkafka-based producer's. (The Java client's default hashes with
    murmur2: such a producer's records are handed on once each.)"""
    return key_partition(dataset, partitions)


@dataclass(frozen=True)
class Routing:
    """The partitions of ``data.raw`` this instance holds, of ``partitions`` in all."""

    partitions: int
    owned: frozenset[int]

    def home(self, dataset: str) -> int:
        return home_partition(dataset, self.partitions)

    def owns(self, dataset: str) -> bool:
        """Whether this instance holds the dataset's home partition (and so its state)."""
        return self.home(dataset) in self.owned


def dataset_state_key(dataset: str) -> bytes:
    """The state topic's key of ``dataset``'s snapshot."""
    return DATASET_KEY_PREFIX + dataset.encode()


def dataset_of_key(key: bytes) -> str | None:
    """The dataset a per-dataset snapshot key names; None for any other key."""
    if not key.startswith(DATASET_KEY_PREFIX) or len(key) == len(DATASET_KEY_PREFIX):
        return None
    return key[len(DATASET_KEY_PREFIX) :].decode()


def dataset_snapshot(name: str, doc: dict[str, Any], state_format: int) -> dict[str, Any]:
    """The snapshot document of one dataset (``doc``: its part of a state document): a state
    document holding that dataset alone, so every snapshot reads the same way."""
    return {"format": state_format, "datasets": {name: doc}}


def split_snapshot(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A state document of several datasets, split: one snapshot document per dataset."""
    fmt = int(snapshot.get("format", 1))
    return {name: dataset_snapshot(name, doc, fmt) for name, doc in snapshot.get("datasets", {}).items()}


def dataset_docs(values: Mapping[bytes, bytes]) -> dict[str, dict[str, Any]]:
    """Each dataset's newest snapshot document from the state topic's newest ``values`` by key:
    its own key's, or, for a dataset that has none yet, its part of the snapshot of the first
    releases (the one-time migration: its owner writes it under its own key at the next flush).
    A dataset's own snapshot is always newer than the old one: it is written only by a release
    that no longer writes the old key."""
    docs: dict[str, dict[str, Any]] = {}
    legacy = values.get(LEGACY_STATE_KEY)
    if legacy:
        docs.update(split_snapshot(json.loads(legacy)))
    for key, value in values.items():
        name = dataset_of_key(key)
        if name is not None and value:
            docs[name] = json.loads(value)
    return docs


def route_of(headers: Headers | None) -> str | None:
    """What a ``data.raw`` record handed on by another instance is (:data:`ROUTE_FEEDBACK`,
    :data:`ROUTE_DRIFT`); None for an ordinary record."""
    if not headers:
        return None
    for name, value in headers:
        if name == ROUTE_HEADER:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")
    return None
