"""Keeping a long-running dataset's objects few and its garbage gone.

A slow trickle of records makes one small shard per flush and partition.
*Compaction* merges a partition's small shards into one larger shard: those
of the latest version, so later versions (and recovery) read few objects
instead of many, and those not in a version yet (``pending``) or waiting for
labels (``unlabelled``), so that the state snapshot, which lists those, stays
bounded; *the sweep* removes objects that nothing refers to any more.

Both run in the background (:class:`services.ingest.housekeeping.Housekeeping`
hands them to one housekeeping thread at flush time) and neither ever changes
what a published version holds:

- a merged shard holds exactly the records of its inputs (every column, in the
  inputs' order) and is written in full, under a new key
  (:meth:`cdl.datasets.Shard.merged_key`), before any state or manifest names
  it; the inputs stay where they are, since published manifests (or the
  committed state) name them;
- the sweep deletes an object under ``<dataset>/shards/`` or
  ``<dataset>/unlabelled/`` only when no manifest names it, the ingest state
  does not name it (neither the committed state nor the one being built) and
  it was last written ``grace_s`` before the sweep began: shards of a flush
  whose transaction was aborted, or that a crash left behind, and small shards
  that were merged once no version names them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cdl.datasets import DATASETS_BUCKET, Shard, decode_shard, shard_parts
from cdl.logging import get_logger
from cdl.store import BlobStore, ObjectStore

__all__ = ["WHERE", "CompactionPolicy", "ManifestRefs", "Merged", "merge", "plan", "sweep"]

log = get_logger(__name__)


@dataclass(frozen=True)
class CompactionPolicy:
    """When shards are merged and garbage is removed."""

    min_shards: int = 8
    """Merge a partition's small shards once a list of the state (the latest version's, the
    pending or the unlabelled shards) holds this many of them (0: never; a snapshot over its
    size limit is merged whatever this says)."""
    target_records: int = 20000
    """Records a merged shard holds at most; a shard with half as many or more is not small."""
    target_bytes: int = 64 << 20
    """Bytes a merged shard's columns take in memory at most (text columns padded to their longest)."""
    grace_s: float = 3600.0
    """Age an unreferenced object must have before the sweep removes it."""
    sweep_interval_s: float = 600.0
    """Time between two sweeps (0: never sweep)."""


#: where in a dataset's state the shards of a merge are: the latest version's, not in a
#: version yet, or waiting for labels
WHERE = ("versioned", "pending", "unlabelled")


@dataclass(frozen=True)
class Merged:
    """A merged shard, written: it replaces ``inputs`` (keys, in order) in the state's
    ``where`` list (versioned shards: from the next version on)."""

    dataset: str
    inputs: list[str]
    shard: Shard
    where: str = "versioned"


def plan(shards: Sequence[Shard], policy: CompactionPolicy) -> list[list[Shard]]:
    """Runs of small shards to merge, per partition, in the order ``shards`` lists them.

    A partition's shards are considered once at least ``min_shards`` of them
    are small (under half of ``target_records``); consecutive small shards
    are then grouped up to ``target_records``. Groups of one are left alone.
    """
    if policy.min_shards <= 0:
        return []
    small = policy.target_records // 2
    by_partition: dict[int, list[Shard]] = {}
    for shard in shards:
        by_partition.setdefault(shard.partition, []).append(shard)
    groups: list[list[Shard]] = []
    for partition in sorted(by_partition):
        mine = by_partition[partition]
        if sum(1 for s in mine if s.records < small) < policy.min_shards:
            continue
        group: list[Shard] = []
        for shard in mine:
            full = bool(group) and sum(s.records for s in group) + shard.records > policy.target_records
            if shard.records >= small or full:
                if len(group) > 1:
                    groups.append(group)
                group = []
            if shard.records < small:
                group.append(shard)
        if len(group) > 1:
            groups.append(group)
    return groups


def _padded_bytes(parts: Sequence[dict[str, npt.NDArray[Any]]]) -> int:
    """Bytes the columns of ``parts`` take once joined (a unicode column pads to its longest)."""
    rows = sum(len(p["id"]) for p in parts)
    return sum(rows * max(p[name].itemsize * int(np.prod(p[name].shape[1:])) for p in parts) for name in parts[0])


