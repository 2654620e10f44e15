"""How the local stack lets Triton trust a MinIO that serves TLS with the stack's CA: a copy of
the system's bundle with the CA added, bind-mounted in Triton's own mount namespace; and the
plain fallback where no such namespace may be made."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdl.tls import ensure_ca
from cdl_tools.settings import StackSettings
from cdl_tools.stack import LocalStack
from cdl_tools.stack import _components as components
from cdl_tools.stack._components import TritonComponent, trusting_bundle


def test_the_bundle_is_the_systems_with_the_stacks_ca_added(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "system.pem"
    system.write_text("-----BEGIN CERTIFICATE-----\nsystem\n-----END CERTIFICATE-----\n")
    monkeypatch.setattr(components, "SYSTEM_CA_BUNDLES", ("/nonexistent/bundle.crt", str(system)))
    ca, _ = ensure_ca(tmp_path / "tls")
    found = trusting_bundle(ca, tmp_path / "out" / "bundle.pem")
    assert found is not None and found[0] == system
    assert found[1].read_text() == system.read_text() + "\n" + ca.read_text()
    monkeypatch.setattr(components, "SYSTEM_CA_BUNDLES", ("/nonexistent/bundle.crt",))
    assert trusting_bundle(ca, tmp_path / "out" / "bundle.pem") is None


def test_triton_reads_https_in_its_own_namespace_with_the_bundle_mounted(tmp_path: Path) -> None:
    bundle = (Path("/etc/ssl/certs/ca-certificates.crt"), tmp_path / "bundle.pem")
    t = TritonComponent(
        "triton-0",
        tmp_path,
        {"grpc": 1, "http": 2, "metrics": 3},
        s3_endpoint="127.0.0.1:9000",
        ca_bundle=bundle,
        mount_prefix=("unshare", "-m", "--"),
    )
    argv = t.argv()
    assert argv[:5] == ["unshare", "-m", "--", "sh", "-c"]
    assert argv[6:8] == [str(bundle[1]), str(bundle[0])] and argv[8].endswith("tritonserver")
    assert "--model-repository=s3://https://127.0.0.1:9000/cdl-triton" in argv
    plain = TritonComponent("triton-0", tmp_path, {"grpc": 1, "http": 2, "metrics": 3}, s3_endpoint="127.0.0.1:9000")
    assert plain.argv()[0].endswith("tritonserver") and plain.repository == "s3://127.0.0.1:9000/cdl-triton"


def test_where_triton_cannot_trust_the_ca_minio_stays_plain_and_kept_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = LocalStack(StackSettings(state_dir=tmp_path, triton_servers=1))
    monkeypatch.setattr(components, "private_mount_prefix", lambda: None)
    assert stack._triton_trust() is None
    comps = {c.name: c for c in stack._components({"minio_tls": False})}
    assert comps["minio"].tls_dir is None  # type: ignore[attr-defined]
    assert comps["triton-0"].ca_bundle is None  # type: ignore[attr-defined]
    kept = LocalStack(StackSettings(state_dir=tmp_path, triton_servers=0))
    assert {c.name: c for c in kept._components({"minio_tls": True})}["minio"].tls_dir == kept.tls_dir  # type: ignore[attr-defined]


def test_a_stack_made_before_these_settings_keeps_a_plaintext_broker_and_its_minios_scheme() -> None:
    from cdl_tools.stack import _kept_security

    assert _kept_security({}) == {}  # a new stack: the settings' defaults
    before = {"kafka": {"bootstrap": "127.0.0.1:1"}, "minio": {"endpoint": "127.0.0.1:2"}}
    assert _kept_security(before) == {"kafka_security": "plaintext", "minio_tls": False}
    secured = {"kafka": {}, "kafka_security": "sasl_ssl", "minio": {"secure": True, "ca_file": "x"}}
    assert _kept_security(secured) == {"kafka_security": "sasl_ssl", "minio_tls": True}
