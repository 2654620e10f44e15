"""Housekeeping: compaction and the sweep (:mod:`services.ingest.compaction`), one background job at a time.

Owns the job in flight (in its own thread), the merged shards of versioned shards waiting
for their dataset's next version, the groups of shards a job could not merge (not tried
again) and when the next sweep is due. A flush takes what a finished job merged
(:meth:`Housekeeping.take`) and may start the next (:meth:`Housekeeping.start`); a snapshot
over its size limit has its pending and unlabelled shards merged at once, in the flush's
thread (:meth:`Housekeeping.merge_unversioned_now`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace

from prometheus_client import Counter as PromCounter

from cdl.datasets import Shard
from cdl.logging import get_logger
from cdl.store import ObjectStore
from services.ingest.compaction import WHERE, CompactionPolicy, ManifestRefs, Merged, merge, plan, sweep
from services.ingest.late_labels import LateLabels
from services.ingest.versioning import IngestState

__all__ = ["Housekeeping"]

log = get_logger(__name__)

MERGED = PromCounter("cdl_ingest_shards_merged_total", "Small shards merged into larger ones", ["dataset"])
SWEPT = PromCounter("cdl_ingest_objects_swept_total", "Unreferenced shard objects removed", ["dataset"])

#: what a job gives: the merged shards, and the groups (their keys) that could not be merged
_Outcome = tuple[list[Merged], list[tuple[str, ...]]]


def _keys(shards: list[Shard]) -> tuple[str, ...]:
    return tuple(s.key for s in shards)


class Housekeeping:
    """Merging small shards and sweeping unreferenced objects, in the background.

    A merge of unlabelled shards re-points their waiting records (``labels``);
    ``on_change`` is called when a merge changed the state.
    """

    job: Future[_Outcome] | None
    """the job in flight"""

    def __init__(
        self, *, store: ObjectStore, policy: CompactionPolicy, labels: LateLabels, on_change: Callable[[], None]
    ) -> None:
        self._store = store
        self._policy = policy
        self._labels = labels
        self._on_change = on_change
        #: compaction and the sweep, one job at a time (see services/ingest/compaction.py)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-housekeeping")
        self._manifest_refs = ManifestRefs()
        self.reset()

    def reset(self) -> None:
        """No job tracked, nothing merged (:meth:`IngestProcessor.restore` waited for the job in flight)."""
        self.job = None
        #: merged shards waiting for the dataset's next version
        self._merges: dict[str, list[Merged]] = defaultdict(list)
        #: groups of shards (their keys) a job could not merge: not tried again
        self._unmergeable: set[tuple[str, ...]] = set()
        self._next_sweep = time.monotonic() + self._policy.sweep_interval_s

    def take(self, state: IngestState) -> None:
        """Take what a finished job merged: merges of versioned shards wait for the dataset's
        next version; those of pending and unlabelled shards go into ``state`` now (committed
        by this flush, which the job's start followed)."""
        job = self.job
        if job is None or not job.done():
            return
        self.job = None
        try:
            merged, unmergeable = job.result()
        except Exception as exc:  # noqa: BLE001 - housekeeping never stops the stream; the next job tries again
            log.warning("ingest housekeeping failed", error=str(exc))
            return
        for m in merged:
            if m.where == "versioned":
                self._merges[m.dataset].append(m)
            else:
                self.merge_now(m, state)
        self._unmergeable.update(unmergeable)

    def settle(self, state: IngestState) -> None:
        """Wait for the job in flight and take what it merged (before datasets change owner: no
        job of this instance then works on a dataset another instance writes)."""
        if self.job is not None:
            wait([self.job])
            self.take(state)

    def forget(self, dataset: str) -> None:
        """Drop the merges of ``dataset`` waiting for its next version (another instance owns it now)."""
        self._merges.pop(dataset, None)

    def merged_for(self, name: str) -> list[Merged]:
        """The merged versioned shards of ``name`` waiting for its next version (handed over:
        they take their inputs' place in that version)."""
        return self._merges.pop(name, [])

    def merge_now(self, m: Merged, state: IngestState) -> bool:
        """Put the merged pending or unlabelled shard ``m`` in ``state`` in its inputs' place
        (its waiting records now in it); False, changing nothing, when they are not all there.

        Safe before any version names it: no manifest names a pending or unlabelled shard,
        only the state, and the state that names ``m`` is committed in one transaction; the
        state committed before still names the inputs, and they stay until the sweep finds
        neither names them."""
        ds = state.datasets.get(m.dataset)
        if ds is None or not ds.replace(m.where, m.inputs, m.shard):
            return False
        if m.where == "unlabelled":
            self._labels.moved(m.inputs, m.shard.key)
        self._on_change()
        return True

    def merge_unversioned_now(self, state: IngestState) -> None:
        """Merge every run of two or more small pending or unlabelled shards per partition, in
        this thread, and put the merged shards in ``state`` at once (each written in full
        first). The job in flight is waited for first, so its sweep cannot race a merged
        shard this writes or finds already there."""
        self.settle(state)
        policy = replace(self._policy, min_shards=2)
        for name, ds in sorted(state.datasets.items()):
            for where in ("pending", "unlabelled"):
                for group in plan(getattr(ds, where), policy):
                    m = merge(self._store, name, group, policy, where)
                    if m is not None and self.merge_now(m, state):
                        MERGED.labels(name).inc(len(m.inputs))

    def sweep_time(self) -> bool:
        """The sweep's interval has passed."""
        interval = self._policy.sweep_interval_s
        return interval > 0 and time.monotonic() >= self._next_sweep

    def sweep_due(self) -> bool:
        """A sweep can start at this flush: its interval has passed and no job runs."""
        return self.job is None and self.sweep_time()

    def start(self, state: IngestState, keep: set[str] | None) -> None:
        """Start a job when none runs and there is work: merges (of the latest version's shards
        for datasets with none waiting for a version; of pending and unlabelled shards), and a
        sweep when ``keep`` is given (see :meth:`sweep_due`).

        ``keep`` holds every key the committed state and the state being built
        name; merged shards waiting for a version are added. Objects written after
        this call are newer than the sweep's cut-off, so none of them is swept.
        Every shard the state names is written by now (the flush waited for them).
        """
        if self.job is not None:
            return
        policy = self._policy
        work: list[tuple[str, str, list[list[Shard]]]] = []
        for name, ds in sorted(state.datasets.items()):
            for where in WHERE:
                if where == "versioned" and self._merges.get(name):
                    continue
                groups = [g for g in plan(getattr(ds, where), policy) if _keys(g) not in self._unmergeable]
                if groups:
                    work.append((name, where, groups))
        datasets: list[str] = []
        if keep is not None:
            self._next_sweep = time.monotonic() + policy.sweep_interval_s
            keep = keep | {m.shard.key for ms in self._merges.values() for m in ms}
            datasets = sorted(state.datasets)
        if not work and not datasets:
            return
        cutoff = time.time() - policy.grace_s
        self.job = self._pool.submit(self._run, work, datasets, keep or set(), cutoff)

    def _run(
        self, work: list[tuple[str, str, list[list[Shard]]]], datasets: list[str], keep: set[str], cutoff: float
    ) -> _Outcome:
        """The job (in its thread; no state is touched): merge, then sweep.

        Returns the merged shards, and the groups that could not be merged (not planned again).
        """
        merged: list[Merged] = []
        unmergeable: list[tuple[str, ...]] = []
        for name, where, groups in work:
            for group in groups:
                m = merge(self._store, name, group, self._policy, where)
                if m is None:
                    unmergeable.append(_keys(group))
                    continue
                merged.append(m)
                MERGED.labels(name).inc(len(m.inputs))
        # a merged shard found already written (by a session whose merge never got into a
        # committed state) keeps its old time: it must not be swept as an old orphan
        keep = keep | {m.shard.key for m in merged}
        for name in datasets:
            SWEPT.labels(name).inc(len(sweep(self._store, name, keep, cutoff, self._manifest_refs)))
        return merged, unmergeable

    def close(self) -> None:
        """Give up on a job not started; finish the one running."""
        self._pool.shutdown(wait=True, cancel_futures=True)
