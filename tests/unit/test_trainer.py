"""The trainer's decisions (services/trainer/trainer.py) without servers: a dataset version
written by ingest's own code into an in-memory object store (tests/fakes.py), trained on CPU
for two epochs, the verdict, the registry and the model.trained event checked.

tests/integration/test_trainer.py runs the service itself against Kafka and MinIO (the
consumer loop, coalescing, a kill -9 mid-training, the dead-letter topic).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from sklearn.datasets import load_digits

from cdl.datasets import holdout_member, manifest_key
from cdl.errors import ConflictError, InvalidInputError, NotFoundError
from cdl.events import Event, OutRecord
from cdl.failure import DEFAULT_POLICY, DeadLetterReason, Verdict
from cdl.ml.core import hyperparameters
from cdl.ml.drift import from_npy
from cdl.ml.models import ModelConfig, build_model
from cdl.registry import MODELS_BUCKET, ModelRegistry
from cdl.v1 import events_pb2
from services.trainer.settings import TrainerSettings
from services.trainer.trainer import Trainer
from tests.datasets import DatasetWriter, digits_spec
from tests.fakes import MemoryStore, RecordingProducer

DIGITS = load_digits()
X = DIGITS.data.reshape(-1, 1, 8, 8).astype(np.float32)
Y = [str(int(t)) for t in DIGITS.target]
N = 500  # records of a version: two epochs take about a second on a CPU
UPDATED, TRAINED = "data.updated", "model.trained"


class Loop:
    """A trainer as its service runs it: ingest's data.updated in, what the job returns produced."""

    def __init__(self, **settings: Any) -> None:
        self.store = MemoryStore()
        self.registry = ModelRegistry(self.store)
        self.producer = RecordingProducer()
        self.writer = DatasetWriter(self.store, self.producer, UPDATED, digits_spec("digits"))
        config: dict[str, Any] = {"device": "cpu", "max_epochs": 2, "reference_rows": 100, "code_version": "git:test"}
        self.trainer = Trainer(TrainerSettings(**{**config, **settings}), self.store, self.registry, "/cdl/test")

    def publish_version(self, first: int = 0) -> Event:
        """A version of ``N`` digits (ids from ``first``), published as ingest publishes it;
        returns the event."""
        rows = slice(first, first + N)
        self.writer.publish(self.writer.version(X[rows], Y[rows], [f"r{i}" for i in range(first, first + N)]))
        return self.producer.events(UPDATED)[-1]

    def handle(self, event: Event) -> list[events_pb2.ModelTrained]:
        """Run the job; produce its records; the model.trained payloads they carry."""
        out: list[OutRecord] = self.trainer.handle(event)
        for record in out:
            self.producer.send_record(record)
        return [e.payload for e in self.producer.events(TRAINED)[-len(out) :]] if out else []  # type: ignore[misc]


def _dead_letter(exc: BaseException) -> tuple[Verdict, DeadLetterReason | None]:
    """What the job loop does with the job's failure (cdl.failure, the one policy)."""
    return DEFAULT_POLICY.verdict(exc, attempt=1)


def test_a_first_version_is_accepted_as_champion_with_lineage_to_its_dataset_version() -> None:
    loop = Loop()
    updated = loop.publish_version()
    [trained] = loop.handle(updated)

    assert (trained.model, trained.version, trained.verdict) == ("digits", 1, events_pb2.VERDICT_ACCEPTED)
    assert trained.reason.startswith("first accepted version: holdout accuracy")
    assert trained.family == "cnn" and trained.metric == "accuracy"
    # chance on ten digits is 0.1: the gate's floor is 0.2 (min_accuracy_over_chance 0.1)
    assert trained.challenger_score == trained.metrics["holdout_accuracy"] >= 0.5
    assert trained.champion_score == 0.0 and trained.metrics["epochs"] == 2.0
    assert trained.checkpoint_uri == "s3://cdl-models/digits/1/model.safetensors"
    lineage = trained.lineage
    assert (lineage.dataset, lineage.dataset_version, lineage.parent_version) == ("digits", 1, 0)
    assert [(r.topic, r.partition, r.first, r.last) for r in lineage.offset_ranges] == [("data.raw", 0, 0, N - 1)]
    assert lineage.hyperparameters_source == "defaults" and lineage.hyperparameters["channels"] == "32"
    assert (lineage.code_version, lineage.device) == ("git:test", "cpu")

    registry = loop.registry
    assert registry.champion("digits") == 1 and registry.versions("digits") == [1]
    doc = registry.document("digits", 1, "lineage")
    assert doc["manifest_uri"] == f"s3://cdl-datasets/{manifest_key('digits', 1)}" and doc["records"] == N
    assert doc["warm_start"] is False and doc["labels"] == [str(i) for i in range(10)]
    loaded = registry.load("digits", 1)  # the checkpoint reads back into the family's module
    assert loaded.config.family == "cnn" and loaded.preprocessor.kind == "standardize"
    reference = from_npy(registry.reference("digits", 1) or b"")  # the monitor's drift reference
    assert reference.shape == (100, 64)
    progress = loop.store.get_json(MODELS_BUCKET, "digits/training.json")  # what `cdl models` shows
    assert (progress["version"], progress["epoch"], progress["epochs"]) == (1, 2, 2)

    # a redelivered event (its commit lost in a crash): the same verdict, published again, no new version
    checkpoint = loop.store.get_bytes(MODELS_BUCKET, "digits/1/model.safetensors")
    [again] = loop.handle(updated)
    assert again == trained and loop.producer.events(TRAINED)[0].id == loop.producer.events(TRAINED)[1].id
    assert registry.versions("digits") == [1]
    assert loop.store.get_bytes(MODELS_BUCKET, "digits/1/model.safetensors") == checkpoint


