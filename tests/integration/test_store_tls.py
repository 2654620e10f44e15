"""The object store over TLS, on a real MinIO serving a certificate of its own CA (the local
stack's MinioComponent with ``tls_dir``): cdl's clients verify it against ``s3_ca_file``, refuse
it without, and the provisioning job makes the per-service users over it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cdl.errors import ConfigError, PermissionDeniedError
from cdl.store import ObjectStore
from cdl.store_access import STORE_GRANTS, store_user
from cdl_tools.settings import StackSettings
from cdl_tools.stack._components import MinioComponent
from cdl_tools.stack._procs import free_port, spawn, stop
from tests.helpers import IN_CI, wait_for


@pytest.fixture(scope="module")
def tls_minio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("tls-minio")
    settings = StackSettings(state_dir=root, minio_secret_key=uuid.uuid4().hex)
    comp = MinioComponent("minio", root / "minio", {"api": free_port(), "console": free_port()}, settings=settings)
    comp.tls_dir = root / "tls"
    comp.prepare()
    _, info = spawn(comp.argv(), comp.log_path, env=comp.env(), cwd=comp.workdir)
    try:
        wait_for(comp.healthy, timeout_s=60, what="MinIO serving TLS")
        yield comp.describe()
    finally:
        stop(info, 5)


def test_a_client_verifies_the_stores_certificate_against_its_ca(tls_minio: dict[str, Any]) -> None:
    m = tls_minio
    assert m["secure"] and Path(m["ca_file"]).is_file()
    store = ObjectStore(m["endpoint"], m["access_key"], m["secret_key"], secure=True, ca_file=m["ca_file"])
    store.ensure_buckets()
    store.put_bytes("cdl-models", "tls/a.bin", b"over TLS")
    assert store.get_bytes("cdl-models", "tls/a.bin") == b"over TLS"


def test_a_client_without_the_ca_refuses_the_certificate_as_a_configuration_error(tls_minio: dict[str, Any]) -> None:
    m = tls_minio
    store = ObjectStore(m["endpoint"], m["access_key"], m["secret_key"], secure=True)  # the system's CAs only
    with pytest.raises(ConfigError, match="not trusted"):
        store.get_bytes("cdl-models", "tls/a.bin")


def test_the_provisioning_job_makes_the_users_over_tls(
    tls_minio: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.provision.app import run
    from services.provision.settings import ProvisionSettings

    m = tls_minio
    secrets = {name: uuid.uuid4().hex for name in STORE_GRANTS}
    settings = ProvisionSettings(
        kafka_bootstrap="",  # (no topics: only the store here)
        s3_endpoint=m["endpoint"],
        s3_access_key=m["access_key"],
        s3_secret_key=m["secret_key"],
        s3_secure=True,
        s3_ca_file=m["ca_file"],
        state_dir=tmp_path,
        **{f"{name}_s3_secret": secret for name, secret in secrets.items()},
    )
    assert run(settings) == len(STORE_GRANTS)
    gateway = ObjectStore(m["endpoint"], store_user("gateway"), secrets["gateway"], True, m["ca_file"])
    gateway.put_json("cdl-models", "tls/rollout.json", {"stage": "stable"})
    with pytest.raises(PermissionDeniedError):
        gateway.put_bytes("cdl-models", "tls/1/model.safetensors", b"forged")


def test_the_shared_stacks_minio_serves_tls_and_its_tritons_read_their_repository_through_it(
    stack: dict[str, Any],
) -> None:
    """The tests' stack runs as ``cdl stack up`` does by default: MinIO over TLS with the
    stack's CA, and each Triton reading ``s3://https://…`` in its own mount namespace, where the
    stack's CA is added to the system bundle it reads."""
    import json
    import urllib.request

    from cdl_tools.stack._components import SYSTEM_CA_BUNDLES, private_mount_prefix

    if private_mount_prefix() is None and not IN_CI:  # (the stack fell back to plain HTTP, and said so)
        pytest.skip("this machine allows no mount namespace for Triton: the stack's MinIO is plain")
    m = stack["minio"]
    assert stack["minio_tls"] and m["secure"] and Path(m["ca_file"]).is_file()
    with pytest.raises(ConfigError, match="not trusted"):  # the system's CAs alone do not trust it
        ObjectStore(m["endpoint"], m["access_key"], m["secret_key"], secure=True).get_bytes("cdl-models", "x")
    system = next(Path(p) for p in SYSTEM_CA_BUNDLES if Path(p).is_file())
    assert Path(m["ca_file"]).read_text().strip() not in system.read_text()  # the machine's bundle is untouched
    for triton in stack["triton"]:
        assert triton["repository"].startswith("s3://https://")
        index = urllib.request.Request(f"http://{triton['http']}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(index, timeout=30) as answer:  # listed over TLS from MinIO
            assert isinstance(json.loads(answer.read()), list)
