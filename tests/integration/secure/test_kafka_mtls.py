"""mTLS on a real broker (this folder's stack: its second listener requires a client
certificate of the stack's CA, and maps the certificate's subject ``CN=<user>`` to the
principal ``User:<user>``, so the same ACLs hold as for the SCRAM user of that name): who is
refused, who may write what, and a service running over mTLS."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from confluent_kafka import KafkaError, KafkaException
from sklearn.datasets import load_digits

from cdl.events import Topics
from cdl.kafka.security import KafkaSecurity
from cdl.tls import ensure_ca, ensure_client_cert
from cdl.v1 import events_pb2, ingest_pb2_grpc
from cdl_tools.stack._procs import free_port
from tests.helpers import register_digits, wait_for
from tests.integration.conftest import ServiceFactory
from tests.integration.secure.test_kafka_acls import _metadata, _payloads, _produce

DIGITS = load_digits()


def _tls_dir(stack: dict[str, Any]) -> Path:
    return Path(stack["kafka"]["ca_file"]).parent


def _mtls(stack: dict[str, Any], cert: Path | None, ca: str | None = None) -> dict[str, Any]:
    """Client settings towards the mTLS listener with ``cert`` (key and certificate in one PEM)."""
    kafka = stack["kafka"]
    security = KafkaSecurity(
        "SSL",
        ca_file=kafka["ca_file"] if ca is None else ca,
        cert_file=str(cert or ""),
        key_file=str(cert or ""),
    )
    return {"bootstrap.servers": kafka["mtls_bootstrap"], **security.librdkafka(), "log_level": 0}


def test_without_a_certificate_of_the_stacks_ca_the_mtls_listener_refuses(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    assert stack["kafka"]["mtls_bootstrap"] != stack["kafka"]["bootstrap"]
    with pytest.raises(KafkaException):  # TLS, but no client certificate
        _metadata(_mtls(stack, None))
    # a certificate for a known user, signed by another CA
    ensure_ca(tmp_path / "rogue")
    with pytest.raises(KafkaException):
        _metadata(_mtls(stack, ensure_client_cert(tmp_path / "rogue", "compressor")))
    with pytest.raises(KafkaException):  # the stack's certificate, a server the system's CAs do not know
        _metadata(_mtls(stack, ensure_client_cert(_tls_dir(stack), "trainer"), ca=""))
    assert Topics.MODEL_TRAINED in _metadata(_mtls(stack, ensure_client_cert(_tls_dir(stack), "trainer"))).topics


@pytest.mark.parametrize(
    ("user", "owned", "forbidden"),
    [
        ("trainer", Topics.MODEL_TRAINED, Topics.MODEL_COMPRESSED),
        ("compressor", Topics.MODEL_COMPRESSED, Topics.DATA_RAW),
    ],
)
def test_a_certificates_subject_is_its_user_with_that_users_acls(
    stack: dict[str, Any], user: str, owned: str, forbidden: str
) -> None:
    conf = _mtls(stack, ensure_client_cert(_tls_dir(stack), user))
    assert _produce(conf, owned) is None
    refused = _produce(conf, forbidden)
    assert refused is not None and refused.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, refused


@pytest.mark.timeout(300)
def test_ingest_runs_over_mtls_as_its_certificates_user(stack: dict[str, Any], tmp_path: Path) -> None:
    """Ingest with a client certificate and no password (``kafka_security_protocol=SSL``) reads
    and versions what its own Ingest RPC accepted: its consumer, its transactions and its admin
    calls all authenticate as ``User:ingest``."""
    cert = ensure_client_cert(_tls_dir(stack), "ingest")
    grpc_port = free_port()
    ingest = ServiceFactory("ingest", stack, tmp_path, {}, as_admin=False)(
        grpc_port=str(grpc_port),
        flush_interval_s="0.5",
        kafka_bootstrap=stack["kafka"]["mtls_bootstrap"],
        kafka_security_protocol="SSL",
        kafka_ssl_cert_file=str(cert),
        kafka_ssl_key_file=str(cert),
        kafka_sasl_username="",
        kafka_sasl_password_file="",
    )
    ingest.start()
    try:
        name = f"mtls-{uuid.uuid4().hex[:6]}"
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            register_digits(channel, name, min_new_records=40)
            records = []
            for i in range(40):
                r = events_pb2.Record(dataset=name, id=f"r{i}", label=str(int(DIGITS.target[i])))
                r.tensor.values.extend(DIGITS.data[i].tolist())
                records.append(r)
            answer = ingest_pb2_grpc.IngestServiceStub(channel).Ingest(iter(records), timeout=60)
            assert (answer.accepted, answer.rejected) == (40, 0), answer

        def versions() -> list[Any]:
            payloads = _payloads(stack["kafka"]["bootstrap"], Topics.DATA_UPDATED)
            return [p for p in payloads if getattr(p, "dataset", "") == name]

        [version] = wait_for(versions, 120, "the dataset's first version")
        assert version.version == 1 and version.total_records == 40
        log = ingest.log_path.read_text()
        assert "AUTHORIZATION_FAILED" not in log and "SSL handshake failed" not in log
    finally:
        ingest.stop()
