"""compose's TLS set-up (services.provision.tls_setup) on its own: its files, their modes, a
rerun that keeps the CA, and passwords a login line cannot quote."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdl.errors import ConfigError
from services.provision.settings import ProvisionSettings
from services.provision.tls_setup import broker_login_lines, write_tls_setup


def _settings(root: Path, password: str = "a-real-one-7f3") -> ProvisionSettings:
    system = root / "system-bundle.crt"
    system.write_text("-----BEGIN CERTIFICATE-----\nsystem\n-----END CERTIFICATE-----\n")
    return ProvisionSettings(
        kafka_sasl_password=password,
        tls_ca_dir=str(root / "ca"),
        broker_config_dir=str(root / "config"),
        tls_trust_dir=str(root / "trust"),
        minio_certs_dir=str(root / "minio-certs"),
        gateway_tls_dir=str(root / "gateway-tls"),
        ingest_tls_dir=str(root / "ingest-tls"),
        system_ca_bundle=str(system),
    )


def test_the_files_their_modes_and_a_rerun_that_keeps_the_ca(tmp_path: Path) -> None:
    write_tls_setup(_settings(tmp_path))
    config, trust = tmp_path / "config", tmp_path / "trust"
    for private in (config / "server.properties", config / "client.properties", config / "kafka.pem"):
        assert private.stat().st_mode & 0o777 == 0o600, private
    assert (trust / "ca.pem").read_bytes() == (tmp_path / "ca" / "ca.pem").read_bytes()
    assert sorted(p.name for p in trust.iterdir()) == ["bundle.pem", "ca.pem"]  # the clients see no key
    system = (tmp_path / "system-bundle.crt").read_text()
    assert (trust / "bundle.pem").read_text() == system + "\n" + (trust / "ca.pem").read_text()
    certs = tmp_path / "minio-certs"
    assert (certs / "private.key").stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" not in (certs / "public.crt").read_text()
    assert (tmp_path / "ca" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    client = (config / "client.properties").read_text()
    assert "ssl.truststore.location=/mnt/shared/config/ca.pem" in client  # as the broker sees it
    lines = (config / "server.properties").read_text()
    assert 'password="a-real-one-7f3"' in lines and "scram-sha-512.sasl.jaas.config" in lines
    ca = (trust / "ca.pem").read_bytes()
    write_tls_setup(_settings(tmp_path))  # compose restarts a job that failed later on
    assert (trust / "ca.pem").read_bytes() == ca


@pytest.mark.parametrize(
    "password", ["", 'with"quote', "back\\slash", "semi;colon", "new\nline", "with space", "non-ascii-é"]
)
def test_a_password_a_login_line_cannot_hold_is_refused(password: str) -> None:
    with pytest.raises(ConfigError):
        broker_login_lines(password)


def test_kafka_passwords_are_all_or_none(tmp_path: Path) -> None:
    none = _settings(tmp_path)
    assert none.kafka_passwords() == {} and not [p for p in none.security_problems() if "Kafka password" in p]
    some = ProvisionSettings(trainer_kafka_password="a-real-one-7f3", ingest_kafka_password="laptop-only-x")
    problems = " ".join(some.security_problems())
    assert "no Kafka password for compressor, gateway, monitor, producer, tuner" in problems
    assert "the Kafka password of ingest is a published default" in problems
