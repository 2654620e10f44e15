"""The tuner service as a real process: studies over worker processes on the session's
PostgreSQL, triggers, a worker killed mid-trial, and the trainer using what was tuned."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from sklearn.datasets import load_digits

from cdl.events import Event, decode
from cdl.kafka import Producer
from cdl.registry import ModelRegistry
from cdl.store import ObjectStore
from cdl.v1 import events_pb2
from tests.datasets import DatasetWriter, digits_spec
from tests.helpers import read_topic, wait_committed

DIGITS = load_digits()
X = DIGITS.data.reshape(-1, 1, 8, 8).astype(np.float32)
Y = [str(int(t)) for t in DIGITS.target]


def _completed(bootstrap: str, topic: str, expected: int, timeout_s: float = 240) -> list[events_pb2.TuningCompleted]:
    recs = read_topic(bootstrap, topic, expected, timeout_s)
    return [decode(r.key, r.value, list(r.headers.items())).payload for r in recs]  # type: ignore[misc]


def _study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def _workers(parent: int) -> list[int]:
    """The tuner's study worker processes (spawned children; not multiprocessing's tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "")
        if ppid == str(parent) and "spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def test_a_first_version_is_tuned_on_two_postgres_workers_and_the_next_training_uses_it(
    tuner_factory: Any,
    tuner_topics: dict[str, str],
    trainer_factory: Any,
    kafka_bootstrap: str,
    object_store: ObjectStore,
    stack: dict[str, Any],
) -> None:
    name = f"tune-{uuid.uuid4().hex[:6]}"
    writer = DatasetWriter(object_store, kafka_bootstrap, tuner_topics["updated"], digits_spec(name))
    tuner_factory(n_trials="10", first_after_model="true").start()
    # the trainer reads what the tuner publishes, and the tuner what the trainer does
    trainer_factory(
        tuning_topic=tuner_topics["completed"],
        updated_topic=tuner_topics["updated"],
        trained_topic=tuner_topics["trained"],
        max_epochs="3",
    ).start()
    writer.publish(writer.version(X[:1400], Y[:1400], [f"a{i}" for i in range(1400)]))
    [done] = _completed(kafka_bootstrap, tuner_topics["completed"], 1)
    assert done.model == name and done.study == f"{name}-1" and done.dataset_version == 1
    # the first study began once the first version was trained (on the defaults), never beside it
    assert done.reason == "first model version trained"
    # (the study's own version may already be out beside it)
    [first] = [
        p
        for r in read_topic(kafka_bootstrap, tuner_topics["trained"], 1, timeout_s=10)
        if (p := decode(r.key, r.value, list(r.headers.items())).payload).version == 1  # type: ignore[attr-defined]
    ]
    assert first.version == 1 and first.lineage.hyperparameters_source == "defaults"
    assert done.trials + done.pruned_trials >= 10 and done.pruned_trials >= 1, done
    assert done.storage.startswith("postgresql") and "@" in done.storage
    assert 0.5 < done.best_value <= 1.0 and set(done.best_params) >= {"lr", "batch_size", "channels"}
    study = _study(stack["postgres"]["url"], done.study)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert done.trial_epochs == sum(int(t.user_attrs.get("epochs", 0)) for t in study.trials)
    assert done.trial_epochs < (done.trials + done.pruned_trials) * 6  # pruning spent fewer epochs
    summary = object_store.get_json("cdl-models", f"{name}/studies/{done.study}.json")
    assert summary["best_params"] == {k: json.loads(v) for k, v in done.best_params.items()}

    registry = ModelRegistry(object_store)
    deadline = time.monotonic() + 60
    while (hp := registry.hyperparameters(name)) is None:
        assert time.monotonic() < deadline, "the trainer never stored the tuned parameters"
        time.sleep(0.2)
    assert hp[1] == f"tuning:{done.study}"
    # the study's best became a version at once, on the data it tuned on (gated like any other)
    trained = [
        decode(r.key, r.value, list(r.headers.items())).payload
        for r in read_topic(kafka_bootstrap, tuner_topics["trained"], 2, timeout_s=120)
    ]
    tuned_v = [t for t in trained if t.version == 2]
    assert tuned_v and tuned_v[0].lineage.dataset_version == 1, trained  # type: ignore[attr-defined]
    assert tuned_v[0].lineage.hyperparameters_source == f"tuning:{done.study}"  # type: ignore[attr-defined]
    # the next version: trained with the tuned parameters, its lineage names the study;
    # one version later is no reason for another study (every 50 versions)
    writer.publish(writer.version(X[1400:], Y[1400:], [f"b{i}" for i in range(len(X) - 1400)]))
    trained = [
        decode(r.key, r.value, list(r.headers.items())).payload
        for r in read_topic(kafka_bootstrap, tuner_topics["trained"], 3, timeout_s=120)
    ]
    last = [t for t in trained if t.lineage.dataset_version == 2]  # type: ignore[attr-defined]
    assert last, trained
    assert last[0].lineage.hyperparameters_source == f"tuning:{done.study}"  # type: ignore[attr-defined]
    tuned = {k: json.loads(v) for k, v in done.best_params.items()}
    assert json.loads(last[0].lineage.hyperparameters["lr"]) == tuned["lr"]  # type: ignore[attr-defined]
    # the tuner handled both versions and the three trainings: a second study would be out now
    wait_committed(kafka_bootstrap, tuner_topics["group"], tuner_topics["updated"], 2)
    wait_committed(kafka_bootstrap, tuner_topics["group"], tuner_topics["trained"], 3)
    assert len(_completed(kafka_bootstrap, tuner_topics["completed"], 1)) == 1


