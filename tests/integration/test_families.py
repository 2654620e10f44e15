"""A user's model family through the loop: the example plugin (examples/resnet_family, a
torchvision ResNet-18 adapted to 8x8 digits) registered by name, trained by the trainer,
compressed by the compressor, served by the gateway and rolled out as a canary — with no code of
it in cdl. And a family name no environment installs is refused at registration in one line."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from confluent_kafka import Producer as KProducer
from sklearn.datasets import load_digits
from tritonclient.utils import InferenceServerException

from cdl.events import decode
from cdl.kafka.security import secured
from cdl.store import ObjectStore
from cdl.v1 import events_pb2, ingest_pb2, ingest_pb2_grpc
from cdl_tools.demo import digits_spec
from tests.helpers import committed_payloads, read_topic, register_digits, wait_for

DIGITS = load_digits()
FAST = {"canary_steps": "[0.5, 1.0]", "min_samples": "10", "step_min_s": "0.3", "warmup_requests": "2"}


def _spec(name: str, family: str) -> ingest_pb2.DatasetSpec:
    spec = digits_spec(700, 0.0, name)
    spec.family = family
    return spec


def test_an_unknown_family_is_refused_at_registration(ingest_factory: Any) -> None:
    """A name no installed package declares, or one that could not be a name (a module path), is
    INVALID_ARGUMENT with a one-line reason; nothing is imported for it."""
    svc = ingest_factory().start()
    details: dict[str, str] = {}
    with svc.channel() as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        for family in ("no-such-family", "os:system"):
            with pytest.raises(grpc.RpcError) as err:
                stub.RegisterDataset(ingest_pb2.RegisterDatasetRequest(spec=_spec("x", family)), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details[family] = err.value.details() or ""
    unknown, path = details["no-such-family"], details["os:system"]
    assert "unknown model family 'no-such-family'" in unknown and "installed: cnn, mlp, resnet18, text" in unknown
    assert "family must be" in path
    assert "\n" not in unknown + path


@pytest.mark.timeout(900)  # two versions of a ResNet-18 trained, compressed four ways and rolled out
def test_the_example_family_trains_compresses_serves_and_rolls_out_as_a_canary(
    kafka_bootstrap: str,
    object_store: ObjectStore,
    ingest_factory: Any,
    ingest_topics: dict[str, str],
    trainer_factory: Any,
    trainer_topics: dict[str, str],
    compressor_factory: Any,
    compressor_topics: dict[str, str],
    gateway_factory: Any,
    gateway_topics: dict[str, str],
) -> None:
    svc = ingest_factory().start()
    # 4 epochs: at 2 (20 steps of 64 images) a ResNet-18 sometimes stays near chance (0.16 once in CI)
    trainer_factory(updated_topic=ingest_topics["updated"], max_epochs="4").start()
    compressor_factory(trained_topic=trainer_topics["trained"]).start()
    gw = gateway_factory(compressed_topic=compressor_topics["compressed"], **FAST).start()
    name = f"resnet-{uuid.uuid4().hex[:6]}"
    with svc.channel() as ch:
        register_digits(ch, name, min_new_records=700, family="resnet18")
    producer = KProducer(secured({"bootstrap.servers": kafka_bootstrap}))

    def wave(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            doc = {"dataset": name, "id": f"r{i}", "features": DIGITS.data[i].tolist(), "label": int(DIGITS.target[i])}
            producer.produce(ingest_topics["raw"], json.dumps(doc).encode())
        assert producer.flush(30) == 0

    wave(0, 800)  # version 1
    [trained] = wait_for(lambda: committed_payloads(kafka_bootstrap, trainer_topics["trained"]), 300, "v1 trained")
    assert trained.verdict == events_pb2.VERDICT_ACCEPTED, trained.reason
    lineage = json.loads(object_store.get_bytes("cdl-models", f"{name}/1/lineage.json"))
    assert lineage["family"]["family"] == "resnet18" and lineage["family"]["package"] == "cdl-example-resnet"
    assert len(lineage["family"]["source_sha256"]) == 64
    [compressed] = wait_for(
        lambda: committed_payloads(kafka_bootstrap, compressor_topics["compressed"]), 300, "v1 compressed"
    )
    assert compressed.ok, compressed.reason
    variants = {v.name for v in compressed.variants}
    # what the family allows (no pruning: it lists none), each measured
    assert {"fp32", "int8-dynamic", "int8-static", "fp16"} <= variants and not any("pruned" in v for v in variants)

    client = tgrpc.InferenceServerClient(gw.grpc)
    x = DIGITS.data[1500:1501].astype(np.float32).reshape(1, 1, 8, 8)

    def infer() -> Any:
        inp = tgrpc.InferInput("input", [1, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(name, [inp], client_timeout=10)

    def serving(version: int) -> bool:
        try:
            return bool(infer().get_response().model_version == str(version))
        except InferenceServerException:
            return False

    wait_for(lambda: serving(1), 120, "v1 serving at the gateway")
    failures: list[str] = []
    versions: Counter[str] = Counter()
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                versions[infer().get_response().model_version] += 1
            except InferenceServerException as exc:
                failures.append(f"{exc.status()}: {exc.message()}")

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        wave(800, 1600)  # version 2: warm-started from v1, compressed, rolled out as a canary
        deployed = gateway_topics["deployed"]

        seen: list[Any] = []

        def promoted() -> bool:
            recs = read_topic(kafka_bootstrap, deployed, expected=10**6, timeout_s=1)
            seen[:] = [decode(r.key, r.value, list(r.headers.items())).payload for r in recs]
            return any(
                d.model == name and d.version == 2 and d.state == events_pb2.ROLLOUT_STATE_PROMOTED for d in seen
            )

        try:
            wait_for(promoted, 420, "v2 promoted")
        except AssertionError as exc:  # what the rollout did, and why
            steps = [(d.version, d.state, d.traffic_fraction, d.reason) for d in seen if d.model == name]
            raise AssertionError(f"{exc}; {name}'s model.deployed: {steps}; failures: {failures[:5]}") from None
    finally:
        stop.set()
        thread.join(30)
        client.close()
    assert failures == []
    assert versions["1"] > 0 and versions["2"] > 0
    recs = read_topic(kafka_bootstrap, gateway_topics["deployed"], expected=10**6, timeout_s=1)
    states = [(d.version, d.state) for d in (decode(r.key, r.value, list(r.headers.items())).payload for r in recs)]
    assert (2, events_pb2.ROLLOUT_STATE_CANARY) in states
    v2 = json.loads(object_store.get_bytes("cdl-models", f"{name}/2/lineage.json"))
    assert v2["parent_version"] == 1  # warm-started from the serving version: the same architecture