def merge(
    store: BlobStore, dataset: str, group: Sequence[Shard], policy: CompactionPolicy, where: str = "versioned"
) -> Merged | None:
    """Read ``group``'s shards, write them as one (if it is not there yet); None when fewer
    than two fit in ``target_bytes`` or a shard disagrees with what the state says of it.

    ``where`` says which of the state's lists ``group`` is from (:data:`WHERE`); a merge
    of unlabelled shards is an unlabelled shard itself.
    """
    if where not in WHERE:
        raise ValueError(f"where must be one of {WHERE}, not {where!r}")
    parts: list[dict[str, npt.NDArray[Any]]] = []
    used: list[Shard] = []
    for shard in group:
        cols = decode_shard(store.get_bytes(DATASETS_BUCKET, shard.key))
        if len(cols["id"]) != shard.records or (parts and set(cols) != set(parts[0])):
            log.warning("shard not merged: it disagrees with the state", key=shard.key)
            return None
        if parts and _padded_bytes([*parts, cols]) > policy.target_bytes:
            break
        parts.append(cols)
        used.append(shard)
    if len(used) < 2:
        return None
    partition = used[0].partition
    first, last = min(s.first_offset for s in used), max(s.last_offset for s in used)
    inputs = [s.key for s in used]
    key = Shard.merged_key(dataset, partition, first, last, inputs, unlabelled=where == "unlabelled")
    if not store.exists(DATASETS_BUCKET, key):  # written whole or not at all (one PUT)
        columns = {name: [p[name] for p in parts] for name in parts[0]}
        store.put_bytes(DATASETS_BUCKET, key, shard_parts(columns))
    histogram: dict[str, int] = {}
    for s in used:
        for label, n in s.label_histogram.items():
            histogram[label] = histogram.get(label, 0) + n
    merged = Shard(
        key,
        partition,
        first,
        last,
        sum(s.records for s in used),
        sum(s.train for s in used),
        sum(s.holdout for s in used),
        dict(sorted(histogram.items())),
    )
    log.info("shards merged", dataset=dataset, key=key, inputs=len(used), records=merged.records, where=where)
    return Merged(dataset, inputs, merged, where)


class ManifestRefs:
    """The shard keys every manifest of a dataset names, each manifest read once
    (again only when its ETag changes: a version rewritten after an aborted flush)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, frozenset[str]]] = {}

    def keys(self, store: BlobStore, dataset: str) -> set[str]:
        out: set[str] = set()
        for obj in store.list(DATASETS_BUCKET, prefix=f"{dataset}/versions/"):
            cached = self._seen.get(obj.key)
            if cached is None or cached[0] != obj.etag:
                doc = store.get_json(DATASETS_BUCKET, obj.key)
                cached = (obj.etag, frozenset(str(e["key"]) for e in doc.get("shards", [])))
                self._seen[obj.key] = cached
            out |= cached[1]
        return out


def _objects(store: ObjectStore, prefix: str) -> Iterable[tuple[str, float]]:
    """``(key, last modified as a Unix time)`` of the objects under ``prefix``."""
    for obj in store.client.list_objects(DATASETS_BUCKET, prefix=prefix, recursive=True):
        if obj.object_name is None or obj.is_dir or obj.last_modified is None:
            continue
        yield obj.object_name, obj.last_modified.timestamp()


def sweep(
    store: ObjectStore,
    dataset: str,
    keep: set[str],
    older_than: float,
    manifests: ManifestRefs | None = None,
) -> list[str]:
    """Delete ``dataset``'s shard objects that no manifest names, ``keep`` (the state's
    keys) does not hold and that were last written before ``older_than`` (a Unix time:
    the sweep's start less the grace period). Returns the keys deleted."""
    named = (manifests or ManifestRefs()).keys(store, dataset)
    deleted: list[str] = []
    for folder in ("shards", "unlabelled"):
        for key, modified in _objects(store, f"{dataset}/{folder}/"):
            if key in keep or key in named or modified >= older_than:
                continue
            store.delete(DATASETS_BUCKET, key)
            deleted.append(key)
    if deleted:
        log.info("unreferenced objects removed", dataset=dataset, count=len(deleted), first=deleted[0])
    return deleted
