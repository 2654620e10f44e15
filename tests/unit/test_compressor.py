"""The compressor's decisions (services/compressor/compressor.py) without servers: a small digits
CNN trained by the trainer's code into an in-memory object store (tests/fakes.py), compressed
into its variants, the choice within the accuracy budget, the Triton entry, the failures.

tests/integration/test_compressor.py runs the service against Kafka and MinIO and serves the
chosen variant in Triton; tests/unit/test_compressor_choice.py checks ``choose`` on its own.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sklearn.datasets import load_digits

from cdl.errors import PermanentError
from cdl.events import Event
from cdl.registry import MODELS_BUCKET, ModelRegistry
from cdl.signing import Signer, TrustedKeys, public_key_text, verify_entry
from cdl.triton import TRITON_BUCKET
from cdl.v1 import events_pb2
from services.compressor import compressor as compressor_module
from services.compressor.compressor import Compressor
from services.compressor.settings import CompressorSettings
from services.compressor.variants import Measured, measure
from services.trainer.settings import TrainerSettings
from services.trainer.trainer import Trainer
from tests.datasets import DatasetWriter, digits_spec
from tests.fakes import MemoryStore, RecordingProducer

ALL_VARIANTS = {"fp32", "int8-dynamic", "fp16", "int8-static", "int8-static-qop", "pruned", "pruned-int8"}
COMPRESSED = "model.compressed"


@pytest.fixture(scope="module")
def trained() -> tuple[MemoryStore, Event]:
    """An object store holding a digits dataset version and a small CNN trained on it (accepted),
    and the trainer's model.trained event."""
    store = MemoryStore()
    digits = load_digits()
    x = digits.data.reshape(-1, 1, 8, 8).astype(np.float32)[:500]
    producer = RecordingProducer()
    writer = DatasetWriter(store, producer, "data.updated", digits_spec("digits"))
    writer.publish(writer.version(x, [str(int(t)) for t in digits.target[:500]], [f"a{i}" for i in range(500)]))
    registry = ModelRegistry(store)
    registry.set_hyperparameters("digits", {"channels": 8}, "test")  # a small model: quick to compress
    settings = TrainerSettings(device="cpu", max_epochs=3, reference_rows=0, code_version="git:test")
    [out] = Trainer(settings, store, registry, "/cdl/test").handle(producer.events("data.updated")[0])
    producer.send_record(out)
    event = producer.events("model.trained")[0]
    assert isinstance(event.payload, events_pb2.ModelTrained)
    assert event.payload.verdict == events_pb2.VERDICT_ACCEPTED, event.payload.reason
    return store, event


@pytest.fixture
def store(trained: tuple[MemoryStore, Event]) -> MemoryStore:
    """The trained store, as the fixture left it (each test's own copy)."""
    return trained[0].copy()


def _settings(**kw: Any) -> CompressorSettings:
    """Tiny measurements; no pruned variants unless asked (their fine-tune takes the most time)."""
    base: dict[str, Any] = {"latency_runs": 1, "parity_samples": 64, "calibration_samples": 64, "prune_fraction": 0.0}
    return CompressorSettings(**{**base, "compressed_topic": COMPRESSED, **kw})


def _compress(
    store: MemoryStore, event: Event, signer: Signer | None = None, **kw: Any
) -> list[events_pb2.ModelCompressed]:
    producer = RecordingProducer()
    for record in Compressor(_settings(**kw), store, ModelRegistry(store), "/cdl/test", signer).handle(event):
        producer.send_record(record)
    return [e.payload for e in producer.events(COMPRESSED)]  # type: ignore[misc]


def _served(store: MemoryStore) -> bytes:
    """The model file of the Triton entry of digits version 1."""
    return store.get_bytes(TRITON_BUCKET, "digits/1/model.onnx")


def _variant(store: MemoryStore, name: str) -> bytes:
    return store.get_bytes(MODELS_BUCKET, f"digits/1/variants/{name}.onnx")


def test_every_variant_is_measured_and_the_one_chosen_within_the_budget_is_served(
    store: MemoryStore, trained: tuple[MemoryStore, Event]
) -> None:
    event = trained[1]
    settings = {"prune_fraction": 0.5, "prune_finetune_epochs": 1, "prune_finetune_records": 200}
    [done] = _compress(store, event, **settings)
    assert done.ok, done.reason
    assert (done.model, done.version) == ("digits", 1)
    variants = {v.name: v for v in done.variants}
    assert set(variants) == ALL_VARIANTS
    fp32 = variants["fp32"]
    for v in variants.values():
        assert v.error == "" and v.uri == f"s3://cdl-models/digits/1/variants/{v.name}.onnx"
        assert v.size_bytes == len(_variant(store, v.name)) > 0
        assert v.latency_p99_ms_b1 >= v.latency_p50_ms_b1 > 0 and v.latency_p50_ms_b32 > 0
        assert v.within_budget == (v.accuracy >= fp32.accuracy - 0.005 - 1e-12), v
    assert variants["int8-static"].size_bytes < 0.7 * fp32.size_bytes
    assert variants["pruned"].size_bytes < fp32.size_bytes  # half the channels
    chosen = variants[done.chosen_variant]
    assert chosen.within_budget and done.reason.startswith(f"chose {chosen.name} by size: {chosen.size_bytes} bytes")

    # the Triton entry serves the chosen file, with the python-backend runner and its config
    assert done.triton_repository_path == "s3://cdl-triton/digits/1/"
    assert _served(store) == _variant(store, chosen.name)
    assert store.exists(TRITON_BUCKET, "digits/1/model.py")
    config = store.get_bytes(TRITON_BUCKET, "digits/config.pbtxt").decode()
    assert 'name: "digits"' in config and 'backend: "python"' in config
    doc = store.get_json(MODELS_BUCKET, "digits/1/compression.json")
    assert doc["ok"] is True and doc["chosen"] == chosen.name and "demo_fault" not in doc

    # redelivered: the recorded result is published again, nothing compressed twice
    files = {name: _variant(store, name) for name in variants}
    assert _compress(store, event, **settings) == [done]
    assert {name: _variant(store, name) for name in variants} == files