def test_a_worker_killed_mid_trial_leaves_no_trial_running_and_the_study_completes(
    tuner_factory: Any,
    tuner_topics: dict[str, str],
    kafka_bootstrap: str,
    object_store: ObjectStore,
    stack: dict[str, Any],
) -> None:
    name = f"kill-{uuid.uuid4().hex[:6]}"
    writer = DatasetWriter(object_store, kafka_bootstrap, tuner_topics["updated"], digits_spec(name))
    svc = tuner_factory(n_trials="8", pruner="none", max_epochs="4").start()
    writer.publish(writer.version(X, Y, [f"a{i}" for i in range(len(X))]))
    url, study_name = stack["postgres"]["url"], f"{name}-1"
    deadline = time.monotonic() + 120
    while True:  # a trial is running on a worker (the worker that runs it is killed)
        assert time.monotonic() < deadline, "no trial started"
        try:
            running = [t for t in _study(url, study_name).trials if t.state is optuna.trial.TrialState.RUNNING]
        except KeyError:  # the study is not created yet
            running = []
        workers = _workers(svc.proc.pid)
        busy = [t.user_attrs["worker_pid"] for t in running if t.user_attrs.get("worker_pid") in workers]
        if busy and len(workers) == 2:
            break
        time.sleep(0.1)
    os.kill(busy[0], signal.SIGKILL)
    [done] = _completed(kafka_bootstrap, tuner_topics["completed"], 1)
    assert done.trials + done.pruned_trials >= 8 and done.failed_trials >= 1, done
    states = [t.state for t in _study(url, study_name).trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert states.count(optuna.trial.TrialState.FAIL) == done.failed_trials


def test_a_request_and_drift_start_studies_and_a_second_trigger_during_one_starts_nothing(
    tuner_factory: Any, tuner_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    name = f"req-{uuid.uuid4().hex[:6]}"
    writer = DatasetWriter(object_store, kafka_bootstrap, tuner_topics["updated"], digits_spec(name))
    writer.version(X[:800], Y[:800], [f"a{i}" for i in range(800)])  # a version exists, not announced
    tuner_factory(n_trials="4", max_epochs="3", workers="1").start()
    producer = Producer(kafka_bootstrap)

    def send(topic: str, msg: Any) -> None:
        producer.send(topic, Event(msg, source="/cdl/test", key=name))
        producer.flush()

    def now() -> Any:
        from google.protobuf.timestamp_pb2 import Timestamp

        ts = Timestamp()
        ts.FromDatetime(datetime.now(UTC))
        return ts

    send(tuner_topics["requested"], events_pb2.TuningRequested(model=name, reason="by hand", time=now()))
    send(tuner_topics["requested"], events_pb2.TuningRequested(model=name, reason="again", time=now()))
    first = _completed(kafka_bootstrap, tuner_topics["completed"], 1)
    assert first[0].reason == "requested: by hand" and first[0].dataset_version == 1
    # the second request came before the study ended: answered by it (handled, nothing published)
    wait_committed(kafka_bootstrap, tuner_topics["group"], tuner_topics["requested"], 2)
    assert len(_completed(kafka_bootstrap, tuner_topics["completed"], 1)) == 1
    drift = events_pb2.DriftDetected(model=name, version=1, test="ks", statistic=0.4, threshold=0.2)
    send(tuner_topics["drift"], drift)
    both = _completed(kafka_bootstrap, tuner_topics["completed"], 2)
    assert [c.reason for c in both] == ["requested: by hand", "drift detected"]
    assert both[1].study == f"{name}-2"
    state = object_store.get_json("cdl-models", f"{name}/tuning.json")
    assert state["studies"] == 2 and state["last_study"] == f"{name}-2"
