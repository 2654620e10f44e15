"""A secured bus on a real broker (this folder's stack: SASL_SSL, SCRAM-SHA-512, the stack's
CA, a user per service and the ACLs of cdl.kafka.acls): who is refused, who may write what,
and the loop's services running as their own users.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient
from sklearn.datasets import load_digits

from cdl.errors import DecodeError
from cdl.events import Topics, decode
from cdl.kafka.security import KafkaSecurity
from cdl.v1 import events_pb2, ingest_pb2_grpc
from cdl_tools.stack._procs import free_port
from tests.helpers import read_topic, register_digits, wait_for
from tests.integration.conftest import ServiceFactory

DIGITS = load_digits()


def _as(stack: dict[str, Any], user: str, password: str | None = None, ca: bool = True) -> dict[str, Any]:
    """Client settings of ``user`` of the stack (its own password unless ``password``)."""
    kafka = stack["kafka"]
    security = KafkaSecurity(
        "SASL_SSL",
        username=user,
        password=password if password is not None else stack["kafka_users"][user],
        ca_file=kafka["ca_file"] if ca else "",
    )
    return {"bootstrap.servers": kafka["bootstrap"], **security.librdkafka(), "log_level": 0}


def _metadata(conf: dict[str, Any]) -> Any:
    return AdminClient({**conf, "socket.timeout.ms": 2000}).list_topics(timeout=3)


def _produce(conf: dict[str, Any], topic: str) -> KafkaError | None:
    """One record to ``topic`` as ``conf``'s user: the delivery's error, None when it was written."""
    results: list[KafkaError | None] = []

    def delivered(err: KafkaError | None, msg: Message) -> None:
        results.append(err)

    producer = Producer({**conf, "acks": "all", "message.timeout.ms": 10000})
    producer.produce(topic, b"forged?", on_delivery=delivered)
    producer.flush(15)
    assert len(results) == 1, f"no delivery report for {topic}"
    return results[0]


def _payloads(bootstrap: str, topic: str) -> list[Any]:
    """The events on ``topic`` (what the ACL tests wrote there, not events, left out)."""
    out = []
    for r in read_topic(bootstrap, topic, 10**6, 2, isolation="read_committed"):
        try:
            out.append(decode(r.key, r.value, list(r.headers.items())).payload)
        except DecodeError:
            continue
    return out


def test_without_credentials_or_with_a_wrong_password_the_broker_refuses(stack: dict[str, Any]) -> None:
    bootstrap = stack["kafka"]["bootstrap"]
    with pytest.raises(KafkaException):  # plaintext against the TLS listener: no answer
        _metadata({"bootstrap.servers": bootstrap, "log_level": 0})
    with pytest.raises(KafkaException):  # the right user, a wrong password
        _metadata(_as(stack, "trainer", password="not-the-password"))
    with pytest.raises(KafkaException):  # no user at all
        _metadata(_as(stack, "nobody", password="whatever"))
    with pytest.raises(KafkaException):  # a server the system's CAs do not know is not trusted
        _metadata(_as(stack, "trainer", ca=False))
    assert Topics.MODEL_COMPRESSED in _metadata(_as(stack, "trainer")).topics


@pytest.mark.parametrize(
    ("user", "owned", "forbidden"),
    [
        ("compressor", Topics.MODEL_COMPRESSED, Topics.MODEL_DEPLOYED),
        ("trainer", Topics.MODEL_TRAINED, Topics.MODEL_COMPRESSED),
        ("gateway", Topics.MODEL_DEPLOYED, Topics.MODEL_COMPRESSED),
        ("ingest", Topics.DATA_UPDATED, Topics.MODEL_TRAINED),
        ("producer", Topics.DATA_RAW, Topics.DATA_UPDATED),
    ],
)
def test_each_user_writes_only_the_topics_it_owns(stack: dict[str, Any], user: str, owned: str, forbidden: str) -> None:
    conf = _as(stack, user)
    assert _produce(conf, owned) is None
    refused = _produce(conf, forbidden)
    assert refused is not None and refused.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, refused


def test_a_forged_model_compressed_never_reaches_the_topic(stack: dict[str, Any], kafka_bootstrap: str) -> None:
    """Only the compressor writes model.compressed: the trainer's, the gateway's and a data
    producer's credentials are refused, and nothing they sent is there to be read."""
    before = len(read_topic(kafka_bootstrap, Topics.MODEL_COMPRESSED, 10**6, 2))
    for user in ("trainer", "gateway", "producer", "monitor"):
        refused = _produce(_as(stack, user), Topics.MODEL_COMPRESSED)
        assert refused is not None and refused.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, (user, refused)
    assert len(read_topic(kafka_bootstrap, Topics.MODEL_COMPRESSED, 10**6, 2)) == before


