"""Distributed training and streaming (cdl.ml.distributed, cdl.ml.streaming) without servers.

The logic (how shards are dealt to processes and DataLoader workers, equal steps, the memory
cap) runs on tests/fakes.py's in-memory store; two tests run torchrun for real, with two CPU
processes (gloo), against one process: in-memory arrays, and shards streamed unevenly.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from sklearn.datasets import load_digits

from cdl.datasets import DATASETS_BUCKET, DatasetSpec, DatasetVersion, Shard, Task, encode_shard, manifest_key
from cdl.errors import ConfigError, DistributedTrainingError, InvalidInputError
from cdl.ml import distributed
from cdl.ml.core import assess, fit, hyperparameters, split_version
from cdl.ml.models import build_model
from cdl.ml.preprocess import Preprocessor
from cdl.ml.streaming import POOL_SHARE, SAMPLE_SHARE, ShardRef, ShardStream, deal, prepare_version, validation_rows
from cdl.ml.train import EpochMetrics, Replica, TrainConfig
from tests.fakes import MemoryStore

DIGITS = load_digits()
IMAGES = DIGITS.data.reshape(-1, 1, 8, 8).astype(np.float32)
LABELS = DIGITS.target.astype(np.int64)
DIGITS_SPEC = DatasetSpec(
    name="digits-ddp", task=Task.IMAGE, labels=tuple(str(i) for i in range(10)), input_shape=(1, 8, 8)
)
#: one feature: the record's index, so what a stream yields says which records it read
INDEX_SPEC = DatasetSpec(name="index", task=Task.TABULAR, labels=("a", "b"), input_shape=(1,))
IDENTITY = Preprocessor("standardize", (0.0,), (1.0,), per_feature=True)


def write_version(
    store: MemoryStore, spec: DatasetSpec, x: npt.NDArray[Any], y: npt.NDArray[Any], sizes: list[int]
) -> int:
    """Version 1 of ``spec``: ``x, y`` in shards of ``sizes`` records, every fifth record in the
    holdout; returns the shards' total bytes."""
    assert sum(sizes) == len(x)
    entries, total, first = [], 0, 0
    for size in sizes:
        rows = np.arange(first, first + size)
        split = (rows % 5 == 0).astype(np.uint8)
        key = Shard.key_for(spec.name, 0, first, first + size - 1)
        data = encode_shard(
            {
                "id": np.array([f"r{i}" for i in rows]),
                "label": y[rows].astype(np.int16),
                "split": split,
                "offset": rows.astype(np.int64),
                "x": x[rows],
            }
        )
        store.put_bytes(DATASETS_BUCKET, key, data)
        total += len(data)
        train = int((split == 0).sum())
        entries.append(Shard(key, 0, first, first + size - 1, size, train, size - train).to_json())
        first += size
    manifest = {
        "spec": spec.to_json(),
        "shards": entries,
        "offset_ranges": [{"topic": "data.raw", "partition": 0, "first": 0, "last": first - 1}],
        "total_records": first,
    }
    store.put_json(DATASETS_BUCKET, manifest_key(spec.name, 1), manifest)
    return total


def index_version(sizes: list[int]) -> tuple[MemoryStore, int]:
    n = sum(sizes)
    store = MemoryStore()
    total = write_version(store, INDEX_SPEC, np.arange(n, dtype=np.float32).reshape(-1, 1), np.arange(n) % 2, sizes)
    return store, total


def streamed_indices(stream: ShardStream, epoch: int, rank: int = 0, world: int = 1, batch: int = 7) -> list[list[int]]:
    """The record indices of each batch one process reads in an epoch."""
    data = stream.dataset(epoch, IDENTITY, batch, rank, world)
    return [xb[:, 0].to(torch.int64).tolist() for xb, _ in data]


# --------------------------------------------------------------------------- logic