def test_a_claim_abandoned_for_a_newer_dataset_version_passes_its_number_on() -> None:
    """The trainer killed while it trained dataset version 1 (model version 1 claimed), and
    restarted on a backlog it coalesced to dataset version 2: version 2 of the data becomes
    model version 1, not 2 (model versions have no gaps); a process still training the
    superseded claim cannot save over it."""
    loop = Loop()
    first = loop.publish_version()
    assert loop.registry.claim("digits", "digits", 1) == (1, True)  # the killed job's claim
    second = loop.publish_version(first=N)
    [trained] = loop.handle(second)

    assert (trained.version, trained.lineage.dataset_version) == (1, 2)
    claim = loop.registry.document("digits", 1, "claim")
    assert (claim["dataset_version"], claim["superseded"]) == (2, 1)
    assert not loop.store.exists(MODELS_BUCKET, "digits/claims/d000000001.json")
    # the superseded job, trained on elsewhere (a zombie): refused before it writes anything
    checkpoint = loop.store.get_bytes(MODELS_BUCKET, "digits/1/model.safetensors")
    update = first.payload
    assert isinstance(update, events_pb2.DataUpdated)
    with pytest.raises(ConflictError, match="claimed again for dataset version 2"):
        loop.trainer.train_version("digits", 1, update)
    assert loop.store.get_bytes(MODELS_BUCKET, "digits/1/model.safetensors") == checkpoint
    # a claim with a result is never taken over, and a study's claim is its own
    assert loop.registry.claim("digits", "digits", 3) == (2, True)
    assert loop.registry.claim("digits", "digits", 3, cause="study-s9") == (3, True)
    assert loop.registry.claim("digits", "digits", 4) == (2, True)  # version 2's claim (for 3) was abandoned
    assert loop.registry.versions("digits") == [1, 2, 3]


def test_a_studys_best_worse_than_the_champion_is_rejected_and_the_champion_stays() -> None:
    """A finished study's hyperparameters are recorded and a version trained with them on the
    data it tuned on; gated like any other, a worse one is rejected with the reason."""
    loop = Loop()
    updated = loop.publish_version()
    [first] = loop.handle(updated)
    assert first.verdict == events_pb2.VERDICT_ACCEPTED
    # a study's "best": a narrower network (another architecture: trained from scratch) that barely learns
    params = {"channels": 4, "lr": 1e-6, "epochs": 1}
    done = events_pb2.TuningCompleted(model="digits", study="s1", dataset="digits", dataset_version=1)
    for k, v in params.items():
        done.best_params[k] = json.dumps(v)
    tuning = Event(done, source="/cdl/tuner", key="digits")
    [second] = loop.handle(tuning)

    assert (second.version, second.verdict) == (2, events_pb2.VERDICT_REJECTED)
    assert second.challenger_score < second.champion_score - 0.005
    assert f"< champion v1 {second.champion_score:.4f}" in second.reason
    assert second.champion_score == pytest.approx(first.challenger_score)  # the champion, on the same holdout
    assert second.lineage.hyperparameters_source == "tuning:s1" and second.lineage.parent_version == 0
    assert second.lineage.dataset_version == 1
    registry = loop.registry
    assert registry.champion("digits") == 1
    assert registry.hyperparameters("digits") == (params, "tuning:s1")  # the next trainings start from them
    assert registry.document("digits", 2, "claim")["cause"] == "study-s1"
    # the study's event again: the same version's verdict, nothing trained twice
    assert loop.handle(tuning) == [second] and registry.versions("digits") == [1, 2]