def test_when_no_compressed_variant_keeps_the_accuracy_fp32_is_served(
    store: MemoryStore, trained: tuple[MemoryStore, Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every variant but FP32 measured a point lower than it is (the real measurement, shifted):
    none is within the budget, FP32 is chosen and served."""

    def lossy(name: str, *args: Any, **kw: Any) -> Measured:
        m = measure(name, *args, **kw)
        return m if name == "fp32" else replace(m, accuracy=m.accuracy - 0.01)

    monkeypatch.setattr(compressor_module, "measure", lossy)
    [done] = _compress(store, trained[1], objective="cpu_latency")
    assert done.ok and done.chosen_variant == "fp32", done.reason
    assert [v.name for v in done.variants if v.within_budget] == ["fp32"]
    assert _served(store) == _variant(store, "fp32")


def test_a_variant_that_fails_is_recorded_and_the_others_go_on(
    store: MemoryStore, trained: tuple[MemoryStore, Event]
) -> None:
    [done] = _compress(store, trained[1], calibration_samples=0)  # static INT8 without calibration data
    assert done.ok, done.reason
    failed = {v.name: v for v in done.variants if v.error}
    assert set(failed) == {"int8-static", "int8-static-qop"}
    for v in failed.values():
        assert v.uri == "" and v.size_bytes == 0 and not v.within_budget
        assert not store.exists(MODELS_BUCKET, f"digits/1/variants/{v.name}.onnx")
    assert done.chosen_variant in {"fp32", "int8-dynamic", "fp16"}
    assert _served(store) == _variant(store, done.chosen_variant)


def test_the_demo_fault_serves_a_failing_model_once_and_says_so(
    store: MemoryStore, trained: tuple[MemoryStore, Event], tmp_path: Path
) -> None:
    (tmp_path / "digits.failing").touch()
    [done] = _compress(store, trained[1], demo_fault_dir=str(tmp_path))
    assert done.ok and "DEMO FAULT" in done.reason
    assert _served(store) != _variant(store, done.chosen_variant)  # the entry serves the failing model
    assert store.get_json(MODELS_BUCKET, "digits/1/compression.json")["demo_fault"] == "failing"
    assert [p.name for p in tmp_path.iterdir()] == ["digits.failing.taken-v1"]  # taken: applies once


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_an_unreadable_checkpoint_fails_the_version_with_the_reason(
    store: MemoryStore, trained: tuple[MemoryStore, Event], damage: str
) -> None:
    key = "digits/1/model.safetensors"
    if damage == "corrupt":
        store.put_bytes(MODELS_BUCKET, key, b"\x00garbage" * 10)
    else:
        store.delete(MODELS_BUCKET, key)
    [done] = _compress(store, trained[1])
    assert not done.ok and done.reason.startswith("checkpoint unreadable"), done.reason
    assert not done.chosen_variant and not done.triton_repository_path and not done.variants
    assert not store.exists(TRITON_BUCKET, "digits/1/model.onnx")
    # the failure is recorded: a redelivery publishes it again instead of failing anew
    assert store.get_json(MODELS_BUCKET, "digits/1/compression.json")["ok"] is False
    assert _compress(store, trained[1]) == [done]


def test_an_export_that_does_not_match_pytorch_fails_the_version(
    store: MemoryStore, trained: tuple[MemoryStore, Event]
) -> None:
    [done] = _compress(store, trained[1], parity_tolerance=-1.0)  # no difference is small enough
    assert not done.ok and done.reason.startswith("ONNX export does not match PyTorch"), done.reason
    assert not store.exists(TRITON_BUCKET, "digits/1/model.onnx")


def test_a_rejected_version_is_not_compressed_and_other_events_are_refused(
    store: MemoryStore, trained: tuple[MemoryStore, Event]
) -> None:
    rejected = events_pb2.ModelTrained()
    assert isinstance(trained[1].payload, events_pb2.ModelTrained)
    rejected.CopyFrom(trained[1].payload)
    rejected.verdict = events_pb2.VERDICT_REJECTED
    assert _compress(store, Event(rejected, source="/cdl/trainer", key="digits")) == []
    assert not store.exists(MODELS_BUCKET, "digits/1/compression.json")
    with pytest.raises(PermanentError, match="cannot handle this event type"):
        _compress(store, Event(events_pb2.DataUpdated(dataset="digits", version=1), source="/cdl/ingest"))


def test_with_a_key_the_entry_is_signed_and_the_lineage_names_the_signature(
    store: MemoryStore, trained: tuple[MemoryStore, Event]
) -> None:
    signer = Signer(Ed25519PrivateKey.generate())
    [done] = _compress(store, trained[1], signer)
    assert done.ok
    doc = verify_entry(store, TRITON_BUCKET, "digits", 1, TrustedKeys([public_key_text(signer.public_key)]))
    assert set(doc["manifest"]["files"]) == {"model.onnx", "model.py"}
    lineage = store.get_json(MODELS_BUCKET, "digits/1/compression.json")["signature"]
    assert lineage == {k: doc[k] for k in ("algorithm", "key_id", "signature")}
