from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from cdl import errors
from cdl.dedupe import SqliteProcessedStore
from cdl.settings import ServiceSettings
from cdl.triton import Backend, ModelSpec, TensorSpec, render_config


def test_every_error_names_a_real_grpc_status() -> None:
    classes = [c for n in errors.__all__ if isinstance(c := getattr(errors, n), type)]
    for cls in classes:
        assert hasattr(grpc.StatusCode, cls.grpc_code), cls
    assert errors.InvalidInputError("x").grpc_code == "INVALID_ARGUMENT"
    assert errors.UnavailableError("x").retryable
    assert not errors.InvalidInputError("x").retryable
    assert str(errors.NotFoundError("no dataset", name="d")) == "no dataset (name='d')"
    # ... and each status its HTTP status (the gateway's REST answers)
    assert all(errors.http_status(cls.grpc_code) != 500 or cls.grpc_code == "INTERNAL" for cls in classes)


def test_processed_store_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    store = SqliteProcessedStore(path)
    assert not store.seen("g", "e1")
    store.mark("g", "e1")
    store.close()
    again = SqliteProcessedStore(path)
    assert again.seen("g", "e1")
    assert not again.seen("other-group", "e1")


def test_service_settings_read_the_environment_never_a_stack_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.gateway.settings import GatewaySettings

    (tmp_path / "stack.json").write_text(json.dumps({"kafka": {"bootstrap": "127.0.0.1:1111"}}))
    for var in ("KAFKA_BOOTSTRAP", "S3_ENDPOINT", "S3_ACCESS_KEY", "S3_SECRET_KEY", "TRITON_GRPC", "TRITON_HTTP"):
        monkeypatch.delenv(f"CDL_{var}", raising=False)
        monkeypatch.delenv(f"CDL_GATEWAY_{var}", raising=False)
    s = ServiceSettings(state_dir=tmp_path)
    assert (s.kafka_bootstrap, s.s3_endpoint, s.triton_grpc, s.triton_http) == ("", "", [], [])

    # the generic variables, as the local stack gives them (cdl_tools.stack.service_env)
    monkeypatch.setenv("CDL_KAFKA_BOOTSTRAP", "10.0.0.1:9092")
    monkeypatch.setenv("CDL_S3_ENDPOINT", "10.0.0.2:9000")
    monkeypatch.setenv("CDL_TRITON_GRPC", '["10.0.0.3:8001", "10.0.0.4:8001"]')
    monkeypatch.setenv("CDL_TRITON_HTTP", '["10.0.0.3:8000", "10.0.0.4:8000"]')
    g = GatewaySettings(state_dir=tmp_path)
    assert (g.kafka_bootstrap, g.s3_endpoint) == ("10.0.0.1:9092", "10.0.0.2:9000")
    assert g.triton_grpc == ["10.0.0.3:8001", "10.0.0.4:8001"]
    assert g.triton_http == ["10.0.0.3:8000", "10.0.0.4:8000"]

    # the service's own variable wins; HTTP ports pair with gRPC ones only for the same servers
    monkeypatch.setenv("CDL_GATEWAY_KAFKA_BOOTSTRAP", "10.0.0.9:9092")
    monkeypatch.setenv("CDL_GATEWAY_TRITON_GRPC", '["10.0.0.5:8001"]')
    g = GatewaySettings(state_dir=tmp_path)
    assert (g.kafka_bootstrap, g.triton_grpc, g.triton_http) == ("10.0.0.9:9092", ["10.0.0.5:8001"], [])

    monkeypatch.setenv("CDL_TRITON_GRPC", "10.0.0.3:8001")  # not a JSON list: a clear error
    monkeypatch.delenv("CDL_GATEWAY_TRITON_GRPC")
    with pytest.raises(ValueError, match="CDL_TRITON_GRPC is not a JSON list"):
        GatewaySettings(state_dir=tmp_path)


def test_a_service_reads_what_the_local_stack_gives_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cdl_tools.stack import service_env
    from services.gateway.settings import GatewaySettings
    from services.tuner.settings import TunerSettings

    for var in [v for v in os.environ if v.startswith("CDL_")]:  # (a test stack's, in this process)
        monkeypatch.delenv(var)
    state = {
        "state_dir": str(tmp_path),
        "kafka": {"bootstrap": "127.0.0.1:1111"},
        "minio": {"endpoint": "127.0.0.1:2222", "access_key": "a", "secret_key": "b"},
        "minio_users": {"gateway": "g", "tuner": "t", "triton": "x"},
        "triton": [{"grpc": "127.0.0.1:3333", "http": "127.0.0.1:3334"}],
        "postgres": {"url": "postgresql+psycopg2://cdl@127.0.0.1:5555/cdl"},
    }
    for var, value in service_env(state).items():
        monkeypatch.setenv(var, value)
    g = GatewaySettings()
    # each service its own object-store user (cdl.store_access), never the root key
    assert (g.kafka_bootstrap, g.s3_endpoint, g.s3_access_key, g.s3_secret_key) == (
        "127.0.0.1:1111",
        "127.0.0.1:2222",
        "cdl-gateway",
        "g",
    )
    assert "b" not in service_env(state).values()
    assert (g.triton_grpc, g.triton_http) == (["127.0.0.1:3333"], ["127.0.0.1:3334"])
    assert service_env(state)["CDL_STATE_DIR"] == str(tmp_path)  # read when the service starts
    assert TunerSettings().storage() == "postgresql+psycopg2://cdl@127.0.0.1:5555/cdl"


