"""A dataset version larger than memory, trained on by streaming its shards from the object store.

:func:`prepare_version` decides, per training, how a version is read: whole
(:func:`cdl.datasets.load_version`, as always) when its shards total at most
``memory_cap_bytes``, else streamed:

- **A sample** — the newest shards that fit in a quarter of the cap — is read
  once and kept: its training records fit the preprocessing (and a text
  model's idf table, and the drift reference), a seeded ``val_fraction`` of
  them is the validation part, and its holdout records are the gate's holdout.
- **The training records** (every shard's train split, less the validation
  rows of the sample's shards) stream through a :class:`ShardStream`: a torch
  ``IterableDataset`` per epoch whose shards are shuffled with the seed and the
  epoch (the same order in every process), dealt round-robin to
  ``rank * num_workers + worker_id`` of ``world_size * num_workers`` slots,
  read with a store client made inside ``__iter__`` (a DataLoader worker or a
  torchrun process opens its own), and shuffled in a pool of whole shards that
  holds at most half the cap. A record never waits in memory for a later epoch.
- **Equal steps.** Every slot yields the same number of records, the most any
  slot holds (known from the manifest's counts, so no process has to ask the
  others): a slot with fewer cycles through its shards again. No process of a
  data-parallel training runs out of batches while another waits in an
  all-reduce. One process reads each training record exactly once per epoch.

What is resident is counted (:class:`Meter`): the pool's arrays, plus a shard's
bytes and its decoded columns while it is read. A pool takes another shard only
while that stays within its budget (it always holds at least one: a shard
larger than the budget is read alone).
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cdl.datasets import (
    DATASETS_BUCKET,
    DatasetSpec,
    decode_shard,
    load_version,
    newest_shards,
    offset_ranges,
    read_manifest,
)
from cdl.ml import objective

if TYPE_CHECKING:
    from cdl.ml.core import TrainSplit
    from cdl.ml.preprocess import Preprocessor
    from cdl.ml.train import Batches, Replica
    from cdl.store import BlobStore

__all__ = [
    "Meter",
    "ShardRef",
    "ShardStream",
    "VersionData",
    "deal",
    "load_sample",
    "prepare_version",
    "shard_sizes",
    "validation_rows",
]

#: the share of ``memory_cap_bytes`` the sample takes, and the stream's pool
SAMPLE_SHARE, POOL_SHARE = 0.25, 0.5


@dataclass(frozen=True)
class ShardRef:
    """A shard to stream: its key, the records it trains on, its size in bytes."""

    key: str
    records: int
    size: int


class Meter:
    """Bytes of shards resident now and at most (thread-safe; counts within one process)."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.now += n
            self.peak = max(self.peak, self.now)

    def __getstate__(self) -> dict[str, int]:  # a process that unpickles it counts its own
        return {}

    def __setstate__(self, _: dict[str, int]) -> None:
        self.__init__()  # type: ignore[misc]


def validation_rows(key: str, n_train: int, val_fraction: float, seed: int) -> npt.NDArray[np.intp]:
    """The rows (indices into a shard's train-split records) a streamed training validates on
    instead of training: a seeded ``val_fraction`` of them, at least one; the same every time."""
    if n_train <= 0 or val_fraction <= 0:
        return np.zeros(0, dtype=np.intp)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return np.sort(rng.permutation(n_train)[: max(1, int(n_train * val_fraction))])


def deal(shards: Sequence[ShardRef], epoch: int, seed: int, slots: int) -> tuple[list[list[ShardRef]], int]:
    """Each slot's shards for an epoch, and the records every slot yields (the most any holds).

    The shards are shuffled with ``seed`` and ``epoch`` (the same order in every process) and dealt
    round-robin; a slot left without one (more slots than shards) gets one shard again."""
    if not shards:
        return [[] for _ in range(slots)], 0
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    dealt: list[list[ShardRef]] = [[] for _ in range(slots)]
    for j, i in enumerate(order):
        dealt[j % slots].append(shards[int(i)])
    for slot, mine in enumerate(dealt):
        if not mine:
            mine.append(shards[int(order[slot % len(order)])])
    return dealt, max(sum(s.records for s in mine) for mine in dealt)