@pytest.mark.timeout(600)
def test_the_services_run_the_loop_as_their_own_users(
    stack: dict[str, Any], kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Ingest, the trainer and the compressor, each as its own Kafka user over SASL_SSL, turn a
    producer's records into a compressed version; the monitor (Faust, aiokafka's SCRAM) joins
    its group as its own user."""

    def start(name: str, **settings: str) -> Any:
        return ServiceFactory(name, stack, tmp_path, settings, as_admin=False)()

    ingest = start("ingest", grpc_port=str(free_port()), flush_interval_s="0.5")
    ingest.grpc = f"127.0.0.1:{ingest.env['CDL_INGEST_GRPC_PORT']}"
    assert ingest.env["CDL_INGEST_KAFKA_SASL_USERNAME"] == "ingest"
    started = [ingest.start()]
    try:
        started += [start("trainer", max_epochs="2").start(), start("compressor", latency_runs="10").start()]
        started.append(start("monitor", window_s="1", grace_s="0.5").start(timeout_s=120))
        name = f"secure-{uuid.uuid4().hex[:6]}"
        with grpc.insecure_channel(ingest.grpc) as channel:
            register_digits(channel, name, min_new_records=300)
            # ingest's own Ingest RPC writes what it accepts to data.raw as the ingest user
            records = []
            for i in range(320, 340):
                r = events_pb2.Record(dataset=name, id=f"r{i}", label=str(int(DIGITS.target[i])))
                r.tensor.values.extend(DIGITS.data[i].tolist())
                records.append(r)
            answer = ingest_pb2_grpc.IngestServiceStub(channel).Ingest(iter(records), timeout=60)
            assert (answer.accepted, answer.rejected) == (20, 0), answer
        producer = Producer({**_as(stack, "producer"), "linger.ms": 20})
        for i in range(320):
            doc = {"dataset": name, "id": f"r{i}", "features": DIGITS.data[i].tolist(), "label": int(DIGITS.target[i])}
            producer.produce(Topics.DATA_RAW, json.dumps(doc).encode())
        assert producer.flush(30) == 0

        def compressed() -> list[Any]:
            return [c for c in _payloads(kafka_bootstrap, Topics.MODEL_COMPRESSED) if c.model == name]

        [done] = wait_for(compressed, 420, "the version compressed")
        assert isinstance(done, events_pb2.ModelCompressed) and done.ok, done.reason
        [trained] = [t for t in _payloads(kafka_bootstrap, Topics.MODEL_TRAINED) if t.model == name]
        assert trained.verdict == events_pb2.VERDICT_ACCEPTED

        admin = AdminClient(_as(stack, "admin"))

        def monitor_joined() -> bool:
            groups = admin.describe_consumer_groups(["cdl-monitor"])["cdl-monitor"].result(timeout=10)
            return bool(groups.members)

        wait_for(monitor_joined, 120, "the monitor in its consumer group")
        for svc in started:
            log = svc.log_path.read_text()
            assert "TOPIC_AUTHORIZATION_FAILED" not in log and "GROUP_AUTHORIZATION_FAILED" not in log, svc.name
    finally:
        for svc in reversed(started):
            svc.stop()
