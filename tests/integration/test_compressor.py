"""The compressor service as a real process against real Kafka, MinIO and Triton."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
from sklearn.datasets import load_digits

from cdl.datasets import load_version
from cdl.events import Event, OutRecord, decode
from cdl.kafka import Producer
from cdl.registry import MODELS_BUCKET, ModelRegistry
from cdl.store import ObjectStore
from cdl.v1 import events_pb2
from cdl_tools.stack import stack_store
from services.compressor.compressor import Compressor
from services.compressor.settings import CompressorSettings
from services.compressor.variants import Served, run
from services.trainer.settings import TrainerSettings
from services.trainer.trainer import Trainer
from tests.datasets import DatasetWriter, digits_spec
from tests.helpers import read_topic


@pytest.fixture(scope="module")
def trained(stack: dict[str, Any]) -> tuple[str, events_pb2.ModelTrained, Event]:
    """A digits CNN trained (in-process, by the trainer's code) on a fresh dataset."""
    store = stack_store(stack)
    name = f"cdigits-{uuid.uuid4().hex[:6]}"
    digits = load_digits()
    x = digits.data.reshape(-1, 1, 8, 8).astype(np.float32)
    writer = DatasetWriter(store, stack["kafka"]["bootstrap"], "unused", digits_spec(name))
    rec = writer.version(x, [str(int(t)) for t in digits.target], [f"a{i}" for i in range(len(x))])
    updated = decode(rec.key, rec.value, list(rec.headers))
    out = Trainer(TrainerSettings(), store, ModelRegistry(store), "/test").handle(updated)[0]
    event = decode(out.key, out.value, list(out.headers))
    assert isinstance(event.payload, events_pb2.ModelTrained)
    assert event.payload.verdict == events_pb2.VERDICT_ACCEPTED
    return name, event.payload, event


def _publish(bootstrap: str, topic: str, event: Event) -> None:
    rec = OutRecord.of(topic, event)
    producer = Producer(bootstrap)
    producer.send_raw(rec.topic, rec.value, rec.key, rec.headers)
    producer.flush()


def _compressed(bootstrap: str, topic: str, expected: int, timeout_s: float = 120) -> list[events_pb2.ModelCompressed]:
    recs = read_topic(bootstrap, topic, expected, timeout_s)
    return [decode(r.key, r.value, list(r.headers.items())).payload for r in recs]  # type: ignore[misc]


def test_variants_are_measured_and_the_chosen_one_serves_in_triton(
    trained: tuple[str, events_pb2.ModelTrained, Event],
    compressor_factory: Any,
    compressor_topics: dict[str, str],
    kafka_bootstrap: str,
    object_store: ObjectStore,
    triton_grpc: str,
) -> None:
    name, model_trained, event = trained
    compressor_factory().start()
    _publish(kafka_bootstrap, compressor_topics["trained"], event)
    [done] = _compressed(kafka_bootstrap, compressor_topics["compressed"], 1)
    assert done.ok, done.reason
    assert (done.model, done.version) == (name, model_trained.version)
    variants = {v.name: v for v in done.variants}
    assert set(variants) == {"fp32", "int8-dynamic", "int8-static", "int8-static-qop", "fp16", "pruned", "pruned-int8"}
    for v in variants.values():
        assert v.size_bytes > 0 and v.latency_p50_ms_b1 > 0 and v.latency_p99_ms_b32 >= v.latency_p50_ms_b32 > 0
        assert 0.9 < v.accuracy <= 1.0 and v.uri.startswith(f"s3://cdl-models/{name}/")
        assert v.within_budget == (v.accuracy >= variants["fp32"].accuracy - 0.005 - 1e-12)
    chosen = variants[done.chosen_variant]
    assert chosen.within_budget
    assert variants["int8-static"].size_bytes < 0.4 * variants["fp32"].size_bytes
    # the pruned model (half the channels, fine-tuned) is smaller than FP32, measured, and chosen
    # only within the budget (never outside it: no variant outside is ever chosen)
    assert variants["pruned"].size_bytes < 0.5 * variants["fp32"].size_bytes
    assert variants["pruned-int8"].size_bytes < variants["pruned"].size_bytes
    assert all(v.within_budget for v in variants.values() if v.name == done.chosen_variant)
    assert done.triton_repository_path == f"s3://cdl-triton/{name}/{model_trained.version}/"

    # the chosen variant loads in Triton; Triton answers what that variant answers (the same ONNX
    # file run here), and that stays close to PyTorch's FP32 model (the variant is quantised
    # and pruned within the accuracy budget, so a few answers may change: >= 97% agree)
    client = tgrpc.InferenceServerClient(triton_grpc)
    client.load_model(name)
    assert client.is_model_ready(name, str(model_trained.version))
    registry = ModelRegistry(object_store)
    loaded = registry.load(name, model_trained.version)
    data = load_version(object_store, name, model_trained.lineage.dataset_version)
    x_hold, _ = data.subset(holdout=True)
    x = np.asarray(x_hold, dtype=np.float32)
    with torch.no_grad():
        expected = Served(loaded.module, loaded.config, loaded.preprocessor).eval()(torch.from_numpy(x)).numpy()
    got = []
    for i in range(0, len(x), 64):
        inp = tgrpc.InferInput("input", list(x[i : i + 64].shape), "FP32")
        inp.set_data_from_numpy(x[i : i + 64])
        got.append(client.infer(name, [inp]).as_numpy("logits"))
    served = np.concatenate(got).argmax(1)
    key = chosen.uri.removeprefix(f"s3://{MODELS_BUCKET}/")
    local = run(object_store.get_bytes(MODELS_BUCKET, key), x).argmax(1)
    assert float((served == local).mean()) >= 0.997  # Triton serves the chosen file as it is
    agreement = float((served == expected.argmax(1)).mean())
    assert agreement >= 0.97, agreement
    client.unload_model(name)


def test_redelivery_publishes_one_event_and_rewrites_the_same_objects(
    trained: tuple[str, events_pb2.ModelTrained, Event],
    compressor_factory: Any,
    compressor_topics: dict[str, str],
    kafka_bootstrap: str,
    object_store: ObjectStore,
) -> None:
    name, model_trained, event = trained
    compressor_factory().start()
    _publish(kafka_bootstrap, compressor_topics["trained"], event)
    _publish(kafka_bootstrap, compressor_topics["trained"], event)  # the same event again
    _compressed(kafka_bootstrap, compressor_topics["compressed"], 1)
    # a sentinel after them: an event the compressor cannot take, dead-lettered by a job of its own;
    # jobs run in offset order, so once its dead letter is out the redelivery was handled (a skipped
    # duplicate's offset is only committed with the next job: the group's offset cannot tell)
    sentinel = Event(events_pb2.DataUpdated(dataset="sentinel"), source="/cdl/test", key="sentinel")
    _publish(kafka_bootstrap, compressor_topics["trained"], sentinel)
    assert read_topic(kafka_bootstrap, compressor_topics["deadletter"], 1, timeout_s=60)
    assert len(_compressed(kafka_bootstrap, compressor_topics["compressed"], 1)) == 1
    # compressing again from scratch writes byte-identical model files
    version = model_trained.version
    before = {
        v: object_store.get_bytes(MODELS_BUCKET, f"{name}/{version}/variants/{v}.onnx")
        for v in ("fp32", "int8-dynamic", "int8-static", "int8-static-qop", "fp16")
    }
    object_store.delete(MODELS_BUCKET, f"{name}/{version}/compression.json")
    Compressor(CompressorSettings(latency_runs=20), object_store, ModelRegistry(object_store), "/t").handle(event)
    for v, blob in before.items():
        assert object_store.get_bytes(MODELS_BUCKET, f"{name}/{version}/variants/{v}.onnx") == blob, v


def test_corrupt_or_missing_checkpoint_fails_with_a_reason_and_the_service_goes_on(
    trained: tuple[str, events_pb2.ModelTrained, Event],
    compressor_factory: Any,
    compressor_topics: dict[str, str],
    kafka_bootstrap: str,
    object_store: ObjectStore,
) -> None:
    name, model_trained, event = trained
    registry = ModelRegistry(object_store)
    # two more versions of the same model: one with a corrupt checkpoint, one with none
    bad = {}
    for kind in ("corrupt", "missing"):
        version, _ = registry.claim(name, name, 1000 + len(bad))
        for doc in ("model", "preprocessing", "metrics", "lineage", "result"):
            object_store.put_json(
                MODELS_BUCKET, f"{name}/{version}/{doc}.json", registry.document(name, model_trained.version, doc)
            )
        if kind == "corrupt":
            object_store.put_bytes(MODELS_BUCKET, f"{name}/{version}/model.safetensors", b"\x00garbage" * 10)
        bad[kind] = version
    svc = compressor_factory().start()
    for version in bad.values():
        msg = events_pb2.ModelTrained()
        msg.CopyFrom(model_trained)
        msg.version = version
        _publish(kafka_bootstrap, compressor_topics["trained"], Event(msg, source="/test", key=name))
    _publish(kafka_bootstrap, compressor_topics["trained"], event)  # a good one after them
    done = _compressed(kafka_bootstrap, compressor_topics["compressed"], 3)
    by_version = {d.version: d for d in done}
    for kind, version in bad.items():
        failed = by_version[version]
        assert not failed.ok and not failed.triton_repository_path and not failed.chosen_variant
        assert failed.reason.startswith("checkpoint unreadable"), (kind, failed.reason)
    assert by_version[model_trained.version].ok
    assert svc.proc is not None and svc.proc.poll() is None  # still running