def test_triton_config_for_both_backends() -> None:
    spec = ModelSpec(
        "digits",
        (TensorSpec("input", "float32", (1, 8, 8)),),
        (TensorSpec("logits", "float32", (10,)),),
        max_batch_size=32,
    )
    py = render_config(spec)
    assert 'backend: "python"' in py
    assert "max_batch_size: 32" in py
    assert "dims: [ 1, 8, 8 ]" in py and "TYPE_FP32" in py and "dynamic_batching" in py
    ort = render_config(
        ModelSpec(spec.name, spec.inputs, spec.outputs, backend=Backend.ONNXRUNTIME, intra_op_threads=3)
    )
    assert 'platform: "onnxruntime_onnx"' in ort and "backend:" not in ort
    # ONNX Runtime's threads: a parameter both backends read (Triton's onnxruntime backend, cdl's runner)
    threads = [
        text_format.Parse(cfg, model_config_pb2.ModelConfig()).parameters["intra_op_thread_count"].string_value
        for cfg in (py, ort)
    ]
    assert threads == ["1", "3"]
    with pytest.raises(ValueError, match="unsupported tensor dtype"):
        _ = TensorSpec("x", "complex64", (1,)).triton_type


def test_split_hash_is_stable_and_fair() -> None:
    from cdl.datasets import holdout_member, unit_hash

    hashes = [unit_hash(f"digits\x00r{i}".encode()) for i in range(5000)]
    assert 0.18 < sum(h < 0.2 for h in hashes) / len(hashes) < 0.22
    assert holdout_member("digits", "r1", 0.2) == (unit_hash(b"digits\x00r1") < 0.2)
    assert unit_hash(b"digits\x00r1") == unit_hash(b"digits\x00r1")  # no per-process salt


def test_shards_are_what_np_savez_writes_and_chunks_need_no_join() -> None:
    import io

    import numpy as np

    from cdl.datasets import decode_shard, encode_shard

    rng = np.random.default_rng(0)
    x = [rng.random((n, 2, 3)).astype(np.float32) for n in (5, 0, 7)]
    cols = {
        "id": np.array([f"r{i}" for i in range(12)]),
        "label": np.arange(12, dtype=np.int16),
        "split": (np.arange(12) % 2).astype(np.uint8),
        "offset": np.arange(100, 112, dtype=np.int64),
    }
    ours = encode_shard({**cols, "x": x, "ids2": [np.array(["a"] * 6), np.array(["longer"] * 6)]})
    ref = io.BytesIO()
    np.savez(ref, **cols, x=np.concatenate(x), ids2=np.array(["a"] * 6 + ["longer"] * 6))
    assert len(ours) == len(ref.getvalue())
    got, want = decode_shard(ours), decode_shard(ref.getvalue())
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name
    with np.load(io.BytesIO(ours), allow_pickle=False) as npz:  # numpy reads it back, CRCs included
        assert npz["x"].shape == (12, 2, 3)
    with pytest.raises(ValueError, match="differ in length"):
        encode_shard({"a": np.arange(3), "b": [np.arange(2), np.arange(2)]})


def test_shard_parts_refer_to_the_columns_instead_of_copying_them() -> None:
    import numpy as np

    from cdl.datasets import decode_shard, encode_shard, shard_parts

    x = [np.full((3000, 8), i, dtype=np.float32) for i in range(3)]  # 96 KiB chunks
    cols = {"id": np.array([f"r{i}" for i in range(9000)]), "label": np.zeros(9000, dtype=np.int16), "x": x}
    parts = shard_parts(cols)
    assert b"".join(parts) == encode_shard(cols)
    for chunk in x:  # each chunk is sent from where it lies
        assert any(
            isinstance(p, memoryview) and np.shares_memory(np.frombuffer(p, dtype=np.uint8), chunk) for p in parts
        )
    got = decode_shard(b"".join(parts))
    assert np.array_equal(got["x"], np.concatenate(x)) and got["id"][-1] == "r8999"


def test_newest_shards_takes_whole_shards_from_the_end_until_the_window_is_full() -> None:
    from cdl.datasets import newest_shards

    manifest = {"shards": [{"key": k, "records": n} for k, n in [("a", 500), ("b", 300), ("c", 200)]]}
    assert [e["key"] for e in newest_shards(manifest, 0)] == ["a", "b", "c"]
    assert [e["key"] for e in newest_shards(manifest, 200)] == ["c"]
    assert [e["key"] for e in newest_shards(manifest, 201)] == ["b", "c"]
    assert [e["key"] for e in newest_shards(manifest, 10_000)] == ["a", "b", "c"]
