"""Least privilege in the object store (cdl.store_access), on the session's real MinIO: the stack
made a user per service and Triton, each with its policy; what a policy does not name is refused
(PermissionDeniedError), what it names works."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from cdl.errors import PermissionDeniedError
from cdl.store import BUCKETS, ObjectStore
from cdl.store_access import STORE_GRANTS, store_user
from cdl_tools.stack import stack_store
from tests.conftest import kafka_env

ROOT = Path(__file__).resolve().parent.parent.parent


def _as(stack: dict[str, Any], name: str) -> ObjectStore:
    return stack_store(stack, store_user(name), stack["minio_users"][name])


def test_the_stack_made_a_user_per_service_and_triton(stack: dict[str, Any]) -> None:
    assert set(stack["minio_users"]) == set(STORE_GRANTS)
    assert len(set(stack["minio_users"].values())) == len(STORE_GRANTS)  # each its own secret


def test_only_the_compressor_writes_the_repository_triton_loads(
    stack: dict[str, Any], object_store: ObjectStore
) -> None:
    key = f"test-{uuid.uuid4().hex[:8]}/1/model.onnx"
    _as(stack, "compressor").put_bytes("cdl-triton", key, b"entry")
    for name in ("trainer", "tuner", "gateway", "monitor", "ingest", "triton"):
        with pytest.raises(PermissionDeniedError, match="refused"):
            _as(stack, name).put_bytes("cdl-triton", key, b"forged")
        if name != "triton":
            with pytest.raises(PermissionDeniedError):
                _as(stack, name).delete("cdl-triton", key)
    assert object_store.get_bytes("cdl-triton", key) == b"entry"
    # who loads and verifies entries reads them
    assert _as(stack, "gateway").get_bytes("cdl-triton", key) == b"entry"
    assert [o.key for o in _as(stack, "triton").list("cdl-triton", prefix=key.split("/", maxsplit=1)[0])] == [key]


def test_only_the_trainer_writes_a_models_weights(stack: dict[str, Any], object_store: ObjectStore) -> None:
    model = f"test-{uuid.uuid4().hex[:8]}"
    _as(stack, "trainer").put_bytes("cdl-models", f"{model}/1/model.safetensors", b"weights")
    for name in ("tuner", "compressor", "gateway", "monitor", "ingest"):
        with pytest.raises(PermissionDeniedError):
            _as(stack, name).put_bytes("cdl-models", f"{model}/1/model.safetensors", b"forged")
    assert object_store.get_bytes("cdl-models", f"{model}/1/model.safetensors") == b"weights"
    # each other writer writes only its own documents
    _as(stack, "gateway").put_json("cdl-models", f"{model}/rollout.json", {"stage": "stable"})
    _as(stack, "gateway").put_json("cdl-models", f"{model}/serving.json", {"version": 1})
    _as(stack, "tuner").put_json("cdl-models", f"{model}/tuning.json", {"trials": 1})
    _as(stack, "tuner").put_json("cdl-models", f"{model}/studies/s.json", {})
    _as(stack, "compressor").put_json("cdl-models", f"{model}/1/compression.json", {})
    _as(stack, "compressor").put_bytes("cdl-models", f"{model}/1/variants/int8.onnx", b"v")
    with pytest.raises(PermissionDeniedError):
        _as(stack, "gateway").put_json("cdl-models", f"{model}/1/compression.json", {})
    with pytest.raises(PermissionDeniedError):
        _as(stack, "compressor").put_json("cdl-models", f"{model}/rollout.json", {})
    with pytest.raises(PermissionDeniedError):
        _as(stack, "tuner").put_json("cdl-models", f"{model}/champion.json", {})
    assert _as(stack, "monitor").get_json("cdl-models", f"{model}/serving.json") == {"version": 1}


def test_only_ingest_writes_datasets_and_the_reads_are_the_grants(
    stack: dict[str, Any], object_store: ObjectStore
) -> None:
    key = f"test-{uuid.uuid4().hex[:8]}/versions/1.json"
    _as(stack, "ingest").put_json("cdl-datasets", key, {"version": 1})
    for name in ("trainer", "tuner", "compressor", "gateway", "monitor"):
        with pytest.raises(PermissionDeniedError):
            _as(stack, name).put_json("cdl-datasets", key, {"version": 666})
    for name in ("trainer", "tuner", "compressor"):
        assert _as(stack, name).get_json("cdl-datasets", key) == {"version": 1}
    for name in ("gateway", "monitor", "triton"):  # no reason to read the training data
        with pytest.raises(PermissionDeniedError):
            _as(stack, name).get_json("cdl-datasets", key)
    with pytest.raises(PermissionDeniedError):
        list(_as(stack, "monitor").list("cdl-datasets"))
    assert object_store.get_json("cdl-datasets", key) == {"version": 1}


def test_each_service_sees_the_buckets_it_provisions(stack: dict[str, Any]) -> None:
    """A service checks at start that its buckets exist (cdl.provision with store_buckets): its
    key may do that, and may not create a bucket."""
    from cdl.store_access import store_buckets

    for name in ("ingest", "trainer", "tuner", "compressor", "gateway"):
        _as(stack, name).ensure_buckets(*store_buckets(name))
    assert set().union(*(store_buckets(n) for n in STORE_GRANTS)) == set(BUCKETS)
    with pytest.raises(PermissionDeniedError):
        _as(stack, "trainer").ensure_buckets(f"nope-{uuid.uuid4().hex[:8]}")


def test_a_wrong_secret_is_refused(stack: dict[str, Any]) -> None:
    store = stack_store(stack, store_user("trainer"), "not-its-secret")
    with pytest.raises(PermissionDeniedError, match="wrong access or secret key"):
        store.get_bytes("cdl-models", "anything")


def _job(stack: dict[str, Any], tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    """services.provision (compose's one-shot job) against the session's servers, as the store's
    root, with the stack's users' secrets (so that it changes nothing the other tests use)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDL_")}
    env |= {
        "CDL_KAFKA_BOOTSTRAP": stack["kafka"]["bootstrap"],
        "CDL_S3_ENDPOINT": stack["minio"]["endpoint"],
        "CDL_S3_ACCESS_KEY": stack["minio"]["access_key"],
        "CDL_S3_SECRET_KEY": stack["minio"]["secret_key"],
        **(
            {"CDL_S3_SECURE": "true", "CDL_S3_CA_FILE": stack["minio"]["ca_file"]}
            if stack["minio"].get("secure")
            else {}
        ),
        "CDL_STATE_DIR": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        **{f"CDL_PROVISION_{n.upper()}_S3_SECRET": s for n, s in stack["minio_users"].items()},
        **kafka_env(stack),
        **extra,
    }
    return subprocess.run(
        [sys.executable, "-m", "services.provision"], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_provisioning_job_makes_the_users_again_idempotently(stack: dict[str, Any], tmp_path: Path) -> None:
    done = _job(stack, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"provisioned"' in done.stderr and '"store_users": 7' in done.stderr
    model = f"test-{uuid.uuid4().hex[:8]}"  # the users still work, with the same grants
    _as(stack, "trainer").put_bytes("cdl-models", f"{model}/1/model.safetensors", b"w")
    with pytest.raises(PermissionDeniedError):
        _as(stack, "trainer").put_bytes("cdl-triton", f"{model}/1/model.onnx", b"forged")


def test_the_provisioning_job_refuses_to_leave_a_service_on_the_root_key(stack: dict[str, Any], tmp_path: Path) -> None:
    done = _job(stack, tmp_path, CDL_PROVISION_MONITOR_S3_SECRET="")
    assert done.returncode == 78, done.stderr[-2000:]
    assert "no object-store secret for monitor" in done.stderr
