"""The kernel's Kafka transport against a real broker."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from cdl.dedupe import MemoryProcessedStore
from cdl.errors import InvalidInputError, UnavailableError
from cdl.events import Event, decode, encode
from cdl.kafka import ConsumerLoop, Outgoing, Producer, RecordContext
from cdl.v1 import events_pb2
from tests.helpers import read_topic

HERE = Path(__file__).parent


def _event(n: int, event_id: str | None = None) -> Event:
    payload = events_pb2.DataUpdated(dataset="d", version=n, total_records=n)
    return Event(payload, source="/cdl/test", id=event_id or str(uuid.uuid4()), key="d")


def test_event_round_trips_through_kafka_with_every_header(kafka_bootstrap: str, topic_factory) -> None:
    topic = topic_factory("roundtrip")
    producer = Producer(kafka_bootstrap)
    ev = _event(7)
    delivery = producer.publish(topic, ev)
    assert delivery.topic == topic and delivery.offset == 0

    [rec] = read_topic(kafka_bootstrap, topic, expected=1)
    _, _, sent_headers = encode(ev)
    for name, value in sent_headers:
        assert rec.headers[name] == value, name
    back = decode(rec.key, rec.value, list(rec.headers.items()))
    assert (back.id, back.type, back.source, back.traceparent, back.time) == (
        ev.id,
        ev.type,
        ev.source,
        ev.traceparent,
        ev.time,
    )
    assert back.payload == ev.payload


def test_undecodable_records_are_dead_lettered_and_the_loop_goes_on(kafka_bootstrap: str, topic_factory) -> None:
    src, out, dlq = topic_factory("src"), topic_factory("out"), topic_factory("dlq")
    producer = Producer(kafka_bootstrap)
    producer.send(src, _event(1))
    producer.send_raw(src, b"not an event", key=b"k1", headers=[("x-origin", b"kcat")])
    producer.send(src, _event(2))
    producer.flush()

    seen: list[int] = []

    def handler(event: Event, ctx: RecordContext) -> list[Outgoing]:
        assert isinstance(event.payload, events_pb2.DataUpdated)
        seen.append(event.payload.version)
        done = events_pb2.ModelTrained(model="m", version=event.payload.version)
        return [Outgoing(out, event.caused(done, source="/cdl/test"))]

    loop = ConsumerLoop(
        bootstrap=kafka_bootstrap,
        group_id=f"g-{uuid.uuid4().hex}",
        topics=[src],
        handler=handler,
        producer=producer,
        deadletter_topic=dlq,
    )
    loop.run(max_records=3, idle_timeout_s=20)
    assert seen == [1, 2]
    assert loop.deadlettered == 1

    [dead] = read_topic(kafka_bootstrap, dlq, expected=1)
    assert dead.value == b"not an event" and dead.key == b"k1"
    assert dead.headers["x-origin"] == b"kcat"  # original headers kept
    assert dead.headers["cdl-reason"].startswith(b"undecodable: missing CloudEvents headers")
    assert dead.headers["cdl-origin-topic"] == src.encode()
    assert dead.headers["cdl-origin-offset"] == b"1"
    outs = read_topic(kafka_bootstrap, out, expected=2)
    assert sorted(decode(r.key, r.value, list(r.headers.items())).payload.version for r in outs) == [1, 2]


def test_retryable_errors_are_retried_and_permanent_ones_dead_lettered(kafka_bootstrap: str, topic_factory) -> None:
    src, dlq = topic_factory("src"), topic_factory("dlq")
    producer = Producer(kafka_bootstrap)
    producer.send(src, _event(1))
    producer.send(src, _event(2))
    producer.flush()
    calls: dict[int, int] = {}

    def handler(event: Event, ctx: RecordContext) -> None:
        version = event.payload.version  # type: ignore[attr-defined]
        calls[version] = calls.get(version, 0) + 1
        if version == 1 and calls[version] < 3:
            raise UnavailableError("object store down for a moment")
        if version == 2:
            raise InvalidInputError("version 2 breaks a rule")

    loop = ConsumerLoop(
        bootstrap=kafka_bootstrap,
        group_id=f"g-{uuid.uuid4().hex}",
        topics=[src],
        handler=handler,
        producer=producer,
        deadletter_topic=dlq,
        backoff_s=0.05,
    )
    loop.run(max_records=2, idle_timeout_s=20)
    assert calls == {1: 3, 2: 1}
    assert loop.handled == 1 and loop.deadlettered == 1
    [dead] = read_topic(kafka_bootstrap, dlq, expected=1)
    assert dead.headers["cdl-reason"] == b"permanent failure: version 2 breaks a rule"
    assert dead.headers["cdl-error"] == b"InvalidInputError"


def test_crash_mid_event_redelivers_and_duplicate_ids_are_handled_once(
    kafka_bootstrap: str, topic_factory, tmp_path: Path
) -> None:
    src, out = topic_factory("src"), topic_factory("out")
    group = f"g-{uuid.uuid4().hex}"
    producer = Producer(kafka_bootstrap)
    first = _event(1, event_id="event-one")
    producer.send(src, first)
    producer.flush()

    def run_worker(crash: bool) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent))
        return subprocess.run(
            [
                sys.executable,
                str(HERE / "_worker.py"),
                kafka_bootstrap,
                group,
                src,
                out,
                str(tmp_path / "processed.sqlite"),
                str(tmp_path / "calls.log"),
                "crash" if crash else "ok",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    crashed = run_worker(crash=True)
    assert crashed.returncode == -9, crashed.stderr  # killed itself with SIGKILL mid-event
    assert (tmp_path / "calls.log").read_text().split() == ["event-one"]

    # the same event again (a producer retry), then a new one
    producer.send(src, _event(1, event_id="event-one"))
    producer.send(src, _event(2, event_id="event-two"))
    producer.flush()
    finished = run_worker(crash=False)
    assert finished.returncode == 0, finished.stderr
    # redelivered after the crash, handled once more; its duplicate was skipped
    assert (tmp_path / "calls.log").read_text().split() == ["event-one", "event-one", "event-two"]
    assert "skipped=1" in finished.stdout
    outs = read_topic(kafka_bootstrap, out, expected=2)
    ids = sorted(decode(r.key, r.value, list(r.headers.items())).payload.version for r in outs)
    assert ids == [1, 2]


def test_memory_store_is_default(kafka_bootstrap: str, topic_factory) -> None:
    # a loop without a store still dedupes within its lifetime
    src = topic_factory("src")
    producer = Producer(kafka_bootstrap)
    for _ in range(2):
        producer.send(src, _event(1, event_id="same"))
    producer.flush()
    handled: list[str] = []
    loop = ConsumerLoop(
        bootstrap=kafka_bootstrap,
        group_id=f"g-{uuid.uuid4().hex}",
        topics=[src],
        handler=lambda e, c: handled.append(e.id),  # type: ignore[func-returns-value]
        producer=producer,
        processed=MemoryProcessedStore(),
    )
    loop.run(max_records=2, idle_timeout_s=20)
    assert handled == ["same"] and loop.skipped == 1
