"""TLS and SASL settings of Kafka clients (cdl.kafka.security) and the ACLs of a secured
cluster (cdl.kafka.acls), without a broker; tests/integration/secure runs them on one."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdl.errors import ConfigError
from cdl.events import Topics
from cdl.kafka import acls
from cdl.kafka.security import KafkaSecurity, current, secured, use
from services.trainer.settings import TrainerSettings


def test_plaintext_is_the_default_and_adds_no_identity() -> None:
    assert KafkaSecurity().librdkafka() == {"security.protocol": "plaintext"}
    assert KafkaSecurity().ssl_context() is None


def test_sasl_ssl_maps_to_librdkafka_and_a_tls_context(tmp_path: Path) -> None:
    from cdl.tls import ensure_ca

    ca, _ = ensure_ca(tmp_path)
    sec = KafkaSecurity("SASL_SSL", username="trainer", password="pw", ca_file=str(ca))
    assert sec.librdkafka() == {
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "trainer",
        "sasl.password": "pw",
        "ssl.ca.location": str(ca),
    }
    ctx = sec.ssl_context()
    assert ctx is not None and ctx.check_hostname


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"protocol": "TLS"}, "must be one of"),
        ({"protocol": "SASL_SSL", "username": "u"}, "username and a password"),
        ({"protocol": "SASL_SSL", "username": "u", "password": "p", "mechanism": "GSSAPI"}, "mechanism"),
        ({"protocol": "SSL", "cert_file": "c.pem"}, "needs its key"),
    ],
)
def test_a_half_configured_security_is_a_clear_error(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KafkaSecurity(**kwargs)


def test_settings_read_the_password_from_its_file_and_the_generic_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "trainer.password"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("CDL_KAFKA_SECURITY_PROTOCOL", "sasl_ssl")  # generic: every service
    monkeypatch.setenv("CDL_TRAINER_KAFKA_SASL_USERNAME", "trainer")  # its own user
    monkeypatch.setenv("CDL_TRAINER_KAFKA_SASL_PASSWORD_FILE", str(secret))
    sec = TrainerSettings().kafka_security()
    assert (sec.protocol, sec.username, sec.password, sec.mechanism) == (
        "SASL_SSL",
        "trainer",
        "s3cret",
        "SCRAM-SHA-512",
    )
    monkeypatch.setenv("CDL_TRAINER_KAFKA_SASL_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot read the Kafka password file"):
        TrainerSettings().kafka_security()


def test_a_process_identity_applies_per_cluster_and_what_a_client_sets_wins() -> None:
    theirs = KafkaSecurity("SASL_PLAINTEXT", username="admin", password="pw")
    try:
        use(theirs, bootstrap="secured:9093")
        assert current("secured:9093") is theirs and current("other:9092") == KafkaSecurity()
        conf = secured({"bootstrap.servers": "secured:9093", "sasl.username": "explicit"})
        assert conf["security.protocol"] == "sasl_plaintext" and conf["sasl.username"] == "explicit"
        assert secured({"bootstrap.servers": "other:9092"})["security.protocol"] == "plaintext"
    finally:
        use(KafkaSecurity(), bootstrap="secured:9093")


def test_every_topic_has_one_writer_among_the_services_and_the_users_producer() -> None:
    """Least privilege as a table: each cdl event topic is written by the service that owns it
    (the dead-letter topic by all), and the users' producer writes only data.raw and
    data.feedback."""
    writers: dict[str, set[str]] = {}
    for user, grant in acls.GRANTS.items():
        for topic in grant.writes:
            writers.setdefault(topic, set()).add(user)
    assert writers[Topics.MODEL_COMPRESSED] == {"compressor"}
    assert writers[Topics.MODEL_TRAINED] == {"trainer"}
    assert writers[Topics.MODEL_DEPLOYED] == {"gateway"} and writers[Topics.INFERENCE_LOGGED] == {"gateway"}
    assert writers[Topics.DATA_UPDATED] == {"ingest"}
    assert writers[Topics.TUNING_COMPLETED] == {"tuner"}
    assert writers[Topics.MODEL_HEALTH] == {"monitor"} and writers[Topics.DRIFT_DETECTED] == {"monitor"}
    # data.raw: the users' records, and those ingest's Ingest RPC and the monitor (labelled served requests) add
    assert writers[Topics.DATA_RAW] == {"ingest", "monitor", "producer"} and writers[Topics.DATA_FEEDBACK] == {
        "producer"
    }
    assert writers[Topics.DATA_DEADLETTER] == {"ingest", "trainer", "tuner", "compressor", "gateway", "monitor"}
    assert Topics.TUNING_REQUESTED not in writers  # the operator's (cdl tune), a super user
    for user, grant in acls.GRANTS.items():
        for b in acls.bindings(user, grant):
            assert b.principal == f"User:{user}" and b.host == "*"


def test_bindings_allow_reads_groups_and_transactions_by_prefix() -> None:
    from confluent_kafka.admin import AclOperation, ResourcePatternType, ResourceType  # type: ignore[attr-defined]

    got = {
        (b.restype, b.name, b.resource_pattern_type, b.operation)
        for b in acls.bindings("trainer", acls.GRANTS["trainer"])
    }
    assert (ResourceType.TOPIC, Topics.DATA_UPDATED, ResourcePatternType.LITERAL, AclOperation.READ) in got
    assert (ResourceType.TOPIC, Topics.MODEL_TRAINED, ResourcePatternType.LITERAL, AclOperation.WRITE) in got
    assert (ResourceType.TOPIC, Topics.MODEL_COMPRESSED, ResourcePatternType.LITERAL, AclOperation.WRITE) not in got
    assert (ResourceType.GROUP, "cdl-trainer", ResourcePatternType.PREFIXED, AclOperation.READ) in got
    assert (ResourceType.TRANSACTIONAL_ID, "cdl-trainer", ResourcePatternType.PREFIXED, AclOperation.WRITE) in got
