"""A regression dataset through the loop on the real stack: scikit-learn's diabetes set
registered as ``--task regression``, produced to Kafka, versioned by ingest, trained and gated by
the trainer on R², compressed by the compressor, served by the gateway in the target's units,
and scored by the monitor on feedback in the same metric (R², RMSE, MAE)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np
import tritonclient.grpc as tgrpc
from confluent_kafka import Producer as KProducer
from sklearn.datasets import load_diabetes
from sklearn.metrics import r2_score
from tritonclient.utils import InferenceServerException

from cdl.events import decode
from cdl.kafka.security import secured
from cdl.store import ObjectStore
from cdl.v1 import events_pb2, ingest_pb2, ingest_pb2_grpc
from tests.helpers import committed_payloads, read_topic, wait_for

DIABETES = load_diabetes()


def test_a_regression_is_trained_gated_served_and_monitored_on_its_metric(
    kafka_bootstrap: str,
    object_store: ObjectStore,
    ingest_factory: Any,
    ingest_topics: dict[str, str],
    trainer_factory: Any,
    trainer_topics: dict[str, str],
    compressor_factory: Any,
    compressor_topics: dict[str, str],
    gateway_factory: Any,
    monitor_factory: Any,
    monitor_topics: dict[str, str],
) -> None:
    svc = ingest_factory().start()
    # patience 15: a small-data MLP's validation R² is noisy, and the default 6 stopped one CI run
    # at epoch 7 with a holdout R² of 0.24
    trainer_factory(updated_topic=ingest_topics["updated"], max_epochs="60", patience="15").start()
    compressor_factory(trained_topic=trainer_topics["trained"], latency_runs="20").start()
    gw = gateway_factory(
        compressed_topic=compressor_topics["compressed"],
        logged_topic=monitor_topics["logged"],
        health_topic=monitor_topics["health"],
        warmup_requests="2",
    ).start()
    monitor_factory().start()
    name = f"diabetes-{uuid.uuid4().hex[:6]}"
    spec = ingest_pb2.DatasetSpec(
        name=name,
        task=ingest_pb2.TASK_REGRESSION,
        input_shape=[10],
        dtype="float32",
        labels=["progression"],
        policy=ingest_pb2.RetrainPolicy(min_new_records=400),
        holdout_fraction=0.2,
    )
    with svc.channel() as ch:
        ingest_pb2_grpc.IngestServiceStub(ch).RegisterDataset(ingest_pb2.RegisterDatasetRequest(spec=spec), timeout=10)
    producer = KProducer(secured({"bootstrap.servers": kafka_bootstrap}))
    x, y = DIABETES.data.astype(np.float32), DIABETES.target.astype(np.float32)
    for i in range(len(x)):  # the target as a JSON number (and one that is not a number)
        doc = {"dataset": name, "id": f"r{i}", "features": x[i].tolist(), "label": float(y[i])}
        producer.produce(ingest_topics["raw"], json.dumps(doc).encode())
    bad = {"dataset": name, "id": "bad", "features": x[0].tolist(), "label": "about 150"}
    producer.produce(ingest_topics["raw"], json.dumps(bad).encode())
    assert producer.flush(30) == 0

    [trained] = wait_for(lambda: committed_payloads(kafka_bootstrap, trainer_topics["trained"]), 300, "v1 trained")
    assert trained.verdict == events_pb2.VERDICT_ACCEPTED, trained.reason
    assert trained.metric == "r2" and "holdout r2" in trained.reason
    assert trained.challenger_score > 0.3 and trained.metrics["holdout_r2"] == trained.challenger_score
    assert trained.metrics["holdout_rmse"] > 1.0 and trained.metrics["holdout_mae"] > 1.0  # the target's units
    dead = read_topic(kafka_bootstrap, ingest_topics["deadletter"], expected=1, timeout_s=30)
    assert [dict(r.headers).get("cdl-error") for r in dead] == [b"bad_label"]

    [compressed] = wait_for(
        lambda: committed_payloads(kafka_bootstrap, compressor_topics["compressed"]), 300, "v1 compressed"
    )
    assert compressed.ok, compressed.reason
    fp32 = next(v for v in compressed.variants if v.name == "fp32")
    assert abs(fp32.accuracy - trained.challenger_score) < 1e-3  # the variants' score is R² too
    assert "r2" in compressed.reason

    client = tgrpc.InferenceServerClient(gw.grpc)
    rows = np.arange(0, len(x), 4)  # a quarter of the records, answered one request each

    def infer(i: int) -> Any:
        inp = tgrpc.InferInput("input", [1, 10], "FP32")
        inp.set_data_from_numpy(x[i : i + 1])
        return client.infer(name, [inp], request_id=f"{name}-{i}", client_timeout=10)

    def serving() -> bool:
        try:
            return bool(infer(0).get_response().model_version == "1")
        except InferenceServerException:
            return False

    wait_for(serving, 120, "v1 serving at the gateway")
    answers = np.array([float(infer(int(i)).as_numpy("logits")[0, 0]) for i in rows])
    client.close()
    assert 20 < answers.mean() < 300  # the target's units (25..346), not standardised values
    served_r2 = r2_score(y[rows], answers)
    assert served_r2 > 0.3, served_r2
    for i in rows:  # the truth arrives later, as feedback on each request
        doc = {"request_id": f"{name}-{int(i)}", "label": str(float(y[i]))}
        producer.produce(monitor_topics["feedback"], json.dumps(doc).encode())
    assert producer.flush(30) == 0

    def health() -> list[Any] | None:
        recs = read_topic(kafka_bootstrap, monitor_topics["health"], expected=10**6, timeout_s=1.5)
        ws = [h for h in (decode(r.key, r.value, list(r.headers.items())).payload for r in recs) if h.model == name]
        return ws if sum(w.feedback for w in ws) >= len(rows) else None

    windows = wait_for(health, 90, "health windows with every label")
    scored = [w for w in windows if w.feedback]
    assert all(w.metric == "r2" and w.rmse > 0 and w.mae > 0 for w in scored)
    n = sum(w.feedback for w in scored)
    mae = sum(w.mae * w.feedback for w in scored) / n
    assert n == len(rows) and abs(mae - float(np.abs(answers - y[rows]).mean())) < 0.01 * mae
    if len(scored) == 1:  # one window: exactly the R² of what was served
        assert abs(scored[0].score - served_r2) < 1e-3
