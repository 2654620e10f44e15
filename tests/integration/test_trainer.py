"""The trainer service as a real process against real Kafka and MinIO."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits

from cdl.datasets import holdout_member
from cdl.events import decode
from cdl.ml.core import hyperparameters
from cdl.ml.drift import from_npy
from cdl.ml.models import ModelConfig, build_model
from cdl.registry import ModelRegistry
from cdl.store import ObjectStore
from cdl.v1 import events_pb2
from tests.datasets import DatasetWriter, digits_spec
from tests.helpers import read_committed, run_cdl, wait_committed

DIGITS = load_digits()
X = DIGITS.data.reshape(-1, 1, 8, 8).astype(np.float32)
Y = [str(int(t)) for t in DIGITS.target]


def _trained(bootstrap: str, topic: str, expected: int, timeout_s: float = 120) -> list[events_pb2.ModelTrained]:
    recs = read_committed(bootstrap, topic, expected, timeout_s)
    return [decode(r.key, r.value, list(r.headers.items())).payload for r in recs]  # type: ignore[misc]


def _status(svc: Any) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{svc.metrics}/readyz", timeout=2) as resp:
        return dict(json.loads(resp.read()))


def _wait_training(svc: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _status(svc).get("busy"):
            return
        time.sleep(0.1)
    raise AssertionError("trainer never started training")


def test_first_version_from_scratch_second_warm_starts_with_lineage(
    trainer_factory: Any, trainer_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    name = f"digits-{uuid.uuid4().hex[:6]}"
    writer = DatasetWriter(object_store, kafka_bootstrap, trainer_topics["updated"], digits_spec(name))
    # lineage and warm start are what this test is about: a gate with room for a fine-tune's
    # variance on a small holdout (its rejections are the next test's)
    trainer_factory(tolerance="0.03").start()
    writer.publish(writer.version(X[:1400], Y[:1400], [f"a{i}" for i in range(1400)]))
    [first] = _trained(kafka_bootstrap, trainer_topics["trained"], 1)
    assert (first.model, first.version, first.verdict) == (name, 1, events_pb2.VERDICT_ACCEPTED)
    assert first.lineage.parent_version == 0 and first.lineage.dataset_version == 1
    assert first.lineage.hyperparameters_source == "defaults"
    assert first.lineage.device == "cpu" and first.lineage.code_version
    assert first.family == "cnn"
    # scikit-learn's digits: the CNN reaches >= 0.95 on the holdout
    assert first.metrics["holdout_accuracy"] >= 0.95, first.metrics
    assert first.checkpoint_uri == f"s3://cdl-models/{name}/1/model.safetensors"

    writer.publish(writer.version(X[1400:], Y[1400:], [f"b{i}" for i in range(len(X) - 1400)]))
    trained = _trained(kafka_bootstrap, trainer_topics["trained"], 2)
    second = trained[1]
    assert second.version == 2 and second.lineage.dataset_version == 2
    assert second.lineage.parent_version == 1  # warm-started from the champion
    assert second.verdict == events_pb2.VERDICT_ACCEPTED, second.reason
    registry = ModelRegistry(object_store)
    lineage = registry.document(name, 2, "lineage")
    assert lineage["warm_start"] is True and lineage["offset_ranges"]
    assert lineage["labels"] == [str(i) for i in range(10)] and lineage["task"] == "image_classification"
    reference = from_npy(registry.reference(name, 2) or b"")  # the monitor's drift reference
    assert reference.shape[1] == 64 and 0 < len(reference) <= 2000
    assert registry.champion(name) == 2
    loaded = registry.load(name, 2)
    assert loaded.config.family == "cnn" and loaded.preprocessor.kind == "standardize"
    metrics = registry.document(name, 2, "metrics")
    assert len(metrics["epochs"]) >= 1 and "val_score" in metrics["epochs"][0]
    # the training showed its progress each epoch (what `cdl models` reads while it runs)
    progress = object_store.get_json("cdl-models", f"{name}/training.json")
    assert progress["version"] == 2 and progress["epoch"] == len(metrics["epochs"]) and progress["samples_per_s"] > 0
    assert lineage["family"]["family"] == "cnn" and lineage["family"]["package"] == "cdl"


def test_challenger_on_shuffled_labels_is_rejected_with_the_reason(
    trainer_factory: Any, trainer_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    name = f"shuffled-{uuid.uuid4().hex[:6]}"
    writer = DatasetWriter(object_store, kafka_bootstrap, trainer_topics["updated"], digits_spec(name))
    trainer_factory().start()
    writer.publish(writer.version(X, Y, [f"a{i}" for i in range(len(X))]))
    [first] = _trained(kafka_bootstrap, trainer_topics["trained"], 1)
    assert first.verdict == events_pb2.VERDICT_ACCEPTED
    # four times as much new data whose training labels are shuffled (holdout labels stay true)
    rng = np.random.default_rng(7)
    ids = [f"s{k}-{i}" for k in range(4) for i in range(len(X))]
    xs = np.concatenate([X] * 4)
    ys = [Y[i % len(X)] if holdout_member(name, rid, 0.2) else str(rng.integers(10)) for i, rid in enumerate(ids)]
    writer.publish(writer.version(xs, ys, ids))
    second = _trained(kafka_bootstrap, trainer_topics["trained"], 2)[1]
    assert second.verdict == events_pb2.VERDICT_REJECTED
    assert second.challenger_score < second.champion_score - 0.005
    assert f"< champion v1 {second.champion_score:.4f}" in second.reason
    assert ModelRegistry(object_store).champion(name) == 1  # the champion stays


def test_backlog_during_a_training_coalesces_to_the_newest(
    trainer_factory: Any, trainer_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    name = f"backlog-{uuid.uuid4().hex[:6]}"
    writer = DatasetWriter(object_store, kafka_bootstrap, trainer_topics["updated"], digits_spec(name))
    # a first version big enough that its training lasts seconds, then three small ones
    first = writer.version(np.concatenate([X, X]), Y + Y, [f"a{i}" for i in range(2 * len(X))])
    extra = [writer.version(X[:100], Y[:100], [f"r{k}-{j}" for j in range(100)]) for k in range(3)]
    versions = [first, *extra]
    svc = trainer_factory(patience="0").start()
    writer.publish(versions[0])
    _wait_training(svc)
    for v in versions[1:]:  # three more arrive while the first trains
        writer.publish(v)
    _trained(kafka_bootstrap, trainer_topics["trained"], 2, timeout_s=90)
    # every version handled (the group committed past them): a (wrong) third training would be there
    wait_committed(kafka_bootstrap, trainer_topics["group"], trainer_topics["updated"], len(versions))
    trained = _trained(kafka_bootstrap, trainer_topics["trained"], 2)
    assert [(t.version, t.lineage.dataset_version) for t in trained] == [(1, 1), (2, 4)]
    assert _status(svc)["coalesced"] == 2


def test_kill_9_mid_training_trains_the_version_once_and_publishes_once(
    trainer_factory: Any, trainer_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    name = f"kill-{uuid.uuid4().hex[:6]}"
    writer = DatasetWriter(object_store, kafka_bootstrap, trainer_topics["updated"], digits_spec(name))
    svc = trainer_factory().start()
    writer.publish(writer.version(X, Y, [f"a{i}" for i in range(len(X))]))
    _wait_training(svc)
    time.sleep(1.0)
    svc.kill()
    registry = ModelRegistry(object_store)
    assert registry.versions(name) == [1] and registry.result(name, 1) is None  # claimed, not finished
    trainer_factory().start()
    _trained(kafka_bootstrap, trainer_topics["trained"], 1, timeout_s=90)
    wait_committed(kafka_bootstrap, trainer_topics["group"], trainer_topics["updated"], 1)
    trained = _trained(kafka_bootstrap, trainer_topics["trained"], 1)
    assert [(t.model, t.version) for t in trained] == [(name, 1)]
    assert registry.versions(name) == [1] and registry.result(name, 1) is not None


def test_a_training_window_reads_only_the_newest_shards_and_lineage_names_their_offsets(
    trainer_factory: Any, trainer_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    name = f"window-{uuid.uuid4().hex[:6]}"
    writer = DatasetWriter(object_store, kafka_bootstrap, trainer_topics["updated"], digits_spec(name))
    writer.version(X, Y, [f"old{i}" for i in range(len(X))])  # shard 1: offsets 0..1796
    newest = writer.version(X[:1200], Y[:1200], [f"new{i}" for i in range(1200)])  # shard 2: 1797..2996
    trainer_factory(window_records="1000").start()
    writer.publish(newest)  # version 2 holds 2,997 records; the window takes the newest shard
    [trained] = _trained(kafka_bootstrap, trainer_topics["trained"], 1)
    assert trained.verdict == events_pb2.VERDICT_ACCEPTED, trained.reason
    lineage = ModelRegistry(object_store).document(name, 1, "lineage")
    assert lineage["dataset_version"] == 2 and lineage["windowed"] is True and lineage["records"] == 1200
    assert [(r["partition"], r["first"], r["last"]) for r in lineage["offset_ranges"]] == [(0, 1797, 2996)]
    metrics = ModelRegistry(object_store).document(name, 1, "metrics")
    assert metrics["holdout_accuracy"] > 0.8


def test_a_first_version_fine_tunes_from_an_uploaded_checkpoint_with_frozen_layers(
    trainer_factory: Any,
    trainer_topics: dict[str, str],
    kafka_bootstrap: str,
    object_store: ObjectStore,
    stack: dict[str, Any],
    tmp_path: Path,
) -> None:
    """`cdl checkpoint upload` gives a model a starting point: its first version starts from those
    weights, the parameters matching --freeze are exactly the uploaded ones after training, and the
    lineage records the start; weights that do not fit the family's module dead-letter the version
    with the reason."""
    name, misfit = f"start-{uuid.uuid4().hex[:6]}", f"misfit-{uuid.uuid4().hex[:6]}"
    config = ModelConfig("cnn", (1, 8, 8), 10, hyperparameters("cnn"))
    torch.manual_seed(3)
    user = build_model(config)  # "pretrained": any weights of the family's architecture
    torch.save(user.state_dict(), tmp_path / "user.pt")
    state_dir = Path(stack["state_dir"])
    up = run_cdl(
        "checkpoint", "upload", name, str(tmp_path / "user.pt"), "--freeze", "features.0.*", state_dir=state_dir
    )
    assert up.returncode == 0, up.stdout + up.stderr
    small = build_model(ModelConfig("cnn", (1, 8, 8), 10, {**hyperparameters("cnn"), "channels": 4}))
    torch.save(small.state_dict(), tmp_path / "small.pt")
    assert run_cdl("checkpoint", "upload", misfit, str(tmp_path / "small.pt"), state_dir=state_dir).returncode == 0
    bad = run_cdl("checkpoint", "upload", name, str(tmp_path), state_dir=state_dir)  # a directory: refused
    assert bad.returncode == 1 and "not a state dict" in bad.stdout

    trainer_factory(max_epochs="2").start()
    for model in (name, misfit):
        writer = DatasetWriter(object_store, kafka_bootstrap, trainer_topics["updated"], digits_spec(model))
        writer.publish(writer.version(X, Y, [f"a{i}" for i in range(len(X))]))
    [first] = [t for t in _trained(kafka_bootstrap, trainer_topics["trained"], 1) if t.model == name]
    assert first.verdict == events_pb2.VERDICT_ACCEPTED, first.reason
    trained = ModelRegistry(object_store).load(name, 1).module.state_dict()
    uploaded = user.state_dict()
    assert torch.equal(trained["features.0.weight"], uploaded["features.0.weight"])  # frozen: unchanged
    assert torch.equal(trained["features.0.bias"], uploaded["features.0.bias"])
    assert not torch.equal(trained["head.2.weight"], uploaded["head.2.weight"])  # the rest was trained
    start = ModelRegistry(object_store).document(name, 1, "lineage")["start"]
    assert start["loaded"] is True and start["source"] == "user.pt" and len(start["sha256"]) == 64
    assert start["frozen_parameters"] == ["features.0.weight", "features.0.bias"]
    dead = read_committed(kafka_bootstrap, trainer_topics["deadletter"], expected=1, timeout_s=60)
    assert len(dead) == 1 and b"does not fit the model" in dead[0].headers["cdl-reason"]