@pytest.mark.parametrize("n_shards", [1, 2, 5, 7])
@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_shards_are_dealt_so_every_rank_and_worker_reads_each_shard_once(
    n_shards: int, world: int, workers: int
) -> None:
    shards = [ShardRef(f"s{i}", 10 + 7 * i, 100) for i in range(n_shards)]
    slots = world * workers
    dealt, quota = deal(shards, epoch=3, seed=0, slots=slots)
    assert dealt == deal(shards, epoch=3, seed=0, slots=slots)[0]  # every process deals the same
    read = [s.key for slot in dealt for s in slot]
    if n_shards >= slots:  # each shard exactly once over all slots
        assert sorted(read) == sorted(s.key for s in shards)
    else:  # more slots than shards: every shard once, and a slot with none gets one again
        assert set(read) == {s.key for s in shards} and all(len(slot) == 1 for slot in dealt)
    assert quota == max(sum(s.records for s in slot) for slot in dealt)
    if n_shards >= 5:  # the order changes with the epoch
        assert [s.key for s in deal(shards, 4, 0, 1)[0][0]] != [s.key for s in deal(shards, 3, 0, 1)[0][0]]


def test_one_process_streams_every_training_record_once_and_two_take_equal_steps_over_uneven_shards() -> None:
    sizes = [50, 10, 80, 30, 5]
    store, total = index_version(sizes)
    data = prepare_version(store, "index", 1, val_fraction=0.1, seed=0, memory_cap_bytes=total // 2)
    stream = data.stream
    assert stream is not None and len(stream.held_out) >= 1
    # the training records: train split, less the validation rows of the sample's shards
    expected = []
    for s in stream.shards:
        first, last = (int(v) for v in s.key.rsplit("/", 1)[1][5:-4].split("-"))
        train = [i for i in range(first, last + 1) if i % 5]
        if s.key in stream.held_out:
            train = list(np.delete(np.array(train), validation_rows(s.key, len(train), 0.1, 0)))
        expected += train
    val = data.split.y_val
    assert len(val) > 0 and len(expected) == stream.records == data.train_records
    one = [i for b in streamed_indices(stream, epoch=1) for i in b]
    assert sorted(one) == sorted(expected)  # once each
    assert one != [i for b in streamed_indices(stream, epoch=2) for i in b]  # reshuffled each epoch
    # two processes: their shares differ, their steps do not (a process never waits alone in an all-reduce)
    ranks = [streamed_indices(stream, 1, rank, 2, batch=4) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and [len(b) for b in ranks[0]] == [len(b) for b in ranks[1]]
    assert set(i for b in ranks[0] + ranks[1] for i in b) == set(expected)


def test_dataloader_workers_split_a_process_share_and_keep_the_steps_equal() -> None:
    store, total = index_version([40, 40, 40, 40, 40, 20])
    data = prepare_version(store, "index", 1, memory_cap_bytes=total // 2, workers=2)
    assert data.stream is not None
    counts = []
    for rank in (0, 1):
        batches = data.stream.batches(IDENTITY, 8, torch.device("cpu"), Replica(rank, 2))  # no reductions here
        counts.append([len(yb) for xb, yb in batches(1, torch.Generator())])
    assert counts[0] == counts[1] and sum(counts[0]) >= data.stream.records // 2


def test_a_version_bigger_than_the_cap_trains_by_streaming_within_it() -> None:
    store = MemoryStore()
    sizes = [75] * 23 + [72]
    total = write_version(store, DIGITS_SPEC, IMAGES, LABELS, sizes)
    cap = total // 4  # the version is four times the cap (which holds six of its shards)
    data = prepare_version(store, DIGITS_SPEC.name, 1, val_fraction=0.1, seed=0, memory_cap_bytes=cap)
    stream = data.stream
    assert stream is not None and data.records == len(IMAGES)
    sample = sum(getattr(data.split, f).nbytes for f in ("x_train", "y_train", "x_val", "y_val", "x_hold", "y_hold"))
    assert sample <= cap * SAMPLE_SHARE
    fitted = fit(DIGITS_SPEC, data.split, hyperparameters("cnn", {"epochs": 6}), seed=0, device="cpu", stream=stream)
    # resident shards stayed within the pool's part of the cap, and every epoch read the version
    assert 0 < stream.meter.peak <= cap * POOL_SHARE and stream.meter.now == 0
    assert all(m.samples_per_s > 0 for m in fitted.result.history)
    assert fitted.result.history[0].train_loss > fitted.result.history[-1].train_loss
    hold = np.arange(len(IMAGES)) % 5 == 0
    score = assess(fitted.module, fitted.preprocessor, IMAGES[hold], LABELS[hold], False).score
    assert score >= 0.9, score


def test_a_failed_process_is_raised_as_cdls_own_error_else_as_a_distributed_one(tmp_path: Path) -> None:
    doc = {"rank": 1, "type": "InvalidInputError", "module": "cdl.errors", "message": "bad", "traceback": "tb"}
    (tmp_path / "error-1.json").write_text(json.dumps(doc))
    err = distributed._failure(tmp_path, 1)
    assert isinstance(err, InvalidInputError) and err.message == "bad"
    (tmp_path / "error-0.json").write_text(json.dumps({**doc, "rank": 0, "type": "RuntimeError", "module": "builtins"}))
    err = distributed._failure(tmp_path, 1)  # the lowest rank's
    assert isinstance(err, DistributedTrainingError) and err.retryable and "process 0 failed: RuntimeError" in str(err)
    for p in tmp_path.glob("error-*"):
        p.unlink()
    (tmp_path / "torchrun.log").write_text("killed")
    err = distributed._failure(tmp_path, -9)
    assert isinstance(err, DistributedTrainingError) and err.context["log"] == "killed"
    # a rank that aborted in native code: its reason is kept from before the log's tail
    native = "terminate called after throwing an instance of 'gloo::IoException'"
    (tmp_path / "torchrun.log").write_text("\n".join(["step"] * 50 + [native] + ["torchrun report"] * 400))
    log = distributed._failure(tmp_path, 1).context["log"]
    assert isinstance(log, str) and log.startswith(native) and log.endswith("torchrun report")


def test_gloo_on_cpu_and_nccl_on_cuda_one_setting_away() -> None:
    assert distributed.backend_for("cpu") == "gloo"
    cmd = distributed.launch_command(Path("/tmp/x"), 2)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc-per-node=2" in cmd
    assert cmd[-3:] == ["-m", "cdl.ml._ddp_worker", "/tmp/x"]
    env = distributed._environment(2, "gloo")
    assert env["GLOO_SOCKET_IFNAME"] == "lo" and int(env["OMP_NUM_THREADS"]) >= 1


# --------------------------------------------------------------------------- torchrun, for real


def _digits_split() -> Any:
    n = len(IMAGES)
    data = DatasetVersion(
        DIGITS_SPEC,
        1,
        {"shards": [], "offset_ranges": []},
        np.array([f"r{i}" for i in range(n)]),
        LABELS,
        (np.arange(n) % 5 == 0).astype(np.uint8),
        IMAGES,
        None,
    )
    return split_version(data, 0.1, seed=0)


def test_two_processes_through_torchrun_train_the_model_one_process_trains() -> None:
    split = _digits_split()
    hp = hyperparameters("cnn", {"epochs": 5})
    seen: list[int] = []

    def relayed(m: EpochMetrics) -> bool:
        seen.append(m.epoch)
        return True

    one = fit(DIGITS_SPEC, split, hp, seed=0, device="cpu")
    two = fit(
        DIGITS_SPEC,
        split,
        hp,
        seed=0,
        device="cpu",
        processes=2,
        timeout_s=120,
        callback=relayed,
    )
    assert seen == [1, 2, 3, 4, 5]  # rank 0's epochs, relayed as they ended
    acc = [assess(f.module, f.preprocessor, split.x_hold, split.y_hold, False).score for f in (one, two)]
    assert acc[0] >= 0.9 and abs(acc[0] - acc[1]) <= 0.03, acc
    # the same batches: the validation losses follow each other to within noise
    for a, b in zip(one.result.history, two.result.history, strict=True):
        assert abs(a.val_loss - b.val_loss) <= 0.05 + 0.2 * a.val_loss
    loaded = build_model(two.config)  # a plain module's weights (no DDP "module." prefix)
    loaded.load_state_dict(two.module.state_dict())
    assert two.result.device == "cpu" and two.result.samples_per_s > 0


def _disk_store(folder: str) -> MemoryStore:
    """The store the torchrun processes open: the objects a test wrote into ``folder``."""
    store = MemoryStore()
    for path in Path(folder).rglob("*"):
        if path.is_file():
            bucket, key = path.relative_to(folder).parts[0], "/".join(path.relative_to(folder).parts[1:])
            store.put_bytes(bucket, key, path.read_bytes())
    return store


def test_two_processes_stream_uneven_shards_without_waiting_on_each_other(tmp_path: Path) -> None:
    store = MemoryStore()
    total = write_version(store, DIGITS_SPEC, IMAGES, LABELS, [600, 150, 450, 597])  # two ranks: uneven shares
    for obj in store.list(DATASETS_BUCKET):
        path = tmp_path / DATASETS_BUCKET / obj.key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(store.get_bytes(DATASETS_BUCKET, obj.key))
    opener = functools.partial(_disk_store, str(tmp_path))
    data = prepare_version(store, DIGITS_SPEC.name, 1, memory_cap_bytes=total // 2, stream_store=opener)
    assert data.stream is not None
    hp = hyperparameters("cnn", {"epochs": 4})
    fitted = fit(DIGITS_SPEC, data.split, hp, seed=0, device="cpu", stream=data.stream, processes=2, timeout_s=120)
    assert len(fitted.result.history) == 4
    hold = np.arange(len(IMAGES)) % 5 == 0
    assert assess(fitted.module, fitted.preprocessor, IMAGES[hold], LABELS[hold], False).score >= 0.85


def test_a_run_past_its_deadline_is_stopped_whole_and_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[subprocess.Popen[bytes]] = []

    class Recorded(subprocess.Popen[bytes]):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    x = np.zeros((64, 1, 8, 8), np.float32)
    y = np.zeros(64, np.int64)
    module = build_model(_digits_config())
    with pytest.raises(DistributedTrainingError, match="deadline"):
        distributed.train_distributed(
            module, TrainConfig(epochs=1, device="cpu"), x, y, x, y, processes=2, timeout_s=1.0
        )
    [proc] = started
    assert proc.poll() is not None
    assert not [pid for pid in _pids() if _pgid(pid) == proc.pid]  # torchrun's processes are gone


def _digits_config() -> Any:
    from cdl.ml.models import ModelConfig

    return ModelConfig("cnn", (1, 8, 8), 10, hyperparameters("cnn"))


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1


# --------------------------------------------------------------------------- the trainer


def test_the_trainer_streams_a_version_over_its_memory_cap_and_says_so_in_lineage() -> None:
    from cdl.registry import ModelRegistry
    from cdl.v1 import events_pb2
    from services.trainer.settings import TrainerSettings
    from services.trainer.trainer import Trainer

    store = MemoryStore()
    total = write_version(store, DIGITS_SPEC, IMAGES, LABELS, [75] * 23 + [72])
    registry = ModelRegistry(store)
    config: dict[str, Any] = {"device": "cpu", "max_epochs": 3, "reference_rows": 50, "code_version": "git:test"}
    update = events_pb2.DataUpdated(dataset=DIGITS_SPEC.name, version=1, manifest_uri="s3://cdl-datasets/x")
    model = DIGITS_SPEC.name
    version, _ = registry.claim(model, model, 1)
    # two processes stream through a store client of their own: without one, a clear refusal
    distributed_trainer = Trainer(
        TrainerSettings(**config, processes=2, memory_cap_mb=total / 4 / 2**20), store, registry, "/t"
    )
    with pytest.raises(ConfigError, match="open_store"):
        distributed_trainer.train_version(model, version, update)
    trainer = Trainer(TrainerSettings(**config, memory_cap_mb=total / 4 / 2**20), store, registry, "/t")
    trainer.train_version(model, version, update)
    lineage = registry.document(model, version, "lineage")
    assert lineage["streamed"] is True and lineage["processes"] == 1 and lineage["records"] == len(IMAGES)
    result = registry.result(model, version)
    assert result is not None and result["accepted"], result
    assert result["metrics"]["train_samples"] > 0.7 * len(IMAGES)
