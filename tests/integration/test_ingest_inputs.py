"""Inputs of real size through the real ingest service: tensors as bytes (base64 in JSON, raw in
protobuf) and claim checks (``features_uri`` into MinIO), uint8 kept uint8 into the shards; a
missing, wrong-sized or refused claim is dead-lettered with its reason."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import numpy as np
from confluent_kafka import Producer as KProducer

from cdl.datasets import load_version
from cdl.events import decode
from cdl.kafka.security import secured
from cdl.store import ObjectStore
from cdl.v1 import events_pb2, ingest_pb2, ingest_pb2_grpc
from tests.helpers import read_committed, wait_for


def test_binary_and_claim_checked_tensors_are_versioned_as_uint8_and_bad_claims_dead_lettered(
    ingest_factory: Any, ingest_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    svc = ingest_factory().start()
    name = f"bytes-{uuid.uuid4().hex[:6]}"
    spec = ingest_pb2.DatasetSpec(
        name=name,
        task=ingest_pb2.TASK_IMAGE_CLASSIFICATION,
        input_shape=[1, 8, 8],
        dtype="uint8",
        labels=["a", "b"],
        policy=ingest_pb2.RetrainPolicy(min_new_records=3),
        holdout_fraction=0.2,
    )
    with svc.channel() as ch:
        ingest_pb2_grpc.IngestServiceStub(ch).RegisterDataset(ingest_pb2.RegisterDatasetRequest(spec=spec))
    rng = np.random.default_rng(1)
    images = {k: rng.integers(0, 256, size=64, dtype=np.uint8) for k in ("claim", "b64", "proto")}
    prefix = f"{name}/{uuid.uuid4().hex[:6]}"
    object_store.put_bytes("cdl-uploads", f"{prefix}/claim.bin", images["claim"].tobytes())
    object_store.put_bytes("cdl-uploads", f"{prefix}/short.bin", images["claim"].tobytes()[:10])
    object_store.put_bytes("cdl-models", f"{prefix}/secret.bin", images["claim"].tobytes())

    def doc(rid: str, **fields: str) -> bytes:
        return json.dumps({"dataset": name, "id": rid, "label": "a", **fields}).encode()

    producer = KProducer(secured({"bootstrap.servers": kafka_bootstrap}))
    raw = ingest_topics["raw"]
    producer.produce(raw, doc("claim", features_uri=f"s3://cdl-uploads/{prefix}/claim.bin"))
    producer.produce(raw, doc("b64", features_b64=base64.b64encode(images["b64"].tobytes()).decode()))
    proto = events_pb2.Record(dataset=name, id="proto", label="b")
    proto.tensor.raw = images["proto"].tobytes()
    producer.produce(raw, proto.SerializeToString(), headers=[("content-type", b"application/protobuf")])
    bad = {
        "missing": doc("missing", features_uri=f"s3://cdl-uploads/{prefix}/nope.bin"),
        "short": doc("short", features_uri=f"s3://cdl-uploads/{prefix}/short.bin"),
        "refused": doc("refused", features_uri=f"s3://cdl-models/{prefix}/secret.bin"),
    }
    for value in bad.values():
        producer.produce(raw, value)
    assert producer.flush(30) == 0

    def versioned() -> Any:
        recs = read_committed(kafka_bootstrap, ingest_topics["updated"], 1, timeout_s=2)
        return [decode(r.key, r.value, list(r.headers.items())).payload for r in recs]

    [update] = wait_for(versioned, 60, "a version")
    assert update.total_records == 3
    data = load_version(object_store, name, update.version)
    assert data.x is not None and data.x.dtype == np.uint8  # uint8 from Kafka to the shards
    got = {str(rid): data.x[i].reshape(-1) for i, rid in enumerate(data.ids)}
    assert {k: v.tolist() for k, v in got.items()} == {k: v.tolist() for k, v in images.items()}
    dead = read_committed(kafka_bootstrap, ingest_topics["deadletter"], expected=3, timeout_s=30)
    reasons = sorted(d.headers["cdl-reason"].decode().split(":")[0] for d in dead)
    assert reasons == ["bad_shape", "claim_missing", "claim_refused"], reasons
