"""Late labels: records that arrive unlabelled wait for their label on ``data.feedback``.

Owns the waiting records (per dataset, by id), which unlabelled shard holds each one
(:class:`ShardRef`, shared by the records of a shard, so that a merge re-points them all by
changing a few refs), and how many records of each unlabelled shard still wait: a shard none
of whose records waits any more is left out of the state (its records are in labelled shards
by then). A label that finds its record makes it a labelled record at its original offset
(:meth:`LateLabels.take`); the processor buffers it as it buffers any other.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter as PromCounter

from cdl.datasets import DatasetSpec, Shard
from cdl.errors import InvalidInputError
from cdl.events import Headers
from cdl.feedback import parse_feedback
from services.ingest import fastscan
from services.ingest.records import CleanRecord, Limits, Reason, RecordError, content_type_of, label_value
from services.ingest.registry import DatasetRegistry
from services.ingest.versioning import IngestState

__all__ = ["Label", "LateLabels", "Rejected", "ShardRef", "Waiting"]

FEEDBACK_SKIPPED = PromCounter(
    "cdl_ingest_feedback_skipped_total",
    "data.feedback records for served requests (request_id, no record_id): the monitor's, not ingest's",
)


@dataclass(slots=True)
class ShardRef:
    """Which unlabelled shard holds some waiting records (shared by them: a merge re-points
    every record of its inputs by changing the few refs, not the records)."""

    key: str


@dataclass(slots=True)
class Waiting:
    """An unlabelled record waiting for its label, and the unlabelled shard holding it
    (None until its buffer is written)."""

    partition: int
    offset: int
    rec: CleanRecord
    shard: ShardRef | None = None


class Label(NamedTuple):
    """A late label that found its waiting record: the record, labelled now, where it came."""

    spec: DatasetSpec
    partition: int
    offset: int
    record: CleanRecord


class Rejected(NamedTuple):
    """A ``data.feedback`` record to dead-letter, and the dataset its metrics count it under
    (``?`` until the record names a registered one)."""

    error: RecordError
    dataset: str


class LateLabels:
    """The unlabelled records waiting for their labels, and the unlabelled shards holding them."""

    def __init__(self) -> None:
        #: unlabelled records waiting for data.feedback: dataset -> id -> where it is
        self.waiting: dict[str, dict[str, Waiting]] = defaultdict(dict)
        #: per unlabelled shard, how many of its records still wait (a shard without any is dropped)
        self.waiting_in: Counter[str] = Counter()
        #: per unlabelled shard, the refs its waiting records hold (see ShardRef)
        self.refs: dict[str, list[ShardRef]] = {}

    def clear(self) -> None:
        """Nothing waits."""
        self.waiting.clear()
        self.waiting_in.clear()
        self.refs.clear()

    def forget(self, dataset: str) -> None:
        """Nothing of ``dataset`` waits here any more (another instance owns it now)."""
        self.waiting.pop(dataset, None)
        prefix = f"{dataset}/"
        for key in [k for k in self.refs if k.startswith(prefix)]:
            del self.refs[key]
        for key in [k for k in self.waiting_in if k.startswith(prefix)]:
            del self.waiting_in[key]

    def recover(self, name: str, shard: Shard, cols: dict[str, npt.NDArray[Any]], seen: fastscan.IdSet) -> None:
        """The records of the committed unlabelled ``shard`` (its columns ``cols``) that no
        labelled shard took (their ids not in ``seen``, which takes them) wait again."""
        ids = cols["id"].tolist()
        ref = ShardRef(shard.key)
        self.refs[shard.key] = [ref]
        # an id not taken by a labelled shard still waits for its label
        for j in np.flatnonzero(seen.add_all(ids)).tolist():
            rid = ids[j]
            x = cols["x"][j] if "x" in cols else None
            text = str(cols["text"][j]) if "text" in cols else None
            rec = CleanRecord(name, rid, -1, bool(cols["split"][j]), x, text)
            self.waiting[name][rid] = Waiting(shard.partition, int(cols["offset"][j]), rec, ref)
            self.waiting_in[shard.key] += 1

    def wait(self, partition: int, offset: int, rec: CleanRecord) -> None:
        """The unlabelled ``rec`` (at ``partition``/``offset``) waits for its label."""
        self.waiting[rec.dataset][rec.id] = Waiting(partition, offset, rec)

    def attach(self, dataset: str, key: str, ids: npt.NDArray[np.str_]) -> None:
        """The unlabelled shard ``key``, being written, holds ``ids``: note which of its records
        still wait, so that it can be dropped once none does."""
        waiting = self.waiting[dataset]
        ref = ShardRef(key)
        self.refs[key] = [ref]
        for rid in ids.tolist():
            w = waiting.get(rid)
            if w is not None and w.shard is None:
                w.shard = ref
                self.waiting_in[key] += 1

    def moved(self, inputs: list[str], key: str) -> None:
        """The unlabelled shards ``inputs`` were merged into ``key``: their waiting records are in it now."""
        refs = [ref for k in inputs for ref in self.refs.pop(k, [])]
        for ref in refs:
            ref.key = key
        self.refs[key] = refs
        self.waiting_in[key] += sum(self.waiting_in.pop(k, 0) for k in inputs)

    def drop_labelled_out(self, state: IngestState) -> bool:
        """Leave unlabelled shards none of whose records still waits out of ``state``
        (their records are in labelled shards now); whether any was left out."""
        dropped = False
        for ds in state.datasets.values():
            kept = [s for s in ds.unlabelled if self.waiting_in.get(s.key, 0) > 0]
            if len(kept) != len(ds.unlabelled):
                for gone in {s.key for s in ds.unlabelled} - {s.key for s in kept}:
                    self.waiting_in.pop(gone, None)
                    self.refs.pop(gone, None)
                ds.unlabelled = kept
                dropped = True
        return dropped

    def take(
        self,
        value: bytes | None,
        headers: Headers | None,
        registry: DatasetRegistry,
        limits: Limits,
        seen: dict[str, fastscan.IdSet],
    ) -> Label | Rejected | None:
        """A ``data.feedback`` record (``value``, ``headers``): the waiting record it labels,
        taken from those waiting; or why it is dead-lettered; or None for a label of a served
        request (the monitor joins those, on ``data.raw``). ``seen`` says whether a record
        nothing waits for was labelled already."""
        content_type = content_type_of(headers)
        dataset = "?"  # the metrics' label: only registered names
        try:
            limits.check_size(value)
            try:
                fb = parse_feedback(value, content_type)
            except InvalidInputError as exc:
                raise RecordError(Reason.MALFORMED, str(exc)) from exc
            if not fb.record_id:  # a label for a served request: the monitor joins it (data.raw)
                FEEDBACK_SKIPPED.inc()
                return None
            name, rid, label = fb.dataset, fb.record_id, fb.label
            limits.check_label(label)
            spec = registry.lookup(name)
            if spec is None:
                raise RecordError(Reason.UNKNOWN_DATASET, "dataset is not registered", dataset=name[:200])
            dataset = spec.name
            own = limits.for_spec(spec)
            own.check_size(value)  # the dataset's own size limit
            own.check_id(rid)
            target = label_value(spec, label)
            waiting = self.waiting[dataset].pop(rid, None)
            if waiting is None:
                reason = Reason.ALREADY_LABELLED if rid in seen[dataset] else Reason.UNKNOWN_RECORD
                raise RecordError(reason, "no unlabelled record with this id is waiting", dataset=dataset, id=rid)
        except RecordError as exc:
            return Rejected(exc, dataset)
        partition, offset, rec = waiting.partition, waiting.offset, waiting.rec
        if waiting.shard is not None:
            self.waiting_in[waiting.shard.key] -= 1
        labelled = CleanRecord(rec.dataset, rec.id, target, rec.holdout, rec.x, rec.text)
        return Label(spec, partition, offset, labelled)