def test_without_a_champion_a_version_below_chance_plus_the_margin_is_rejected() -> None:
    loop = Loop(min_accuracy_over_chance=0.95)  # a floor of 1.05: nothing reaches it
    [trained] = loop.handle(loop.publish_version())
    assert trained.verdict == events_pb2.VERDICT_REJECTED
    assert trained.reason.endswith("is below 1.0500 (chance + margin)"), trained.reason
    assert loop.registry.champion("digits") is None
    assert loop.registry.result("digits", 1) is not None  # trained and saved: only not accepted


def test_a_version_without_holdout_records_is_refused_and_dead_lettered() -> None:
    loop = Loop()
    ids = [rid for rid in (f"t{i}" for i in range(200)) if not holdout_member("digits", rid, 0.2)][:40]
    loop.writer.publish(loop.writer.version(X[: len(ids)], Y[: len(ids)], ids))
    with pytest.raises(InvalidInputError, match="too small to train and evaluate") as exc:
        loop.handle(loop.producer.events(UPDATED)[-1])
    assert _dead_letter(exc.value) == (Verdict.DEAD_LETTER, DeadLetterReason.PERMANENT)
    assert loop.registry.champion("digits") is None and loop.registry.result("digits", 1) is None


def test_a_missing_dataset_version_and_a_foreign_event_are_dead_lettered() -> None:
    loop = Loop()
    missing = events_pb2.DataUpdated(
        dataset="digits", version=7, manifest_uri="s3://cdl-datasets/digits/versions/7.json"
    )
    with pytest.raises(NotFoundError, match="object not found") as exc:
        loop.handle(Event(missing, source="/cdl/ingest", key="digits"))
    assert _dead_letter(exc.value) == (Verdict.DEAD_LETTER, DeadLetterReason.PERMANENT)
    assert loop.producer.events(TRAINED) == []

    foreign = Event(events_pb2.ModelCompressed(model="digits", version=1), source="/cdl/compressor")
    with pytest.raises(InvalidInputError, match="cannot handle this event type") as err:
        loop.handle(foreign)
    assert _dead_letter(err.value) == (Verdict.DEAD_LETTER, DeadLetterReason.PERMANENT)


def _weights(channels: int, seed: int) -> tuple[bytes, dict[str, torch.Tensor]]:
    config = ModelConfig("cnn", (1, 8, 8), 10, {**hyperparameters("cnn"), "channels": channels})
    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in build_model(config).state_dict().items()}
    return safetensors.torch.save(state), state


def test_a_first_version_starts_from_an_uploaded_checkpoint_with_its_frozen_layers_kept() -> None:
    loop = Loop()
    weights, uploaded = _weights(channels=32, seed=3)
    loop.registry.set_start("digits", weights, ["features.0.*"], "user.safetensors")
    [trained] = loop.handle(loop.publish_version())
    assert trained.verdict == events_pb2.VERDICT_ACCEPTED, trained.reason
    state = loop.registry.load("digits", 1).module.state_dict()
    assert torch.equal(state["features.0.weight"], uploaded["features.0.weight"])  # frozen: as uploaded
    assert torch.equal(state["features.0.bias"], uploaded["features.0.bias"])
    assert not torch.equal(state["head.2.weight"], uploaded["head.2.weight"])  # the rest trained
    start = loop.registry.document("digits", 1, "lineage")["start"]
    assert start["loaded"] is True and start["source"] == "user.safetensors"
    assert start["frozen_parameters"] == ["features.0.weight", "features.0.bias"]


@pytest.mark.parametrize(
    ("channels", "freeze", "error"),
    [(4, [], "does not fit the model"), (32, ["nothing.*"], "freeze patterns match no parameter")],
)
def test_a_starting_point_that_does_not_fit_is_refused_and_dead_lettered(
    channels: int, freeze: list[str], error: str
) -> None:
    loop = Loop()
    loop.registry.set_start("digits", _weights(channels, seed=0)[0], freeze, "user.safetensors")
    with pytest.raises(InvalidInputError, match=error) as exc:
        loop.handle(loop.publish_version())
    assert _dead_letter(exc.value) == (Verdict.DEAD_LETTER, DeadLetterReason.PERMANENT)
    assert loop.registry.champion("digits") is None and loop.registry.result("digits", 1) is None