@dataclass(frozen=True)
class ShardStream:
    """The training records of a version's shards, streamed (see the module's docstring).

    ``store`` makes the object store client inside ``__iter__``: for processes other than this
    one (DataLoader workers, torchrun's) it must pickle (``functools.partial(ObjectStore, …)``).
    ``held_out``: shards whose :func:`validation_rows` are the validation part, not trained on.
    """

    spec: DatasetSpec
    shards: tuple[ShardRef, ...]
    store: Callable[[], BlobStore]
    budget_bytes: int
    seed: int = 0
    val_fraction: float = 0.1
    held_out: frozenset[str] = frozenset()
    workers: int = 0
    """DataLoader worker processes per training process (0: read in the training process)."""
    meter: Meter = field(default_factory=Meter, compare=False)

    @property
    def records(self) -> int:
        """Training records read in an epoch by one process (each exactly once)."""
        return sum(s.records for s in self.shards)

    def dataset(
        self, epoch: int, preprocessor: Preprocessor, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> _EpochDataset:
        """One epoch of this process's batches as a torch ``IterableDataset`` (batches of
        ``batch_size``, preprocessed, as CPU tensors: a DataLoader with ``batch_size=None``)."""
        return _EpochDataset(self, epoch, preprocessor, batch_size, rank, world_size)

    def batches(
        self, preprocessor: Preprocessor, batch_size: int, device: torch.device, replica: Replica | None = None
    ) -> Batches:
        """:func:`cdl.ml.train.train_batches`'s batches on ``device``: ``batch_size`` is the batch
        over all processes (each takes its share, as :func:`cdl.ml.train.index_batches` does)."""
        rank, world = (replica.rank, replica.world_size) if replica is not None else (0, 1)
        per_process = max(1, batch_size // world)

        def epoch(number: int, _: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            data = self.dataset(number, preprocessor, per_process, rank, world)
            loader: DataLoader[tuple[torch.Tensor, torch.Tensor]] = DataLoader(
                data, batch_size=None, num_workers=self.workers
            )
            for xb, yb in loader:
                yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)

        return epoch

    def read(self, store: BlobStore, ref: ShardRef) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """A shard's training records (features or texts, labels), less its validation rows when
        it is held out; counted on the meter while the shard's bytes and columns are resident."""
        meter = self.meter
        raw = store.get_bytes(DATASETS_BUCKET, ref.key)
        meter.add(len(raw))
        columns = decode_shard(raw)
        decoded = sum(c.nbytes for c in columns.values())
        meter.add(decoded)
        meter.add(-len(raw))
        del raw
        rows = np.flatnonzero(columns["split"] == 0)
        if ref.key in self.held_out:
            rows = np.delete(rows, validation_rows(ref.key, len(rows), self.val_fraction, self.seed))
        x = (columns["x"] if "x" in columns else columns["text"])[rows]
        y = columns["label"][rows]
        meter.add(x.nbytes + y.nbytes)
        meter.add(-decoded)
        return x, y


class _EpochDataset(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(
        self, stream: ShardStream, epoch: int, preprocessor: Preprocessor, batch_size: int, rank: int, world: int
    ) -> None:
        self.stream, self.epoch, self.pre, self.batch_size = stream, epoch, preprocessor, batch_size
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = self.rank * workers + worker, self.world * workers
        dealt, quota = deal(self.stream.shards, self.epoch, self.stream.seed, slots)
        rng = np.random.default_rng([self.stream.seed, self.epoch, slot])
        return self._batches(self.stream.store(), dealt[slot], quota, rng)

    def _batches(
        self, store: BlobStore, mine: list[ShardRef], quota: int, rng: np.random.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``quota`` records from the slot's shards, cycling through them, shuffled in pools of
        whole shards: a pool takes another shard while twice what it would then hold (its
        arrays, and the one array they are joined into) stays within the budget."""
        s, meter, b = self.stream, self.stream.meter, self.batch_size
        regression = s.spec.task.regression
        produced, i = 0, 0
        carry: list[tuple[npt.NDArray[Any], npt.NDArray[Any]]] = []
        while produced < quota:
            pool, carry = carry, []
            held = sum(x.nbytes + y.nbytes for x, y in pool)
            have = sum(len(y) for _, y in pool)
            fresh = 0
            while have < quota - produced:
                ref = mine[i % len(mine)]
                if fresh and 2 * (held + ref.size) > s.budget_bytes:
                    break  # train on what is held first
                i += 1
                x, y = s.read(store, ref)
                pool.append((x, y))
                fresh += 1
                held += x.nbytes + y.nbytes
                have += len(y)
                if i >= len(mine) and not have:
                    return  # shards without training records
            x, y = pool[0]
            if len(pool) > 1:
                x, y = np.concatenate([p[0] for p in pool]), np.concatenate([p[1] for p in pool])
                meter.add(x.nbytes + y.nbytes)
                meter.add(-held)
                held = x.nbytes + y.nbytes
            pool.clear()
            order = rng.permutation(len(y))[: quota - produced]
            last = produced + len(order) >= quota
            full = len(order) if last else len(order) - len(order) % b
            for j in range(0, full, b):
                idx = order[j : j + b]
                yb = self.pre.scale(y[idx]) if regression else y[idx]
                yield (
                    torch.from_numpy(np.ascontiguousarray(self.pre.transform(x[idx]))),
                    objective.target_tensor(yb, torch.device("cpu"), regression),
                )
            produced += full
            rest = order[full:]
            if len(rest):  # a part batch: shuffled into the next pool
                carry = [(x[rest], y[rest])]
                meter.add(carry[0][0].nbytes + carry[0][1].nbytes)
            meter.add(-held)
            del x, y


def shard_sizes(store: BlobStore, dataset: str) -> dict[str, int]:
    """The size in bytes of each of ``dataset``'s shards (one listing)."""
    return {o.key: o.size for o in store.list(DATASETS_BUCKET, prefix=f"{dataset}/shards/")}


def load_sample(
    store: BlobStore, spec: DatasetSpec, shards: Sequence[ShardRef], budget_bytes: int, val_fraction: float, seed: int
) -> tuple[TrainSplit, frozenset[str]]:
    """The newest of ``shards`` that fit in ``budget_bytes`` (at least one), read whole: their
    training records less :func:`validation_rows` (to fit the preprocessing on), those rows (the
    validation part) and their holdout records (the gate's). Returns the split and the shards it
    read (their validation rows are not trained on)."""
    from cdl.ml.core import TrainSplit

    taken: list[ShardRef] = []
    total = 0
    for ref in reversed(shards):
        if taken and total + ref.size > budget_bytes:
            break
        taken.append(ref)
        total += ref.size
    names = ("x_train", "y_train", "x_val", "y_val", "x_hold", "y_hold")
    parts: dict[str, list[npt.NDArray[Any]]] = {k: [] for k in names}
    for ref in reversed(taken):
        columns = decode_shard(store.get_bytes(DATASETS_BUCKET, ref.key))
        source = columns["x"] if "x" in columns else columns["text"].astype(object)
        labels = columns["label"].astype(np.float32 if spec.task.regression else np.int64)
        train, hold = np.flatnonzero(columns["split"] == 0), np.flatnonzero(columns["split"] == 1)
        val = validation_rows(ref.key, len(train), val_fraction, seed)
        for name, rows in (("train", np.delete(train, val)), ("val", train[val]), ("hold", hold)):
            parts[f"x_{name}"].append(source[rows])
            parts[f"y_{name}"].append(labels[rows])
    split = TrainSplit(**{k: np.concatenate(v) for k, v in parts.items()})
    return split, frozenset(ref.key for ref in taken)


@dataclass(frozen=True)
class VersionData:
    """A dataset version as a training reads it: whole (``stream`` None) or streamed."""

    spec: DatasetSpec
    manifest: dict[str, Any]
    entries: list[dict[str, Any]]
    """The manifest's shards trained on: all of them, or the newest ones of a window."""
    split: TrainSplit
    """Whole: the version's split (:func:`cdl.ml.core.split_version`). Streamed: the sample's
    (:func:`load_sample`): its ``x_train`` only fits the preprocessing, the stream trains."""
    stream: ShardStream | None = None

    @property
    def records(self) -> int:
        return sum(int(e["records"]) for e in self.entries)

    @property
    def windowed(self) -> bool:
        return len(self.entries) < len(self.manifest["shards"])

    @property
    def train_records(self) -> int:
        """The records one epoch trains on (one process's reading of a stream)."""
        return self.stream.records if self.stream is not None else len(self.split.x_train)

    def offset_ranges(self) -> list[dict[str, Any]]:
        return offset_ranges(self.manifest, self.entries)


def prepare_version(
    store: BlobStore,
    dataset: str,
    version: int,
    *,
    window_records: int = 0,
    val_fraction: float = 0.1,
    seed: int = 0,
    memory_cap_bytes: int = 0,
    stream_store: Callable[[], BlobStore] | None = None,
    workers: int = 0,
) -> VersionData:
    """Read a version for training: whole when its shards (the newest holding ``window_records``)
    total at most ``memory_cap_bytes`` (0: always whole), else a sample and a :class:`ShardStream`
    within that cap, reading through ``stream_store`` (default: ``store`` itself)."""
    from cdl.ml.core import split_version

    manifest = read_manifest(store, dataset, version)
    spec = DatasetSpec.from_json(manifest["spec"])
    entries = newest_shards(manifest, window_records)
    sizes = shard_sizes(store, dataset) if memory_cap_bytes > 0 else {}
    if not memory_cap_bytes or sum(sizes.get(e["key"], 0) for e in entries) <= memory_cap_bytes:
        data = load_version(store, dataset, version, window_records)
        return VersionData(spec, manifest, data.shards, split_version(data, val_fraction, seed))
    refs = [ShardRef(e["key"], int(e["train"]), sizes.get(e["key"], 0)) for e in entries]
    split, held = load_sample(store, spec, refs, int(memory_cap_bytes * SAMPLE_SHARE), val_fraction, seed)

    def trained(r: ShardRef) -> int:
        return r.records - len(validation_rows(r.key, r.records, val_fraction, seed)) if r.key in held else r.records

    stream = ShardStream(
        spec,
        tuple(ShardRef(r.key, trained(r), r.size) for r in refs),
        stream_store or (lambda: store),
        budget_bytes=int(memory_cap_bytes * POOL_SHARE),
        seed=seed,
        val_fraction=val_fraction,
        held_out=held,
        workers=workers,
    )
    return VersionData(spec, manifest, entries, split, stream)
