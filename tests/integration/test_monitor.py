"""The monitor (a Faust app) as a real process on the real broker, with ingest, the trainer,
the gateway and Triton where the behaviour under test crosses them.

Inference-log records are produced here as the gateway writes them (``InferenceLogged``
with the request's bytes), except in the rollback test, where the real gateway logs what
it served.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from sklearn.datasets import load_digits

from cdl.datasets import DATASETS_BUCKET, load_version
from cdl.events import Event, decode
from cdl.kafka import Producer
from cdl.ml.drift import reference_sample, to_npy
from cdl.registry import MODELS_BUCKET
from cdl.store import ObjectStore
from cdl.v1 import events_pb2, ingest_pb2, ingest_pb2_grpc
from cdl.v1 import open_inference_pb2 as pb
from tests.helpers import end_offsets, metric_value, read_committed, read_topic, wait_committed, wait_for
from tests.models import write_affine

LABELS = ["a", "b", "c"]
DIGITS = load_digits()


def _version(store: ObjectStore, model: str, version: int, dataset: str, reference: np.ndarray | None = None) -> None:
    """The registry entries the monitor reads of a model version (as the trainer writes them)."""
    lineage = {"model": model, "version": version, "dataset": dataset, "labels": LABELS, "task": "tabular"}
    if reference is not None:
        lineage["labels"] = [str(i) for i in range(10)]
        store.put_bytes(MODELS_BUCKET, f"{model}/{version}/reference.npy", to_npy(reference_sample(reference, 2000)))
    store.put_json(MODELS_BUCKET, f"{model}/{version}/lineage.json", lineage)


def _request(row: np.ndarray, request_id: str) -> bytes:
    req = pb.ModelInferRequest(model_name="m", id=request_id)
    inp = req.inputs.add()
    inp.name, inp.datatype = "input", "FP32"
    inp.shape.extend([1, row.size])
    req.raw_input_contents.append(row.astype("<f4").tobytes())
    return bytes(req.SerializeToString())


def _log(producer: Producer, topic: str, model: str, version: int, rid: str, row: np.ndarray, pred: int) -> None:
    rec = events_pb2.InferenceLogged(
        request_id=rid,
        model=model,
        version=version,
        inputs_sample=_request(row, rid),
        predicted_labels=[str(pred)],
        latency_ms=2.0,
        status="OK",
    )
    producer.send(topic, Event(rec, source="/cdl/test", key=rid))


def _label(producer: Producer, topic: str, rid: str, label: str) -> None:
    producer.send_raw(topic, json.dumps({"request_id": rid, "label": label}).encode())


def _events(bootstrap: str, topic: str) -> list[Any]:
    recs = read_committed(bootstrap, topic, expected=10**6, timeout_s=1.5)
    return [decode(r.key, r.value, list(r.headers.items())).payload for r in recs]


def _metric(svc: Any, name: str, **labels: str) -> float:
    return metric_value(f"http://{svc.metrics}/metrics", name, **labels)


def _register(svc: Any, name: str, **policy: Any) -> None:
    spec = ingest_pb2.DatasetSpec(
        name=name,
        task=ingest_pb2.TASK_TABULAR_CLASSIFICATION,
        input_shape=policy.pop("input_shape", [4]),
        dtype="float32",
        labels=policy.pop("labels", LABELS),
        policy=ingest_pb2.RetrainPolicy(**policy),
        holdout_fraction=0.2,
    )
    with svc.channel() as ch:
        ingest_pb2_grpc.IngestServiceStub(ch).RegisterDataset(ingest_pb2.RegisterDatasetRequest(spec=spec))


def test_labels_joined_to_logged_requests_give_each_version_its_accuracy_and_become_records(
    monitor_factory: Any,
    monitor_topics: dict[str, str],
    ingest_factory: Any,
    ingest_topics: dict[str, str],
    kafka_bootstrap: str,
    object_store: ObjectStore,
) -> None:
    model, dataset = f"mon_{uuid.uuid4().hex[:8]}", "ds-not-registered"
    _version(object_store, model, 1, dataset)
    _version(object_store, model, 2, dataset)
    # ingest reads the same labels topic: labels of served requests are not its to dead-letter
    ingest_factory(feedback_topic=monitor_topics["feedback"]).start()
    mon = monitor_factory(join_ttl_s="4").start()
    logged, feedback = monitor_topics["logged"], monitor_topics["feedback"]
    rng = np.random.default_rng(0)
    rows = {f"r{i}": rng.normal(size=4).astype(np.float32) for i in range(60)}
    # v1 answers "a" (index 0) to r0..r39, v2 "b" (index 1) to r40..r59
    truth = {f"r{i}": ("a" if i < 30 else "b") for i in range(40)} | {
        f"r{i}": ("b" if i < 45 else "c") for i in range(40, 60)
    }
    p = Producer(kafka_bootstrap)
    for i in range(0, 60, 2):  # half the labels come before their request is logged
        _label(p, feedback, f"r{i}", truth[f"r{i}"])
    p.flush()
    for i in range(60):
        _log(p, logged, model, 1 if i < 40 else 2, f"r{i}", rows[f"r{i}"], 0 if i < 40 else 1)
    p.flush()
    for i in range(1, 60, 2):
        _label(p, feedback, f"r{i}", truth[f"r{i}"])
    for i in range(5):
        _label(p, feedback, f"nobody-{i}", "a")  # no such request: counted, never dead-lettered
    p.send_raw(feedback, json.dumps({"dataset": dataset, "record_id": "x1", "label": "a"}).encode())  # ingest's
    p.flush()

    def health() -> dict[int, list[Any]] | None:
        by_version: dict[int, list[Any]] = {}
        for h in _events(kafka_bootstrap, monitor_topics["health"]):
            if h.model == model:
                by_version.setdefault(h.version, []).append(h)
        done = {v: sum(w.feedback for w in ws) for v, ws in by_version.items()} == {1: 40, 2: 20}
        return by_version if done else None

    windows = wait_for(health, 60, "health windows with every label")
    for version, requests, accuracy in ((1, 40, 0.75), (2, 20, 0.25)):
        ws = windows[version]
        assert sum(w.requests for w in ws) == requests and sum(w.errors for w in ws) == 0
        assert sum(w.score * w.feedback for w in ws) / sum(w.feedback for w in ws) == pytest.approx(accuracy)
        assert all(w.latency_p50_ms > 0 for w in ws if w.requests)
    # every labelled request once on data.raw, as a record of the model's dataset
    raw = read_topic(kafka_bootstrap, monitor_topics["raw"], expected=60, timeout_s=30)
    docs = [json.loads(r.value) for r in raw]
    assert sorted(d["id"] for d in docs) == sorted(f"served-{rid}" for rid in rows)
    for d in docs:
        rid = d["id"].removeprefix("served-")
        assert d["dataset"] == dataset and d["label"] == truth[rid]
        assert np.allclose(d["features"], rows[rid])
    wait_for(lambda: _metric(mon, "cdl_monitor_feedback_total", outcome="unmatched") == 5, 30, "unmatched labels")
    assert _metric(mon, "cdl_monitor_feedback_total", outcome="skipped") == 1
    assert _metric(mon, "cdl_monitor_feedback_total", outcome="joined") == 60
    # ingest handled the whole labels topic (written by a plain producer: its end is its records)
    wait_committed(kafka_bootstrap, ingest_topics["group"], feedback, end_offsets(kafka_bootstrap, feedback))
    dead = read_committed(kafka_bootstrap, ingest_topics["deadletter"], expected=10**6, timeout_s=1.5)
    assert [dict(r.headers).get("cdl-error") for r in dead] == [b"unknown_dataset"]  # only the record's label


def test_a_request_logged_twice_in_one_batch_joins_its_label_once(
    monitor_factory: Any, monitor_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    """The monitor takes the log in batches: a request logged twice (a retry) whose label came
    first joins that label once, whichever of the two sees it, as one at a time would."""
    model = f"twice_{uuid.uuid4().hex[:8]}"
    _version(object_store, model, 1, "ds-twice")
    p = Producer(kafka_bootstrap)
    row = np.ones(4, np.float32)
    for n in range(20):  # 20 requests, each logged twice in a row, their labels sent before them
        _label(p, monitor_topics["feedback"], f"t{n}", "a")
    p.flush()
    for n in range(20):
        for _ in range(2):
            _log(p, monitor_topics["logged"], model, 1, f"t{n}", row, 0)
    p.flush()
    mon = monitor_factory(training_records="false").start()  # reads both topics from the start
    logged = monitor_topics["logged"]
    wait_for(lambda: _metric(mon, "cdl_monitor_events_total", topic=logged, outcome="ok") == 40, 60, "the log")

    def labelled() -> float | None:
        ws = [h for h in _events(kafka_bootstrap, monitor_topics["health"]) if h.model == model]
        return sum(w.feedback for w in ws) if sum(w.requests for w in ws) == 40 else None

    assert wait_for(labelled, 60, "the health windows of all 40 logged requests") == 20
    assert _metric(mon, "cdl_monitor_feedback_total", outcome="joined") == 20


def test_shifted_inputs_raise_drift_detected_and_unshifted_ones_do_not(
    monitor_factory: Any, monitor_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    model, dataset = f"drift_{uuid.uuid4().hex[:8]}", "digits-x"
    rng = np.random.default_rng(1)
    order = rng.permutation(len(DIGITS.data))
    train, held = order[:1400], order[1400:]  # the reference is of the training split; served: the rest
    x = DIGITS.data.astype(np.float32)
    _version(object_store, model, 1, dataset, reference=x[train])
    mon = monitor_factory().start()
    logged = monitor_topics["logged"]
    p = Producer(kafka_bootstrap)
    for i, j in enumerate(rng.choice(held, 1500)):  # unseen images, in random order
        _log(p, logged, model, 1, f"u{i}", x[j], int(DIGITS.target[j]))
    p.flush()
    wait_for(lambda: _metric(mon, "cdl_monitor_events_total", topic=logged, outcome="ok") == 1500, 60, "the log")
    tests, over = (
        _metric(mon, "cdl_monitor_drift_tests_total"),
        _metric(mon, "cdl_monitor_drift_tests_total", over="true"),
    )
    assert tests >= 10  # windows of 100 distinct images (repeats are skipped)
    assert [d for d in _events(kafka_bootstrap, monitor_topics["drift"]) if d.model == model] == []
    for i, j in enumerate(rng.choice(held, 500)):  # inverted images from here on
        _log(p, logged, model, 1, f"s{i}", 16.0 - x[j], int(DIGITS.target[j]))
    p.flush()

    def alerts() -> list[Any]:
        return [d for d in _events(kafka_bootstrap, monitor_topics["drift"]) if d.model == model]

    [alert] = wait_for(alerts, 60, "drift.detected")
    assert (alert.version, alert.dataset, alert.test) == (1, dataset, "mmd")
    assert alert.statistic > alert.threshold > 0 and alert.window_requests == 100
    # every window of shifted images was over the threshold: three in a row made the alert
    shifted_tests = _metric(mon, "cdl_monitor_drift_tests_total") - tests
    assert shifted_tests >= 3 and _metric(mon, "cdl_monitor_drift_tests_total", over="true") - over == shifted_tests

    def drifted() -> list[Any]:  # the window holding the shifted tests closes a moment later
        health = [h for h in _events(kafka_bootstrap, monitor_topics["health"]) if h.model == model]
        return [h for h in health if h.drift_statistic > h.drift_threshold > 0]

    assert wait_for(drifted, 30, "a health window with the drift statistic over its threshold")


def test_a_monitor_killed_mid_stream_recovers_its_tables_and_each_labelled_request_lands_once(
    monitor_factory: Any,
    monitor_topics: dict[str, str],
    ingest_factory: Any,
    ingest_topics: dict[str, str],
    kafka_bootstrap: str,
    object_store: ObjectStore,
) -> None:
    model, dataset = f"rec_{uuid.uuid4().hex[:8]}", f"served-{uuid.uuid4().hex[:6]}"
    _version(object_store, model, 1, dataset)
    ingest = ingest_factory(raw_topic=monitor_topics["raw"]).start()
    _register(ingest, dataset, min_new_records=60)
    mon = monitor_factory().start()
    logged, feedback = monitor_topics["logged"], monitor_topics["feedback"]
    rng = np.random.default_rng(2)
    rows = {f"k{i}": rng.normal(size=4).astype(np.float32) for i in range(60)}
    p = Producer(kafka_bootstrap)
    for i in range(60):
        _log(p, logged, model, 1, f"k{i}", rows[f"k{i}"], i % 3)
    for i in range(30):
        _label(p, feedback, f"k{i}", LABELS[i % 3])
    p.flush()
    read_topic(kafka_bootstrap, monitor_topics["raw"], expected=30, timeout_s=30)
    wait_for(lambda: _metric(mon, "cdl_monitor_events_total", topic=logged, outcome="ok") == 60, 30, "the log")
    # what was read is committed, with its changelog
    wait_committed(kafka_bootstrap, monitor_topics["group"], logged, 60)
    wait_committed(kafka_bootstrap, monitor_topics["group"], feedback, 30)
    mon.kill()  # -9: the 30 unlabelled requests live only in the served table's changelog now
    mon2 = monitor_factory().start()
    for i in range(30, 60):
        _label(p, feedback, f"k{i}", LABELS[(i + 1) % 3])  # these answers were wrong
    p.flush()
    wait_for(lambda: object_store.exists(DATASETS_BUCKET, f"{dataset}/versions/1.json"), 60, "version 1")
    data = load_version(object_store, dataset, 1)
    assert sorted(str(i) for i in data.ids) == sorted(f"served-{rid}" for rid in rows)  # each once, none lost
    assert data.x is not None and len(data.x) == 60
    labels = dict(zip((str(i) for i in data.ids), (LABELS[int(y)] for y in data.labels), strict=True))
    assert all(labels[f"served-k{i}"] == LABELS[(i if i < 30 else i + 1) % 3] for i in range(60))
    assert _metric(mon2, "cdl_monitor_feedback_total", outcome="joined") >= 30
    # what the restarted monitor sent again is a replay ingest holds: a no-op, never a duplicate_id dead letter
    assert read_committed(kafka_bootstrap, ingest_topics["deadletter"], expected=1, timeout_s=5) == []


def test_a_drift_alert_cuts_a_version_early_and_a_retraining_runs(
    ingest_factory: Any,
    ingest_topics: dict[str, str],
    trainer_factory: Any,
    trainer_topics: dict[str, str],
    kafka_bootstrap: str,
) -> None:
    name = f"early-{uuid.uuid4().hex[:6]}"
    drift_topic = f"test.drift.{uuid.uuid4().hex[:8]}"
    ingest = ingest_factory(drift_topic=drift_topic).start()
    _register(ingest, name, min_new_records=1_000_000, input_shape=[64], labels=[str(i) for i in range(10)])
    trainer_factory(updated_topic=ingest_topics["updated"], max_epochs="2").start()
    p = Producer(kafka_bootstrap)
    for i in range(600):
        doc = {"dataset": name, "id": f"e{i}", "features": DIGITS.data[i].tolist(), "label": str(DIGITS.target[i])}
        p.send_raw(ingest_topics["raw"], json.dumps(doc).encode())
    p.flush()
    wait_committed(kafka_bootstrap, ingest_topics["group"], ingest_topics["raw"], 600)  # 600 of a million: no version
    assert [u for u in _events(kafka_bootstrap, ingest_topics["updated"]) if u.dataset == name] == []
    alert = events_pb2.DriftDetected(model=name, version=1, dataset=name, test="mmd", statistic=0.4, threshold=0.01)
    p.send(drift_topic, Event(alert, source="/cdl/test", key=name))
    p.flush()

    def updated() -> list[Any]:
        return [u for u in _events(kafka_bootstrap, ingest_topics["updated"]) if u.dataset == name]

    [version] = wait_for(updated, 30, "the early version")
    assert version.version == 1 and version.total_records == 600

    def trained() -> list[Any]:
        return [t for t in _events(kafka_bootstrap, trainer_topics["trained"]) if t.model == name]

    [model] = wait_for(trained, 180, "the retraining")
    assert model.lineage.dataset_version == 1


def test_a_canary_worse_on_feedback_is_rolled_back_through_model_health(
    gateway_factory: Any,
    gateway_topics: dict[str, str],
    monitor_factory: Any,
    monitor_topics: dict[str, str],
    kafka_bootstrap: str,
    object_store: ObjectStore,
) -> None:
    n_in, n_out = 4, 3
    x = np.random.default_rng(7).normal(size=(1, n_in)).astype(np.float32)

    def weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng(seed)
        return r.normal(size=(n_in, n_out)).astype(np.float32), r.normal(size=n_out).astype(np.float32)

    def answer(seed: int) -> int:
        w, b = weights(seed)
        return int(np.argmax(x @ w + b))

    good, bad = 1, next(s for s in range(2, 50) if answer(s) != answer(1))
    model = f"fb_{uuid.uuid4().hex[:8]}"
    gw = gateway_factory(
        logged_topic=monitor_topics["logged"],
        health_topic=monitor_topics["health"],
        canary_steps="[0.5, 1.0]",
        min_samples="10",
        step_min_s="120",  # the canary would stay at 50% for minutes: only its feedback can end it
        warmup_requests="2",
        min_feedback="20",
        max_accuracy_drop="0.1",
    ).start()
    monitor_factory().start()
    deployed, compressed = gateway_topics["deployed"], gateway_topics["compressed"]
    p = Producer(kafka_bootstrap)

    def announce(version: int, seed: int) -> None:
        write_affine(object_store, model, version, *weights(seed))
        msg = events_pb2.ModelCompressed(model=model, version=version, ok=True, chosen_variant="fp32")
        p.send(compressed, Event(msg, source="/cdl/test", id=f"{model}/v{version}/compressed", key=model))
        p.flush()

    def state(version: int, wanted: int) -> Any:
        for rec in _events(kafka_bootstrap, deployed):
            if rec.model == model and rec.version == version and rec.state == wanted:
                return rec
        return None

    announce(1, good)
    wait_for(lambda: state(1, events_pb2.ROLLOUT_STATE_PROMOTED), 60, "v1 promoted")
    announce(2, bad)
    wait_for(lambda: state(2, events_pb2.ROLLOUT_STATE_CANARY), 60, "v2 in canary")
    client = tgrpc.InferenceServerClient(gw.grpc)
    served: dict[str, int] = {}
    deadline = time.monotonic() + 90
    back = None
    i = 0
    while back is None and time.monotonic() < deadline:
        inp = tgrpc.InferInput("input", [1, n_in], "FP32")
        inp.set_data_from_numpy(x)
        rid = f"{model}-{i}"
        res = client.infer(model, [inp], request_id=rid, client_timeout=10)
        version = int(res.get_response().model_version)
        served[str(version)] = served.get(str(version), 0) + 1
        _label(p, monitor_topics["feedback"], rid, str(answer(good)))  # the truth is v1's answer
        i += 1
        if i % 20 == 0:
            p.flush()
            back = state(2, events_pb2.ROLLOUT_STATE_ROLLED_BACK)
    client.close()
    assert back is not None, f"v2 not rolled back; served {served}"
    assert back.reason.startswith("accuracy on feedback"), back.reason
    assert served.get("2", 0) > 0 and served.get("1", 0) > 0
