"""Buffers and sealing: valid records wait per dataset and partition until they become a shard.

Owns the buffers (of labelled records, and of unlabelled ones waiting for their labels), the
sealing of a buffer that holds a shard's worth (``shard_max_records`` records, or a text
column that one more text would take past ``shard_text_bytes``) while the stream goes on,
and the shard writes in flight: a sealed shard enters the state at once and is written in
the background; the next flush waits for every write before its transaction commits.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cdl.datasets import DATASETS_BUCKET, Shard, Task, shard_parts
from cdl.store import BlobStore
from services.ingest.commit import Versions
from services.ingest.late_labels import LateLabels
from services.ingest.records import CleanRecord
from services.ingest.registry import DatasetRegistry
from services.ingest.versioning import IngestState

__all__ = ["Buffer", "ShardBuffers"]


@dataclass
class Buffer:
    """Valid records of one dataset and partition, waiting to become a shard.

    Columns are kept as chunks (one per batch) and joined once, when written.
    """

    first: int = -1
    last: int = -1
    count: int = 0
    ids: list[npt.NDArray[np.str_]] = field(default_factory=list)
    labels: list[npt.NDArray[Any]] = field(default_factory=list)
    splits: list[npt.NDArray[Any]] = field(default_factory=list)
    offsets: list[npt.NDArray[Any]] = field(default_factory=list)
    x: list[npt.NDArray[Any]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    text_width: int = 0  # the longest text: the shard's text column is padded to it

    def add(self, rec: CleanRecord, offset: int) -> None:
        """One record (the careful path)."""
        x = None if rec.x is None else rec.x.reshape(1, *rec.x.shape)
        self.extend(np.array([rec.id]), np.array([rec.label]), np.array([rec.holdout]), np.array([offset]), x)
        if rec.text is not None:
            self.text.append(rec.text)
            self.text_width = max(self.text_width, len(rec.text))

    def takes(self, text: str | None, text_bytes: int) -> bool:
        """Whether one more record (with ``text``) keeps the text column, padded to its
        longest text as a shard's ``<U`` column is (4 bytes a character), within
        ``text_bytes``. An empty buffer takes any record: one text is bounded by the limits."""
        if text is None or not self.count:
            return True
        return (self.count + 1) * max(self.text_width, len(text)) * 4 <= text_bytes

    def extend(
        self,
        ids: npt.NDArray[np.str_],
        labels: npt.NDArray[Any],
        splits: npt.NDArray[Any],
        offsets: npt.NDArray[Any],
        x: npt.NDArray[Any] | None,
    ) -> None:
        lo, hi = int(offsets.min()), int(offsets.max())
        self.first = lo if self.first < 0 else min(self.first, lo)
        self.last = max(self.last, hi)
        self.count += len(ids)
        self.ids.append(ids)
        self.labels.append(labels)
        self.splits.append(splits)
        self.offsets.append(offsets)
        if x is not None:
            self.x.append(x)


class ShardBuffers:
    """The buffers per dataset and partition (labelled, and unlabelled), and the shards being
    written from them in the background.

    A shard written from an unlabelled buffer tells ``labels`` which waiting records it holds;
    one from a labelled buffer sealed before the flush tells ``versions`` its records are in
    the state now. ``on_change`` is called when a sealed shard changed the state.
    """

    def __init__(
        self,
        *,
        registry: DatasetRegistry,
        store: BlobStore,
        shard_max_records: int,
        shard_text_bytes: int,
        labels: LateLabels,
        versions: Versions,
        on_change: Callable[[], None],
    ) -> None:
        self._registry = registry
        self._store = store
        self._shard_max = shard_max_records
        #: a text shard's text column (padded to its longest text) takes at most this many bytes
        self._text_bytes = shard_text_bytes
        self._labels = labels
        self._versions = versions
        self._on_change = on_change
        self._writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ingest-shards")
        self.reset()

    def reset(self) -> None:
        """No buffer, no write tracked (:meth:`IngestProcessor.restore` waited for those in flight)."""
        self.labelled: dict[tuple[str, int], Buffer] = {}
        self.unlabelled: dict[tuple[str, int], Buffer] = {}
        #: shards being written in the background; the next flush waits for them
        self.writes: list[Future[str]] = []

    def add_scanned(
        self,
        dataset: str,
        partitions: npt.NDArray[Any],
        ids: npt.NDArray[np.str_],
        labels: npt.NDArray[Any],
        splits: npt.NDArray[Any],
        offsets: npt.NDArray[Any],
        x: npt.NDArray[Any],
    ) -> None:
        """Buffer records the fast path accepted (of one dataset; ``partitions`` says where each came)."""
        first = int(partitions[0])
        if (partitions == first).all():  # one partition: no regrouping
            self.labelled.setdefault((dataset, first), Buffer()).extend(ids, labels, splits, offsets, x)
        else:
            for p in np.unique(partitions).tolist():
                sel = np.flatnonzero(partitions == p)
                self.labelled.setdefault((dataset, p), Buffer()).extend(
                    ids[sel], labels[sel], splits[sel], offsets[sel], x[sel]
                )

    def buffer_for(
        self, dataset: str, partition: int, text: str | None, state: IngestState, unlabelled: bool = False
    ) -> Buffer:
        """The buffer one more record of ``dataset`` and ``partition`` (on the careful path or
        a late label) goes into. The one there is written first when it holds
        ``shard_max_records`` records, or when the record's text would take its text column,
        padded to its longest text as a shard stores it, past ``shard_text_bytes``: so a
        shard's text column never passes that (one text alone is bounded by the limits)."""
        buffers = self.unlabelled if unlabelled else self.labelled
        key = (dataset, partition)
        buf = buffers.get(key)
        if buf is not None and (buf.count >= self._shard_max or not buf.takes(text, self._text_bytes)):
            self.seal(key, state, unlabelled)
            buf = None
        if buf is None:
            buf = buffers[key] = Buffer()
        return buf

    def seal_full(self, state: IngestState) -> None:
        """Write every buffer, labelled or not, that holds a shard's worth of records, in the background.

        The stream goes on meanwhile; the shard enters the state now and the
        next flush waits for the write before its transaction commits. (A text
        column is kept within ``shard_text_bytes`` as records are added:
        :meth:`buffer_for`.)
        """
        for key in [k for k, buf in self.labelled.items() if buf.count >= self._shard_max]:
            self.seal(key, state)
        for key in [k for k, buf in self.unlabelled.items() if buf.count >= self._shard_max]:
            self.seal(key, state, unlabelled=True)

    def seal(self, key: tuple[str, int], state: IngestState, unlabelled: bool = False) -> None:
        """Write the buffer of ``key`` (dataset, partition) as a shard, in the background."""
        dataset, partition = key
        if unlabelled:
            self.write(dataset, partition, self.unlabelled.pop(key), state, unlabelled=True)
        else:
            n = self.write(dataset, partition, self.labelled.pop(key), state)
            self._versions.sealed(dataset, n)  # now counted in the state
        self._on_change()

    def write_all(self, state: IngestState) -> None:
        """Write every buffer holding records (the flush's), labelled first, then unlabelled."""
        for (dataset, partition), buf in sorted(self.labelled.items()):
            if buf.count:
                self.write(dataset, partition, buf, state)
                self._on_change()
        self.labelled.clear()
        for (dataset, partition), buf in sorted(self.unlabelled.items()):
            if buf.count:
                self.write(dataset, partition, buf, state, unlabelled=True)
                self._on_change()
        self.unlabelled.clear()

    def write(self, dataset: str, partition: int, buf: Buffer, state: IngestState, unlabelled: bool = False) -> int:
        """Record the shard in ``state`` and write it in the background; returns its record count."""
        spec = self._registry.get(dataset)
        labels = np.concatenate(buf.labels).astype(spec.label_dtype)
        splits = np.concatenate(buf.splits).astype(np.uint8)
        ids = np.concatenate(buf.ids)
        columns: dict[str, npt.NDArray[Any] | list[npt.NDArray[Any]]] = {
            "id": ids,
            "label": labels,
            "split": splits,
            "offset": np.concatenate(buf.offsets).astype(np.int64),
        }
        if spec.task is Task.TEXT:
            columns["text"] = np.array(buf.text)
        else:  # the features' chunks are written one after the other, not joined first
            columns["x"] = [chunk.astype(spec.dtype, copy=False) for chunk in buf.x]
        key = Shard.key_for(dataset, partition, buf.first, buf.last, unlabelled=unlabelled)
        if unlabelled:  # which of its records still wait, so that it can be dropped once none does
            self._labels.attach(dataset, key, ids)
        if len(self.writes) >= 4:  # bound the memory held by writes in flight
            self.writes.pop(0).result()
        self.writes.append(self._writer.submit(self._put, key, columns))
        n = buf.count
        holdout = int(splits.sum())
        if spec.task.regression:  # the target's name: how many values it has
            counts = [int(np.count_nonzero(~np.isnan(labels)))]
        else:
            counts = np.bincount(labels[labels >= 0], minlength=len(spec.labels)).tolist()
        hist = {label: c for label, c in zip(spec.labels, counts, strict=False) if c}
        shard = Shard(key, partition, buf.first, buf.last, n, n - holdout, holdout, hist)
        ds = state.dataset(dataset, self._versions.first_seen.get(dataset))
        (ds.unlabelled if unlabelled else ds.pending).append(shard)
        return n

    def _put(self, key: str, columns: dict[str, npt.NDArray[Any] | list[npt.NDArray[Any]]]) -> str:
        return self._store.put_bytes(DATASETS_BUCKET, key, shard_parts(columns))

    def wait_for_writes(self) -> None:
        """Every shard the state names must be in MinIO before the state is committed.

        Every write is waited for, failed or not, before a failure is raised: none is
        left running untracked (:meth:`IngestProcessor.restore` waits for what ``writes`` holds).
        """
        wait(self.writes)
        writes, self.writes = self.writes, []
        for write in writes:
            write.result()  # a failed write raises: the transaction must not commit

    def close(self) -> None:
        """Finish the shard writes in flight."""
        self._writer.shutdown(wait=True)
