"""The object store's grants (cdl.store_access) as policy documents: pure logic; the grants
themselves are tested on a real MinIO (tests/integration/test_store_access.py)."""

from __future__ import annotations

from pathlib import Path

from cdl import datasets, registry, store, store_access, triton
from cdl.store_access import STORE_GRANTS, policy, store_buckets

ROOT = Path(__file__).resolve().parent.parent.parent


def test_the_bucket_names_are_the_stores() -> None:
    assert store_access.DATASETS_BUCKET == datasets.DATASETS_BUCKET
    assert store_access.MODELS_BUCKET == registry.MODELS_BUCKET
    assert store_access.TRITON_BUCKET == triton.TRITON_BUCKET
    assert store_access.UPLOADS_BUCKET == store.UPLOADS_BUCKET


def test_every_service_and_triton_has_a_grant() -> None:
    services = {p.name for p in (ROOT / "services").iterdir() if (p / "app.py").exists()} - {"provision"}
    assert set(STORE_GRANTS) == services | {"triton"}


def test_a_policy_lets_read_what_it_reads_and_write_only_what_it_writes() -> None:
    doc = policy(STORE_GRANTS["tuner"])
    by_action = {tuple(s["Action"]): s["Resource"] for s in doc["Statement"]}
    assert by_action[("s3:ListBucket", "s3:GetBucketLocation")] == [
        "arn:aws:s3:::cdl-datasets",
        "arn:aws:s3:::cdl-models",
    ]
    assert by_action[("s3:GetObject",)] == ["arn:aws:s3:::cdl-datasets/*", "arn:aws:s3:::cdl-models/*"]
    assert by_action[("s3:GetObject", "s3:PutObject", "s3:DeleteObject")] == [
        "arn:aws:s3:::cdl-models/*/studies/*",
        "arn:aws:s3:::cdl-models/*/tuning.json",
    ]
    monitor = policy(STORE_GRANTS["monitor"])  # a reader only: no write statement at all
    assert all("s3:PutObject" not in s["Action"] for s in monitor["Statement"])
    assert store_buckets("compressor") == ("cdl-datasets", "cdl-models", "cdl-triton")
