"""The columnar consumer (cdl/rdbatch.c) against a real broker: it must hand over
exactly what confluent-kafka's consumer does, and commit the same way."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka import Producer as RawProducer
from prometheus_client import REGISTRY

from cdl.events import InBatch, OutRecord
from cdl.kafka import TransactionalLoop, consumer_conf
from cdl.kafka.security import secured
from cdl.kafka_native import NativeConsumer, available
from tests.helpers import read_topic

Row = tuple[str, int, int, bytes | None, bytes | None, tuple[tuple[str, bytes | None], ...]]


@pytest.fixture(autouse=True, scope="module")
def _native() -> None:
    # this project's machines have a C compiler and confluent-kafka's bundled librdkafka
    assert available(), "the columnar consumer did not build"


def _produce(bootstrap: str, a: str, b: str) -> int:
    p = RawProducer(secured({"bootstrap.servers": bootstrap}))
    sent = 0
    for i in range(300):
        p.produce(a, f"value-{i}".encode(), partition=i % 2)
        sent += 1
    p.produce(a, b"with key", key=b"k1", partition=0)
    p.produce(a, b"with headers", headers=[("content-type", b"application/x-protobuf"), ("empty", None)], partition=1)
    p.produce(a, None, key=b"tombstone", partition=0)
    p.produce(a, b"", partition=1)
    p.produce(b, b'{"label": "x"}', partition=0)
    p.produce(b, "ünïcode".encode(), key=b"", headers=[("h", b"\x00\xff")], partition=0)
    p.flush(30)
    return sent + 6


def _norm(headers: Any) -> tuple[tuple[str, bytes | None], ...]:
    return tuple((k, v) for k, v in headers or ())


def _rows_from_batch(batch: InBatch) -> list[Row]:
    return [(batch.topic, p, o, k, v, _norm(h)) for p, o, k, v, h in (batch.row(i) for i in range(len(batch)))]


def test_columnar_consumer_hands_over_what_confluent_kafka_does(kafka_bootstrap: str, topic_factory) -> None:
    a, b = topic_factory("native-a", partitions=2), topic_factory("native-b")
    total = _produce(kafka_bootstrap, a, b)

    native = NativeConsumer(consumer_conf(kafka_bootstrap, f"g-{uuid.uuid4().hex[:6]}"), max_batch=64)
    native.subscribe([a, b])
    got: list[Row] = []
    deadline = time.monotonic() + 60
    while len(got) < total and time.monotonic() < deadline:
        n, batches = native.consume_batches(64, 0.2)
        assert n == sum(len(x) for x in batches)
        for batch in batches:
            assert batch.topic in (a, b)
            got.extend(_rows_from_batch(batch))
    assert native.assignment(), "the group assigned nothing"
    positions = {(tp.topic, tp.partition): tp.offset for tp in native.position(native.assignment())}
    metadata = native.consumer_group_metadata()
    native.close()

    plain = Consumer(consumer_conf(kafka_bootstrap, f"g-{uuid.uuid4().hex[:6]}"))
    plain.subscribe([a, b])
    want: list[Row] = []
    deadline = time.monotonic() + 60
    while len(want) < total and time.monotonic() < deadline:
        for m in plain.consume(64, 0.2):
            if m.error() is None:
                want.append((m.topic(), m.partition(), m.offset(), m.key(), m.value(), _norm(m.headers())))
    plain.close()

    assert len(got) == total
    assert sorted(got, key=repr) == sorted(want, key=repr)
    assert next(r for r in got if r[3] == b"tombstone")[4] is None  # a null value stays None, not b""
    assert positions == {(a, 0): 152, (a, 1): 152, (b, 0): 2}
    assert metadata.startswith(b"CGMDv2")  # what the transactional producer takes


class _Recorder:
    """A processor that remembers every record and emits one marker per flush that saw records."""

    def __init__(self, out_topic: str) -> None:
        self.out_topic = out_topic
        self.rows: list[tuple[str, int, int, bytes | None]] = []
        self._new = 0

    def on_batch(self, batch: InBatch) -> None:
        self.rows.extend((batch.topic, *batch.row(i)[:2], batch.value(i)) for i in range(len(batch)))
        self._new += len(batch)

    def wants_flush(self) -> bool:
        return self._new >= 100

    def flush(self, now: float | None = None) -> list[OutRecord]:
        if not self._new:
            return []
        n, self._new = self._new, 0
        return [OutRecord(self.out_topic, str(n).encode(), None)]


@pytest.mark.parametrize("columnar", [True, False], ids=["columnar", "confluent-kafka"])
def test_transactional_loop_commits_the_same_way_with_either_consumer(
    kafka_bootstrap: str, topic_factory, columnar: bool
) -> None:
    src, out = topic_factory("loop-in", partitions=2), topic_factory("loop-out")
    p = RawProducer(secured({"bootstrap.servers": kafka_bootstrap}))
    for i in range(500):
        p.produce(src, f"r{i}".encode(), partition=i % 2)
    p.flush(30)
    group = f"g-{uuid.uuid4().hex[:6]}"
    rec = _Recorder(out)
    loop = TransactionalLoop(
        bootstrap=kafka_bootstrap,
        group_id=group,
        topics=[src],
        transactional_id=f"tx-{group}",
        processor=rec,
        batch_size=64,
        columnar=columnar,
    )
    assert isinstance(loop._consumer, NativeConsumer) == columnar
    deadline = time.monotonic() + 60
    loop.run(until=lambda: len(rec.rows) >= 500 or time.monotonic() > deadline)

    assert sorted(r[3] for r in rec.rows) == sorted(f"r{i}".encode() for i in range(500))
    markers = read_topic(kafka_bootstrap, out, expected=1, timeout_s=10)
    assert sum(int(m.value) for m in markers) == 500  # every flush's output committed, once
    check = Consumer(consumer_conf(kafka_bootstrap, group))
    committed = check.committed([TopicPartition(src, 0), TopicPartition(src, 1)], timeout=10)
    check.close()
    assert sorted(tp.offset for tp in committed) == [250, 250]


def _consume_all(native: NativeConsumer, total: int, timeout_s: float = 60) -> list[Row]:
    got: list[Row] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < total and time.monotonic() < deadline:
        n, batches = native.consume_batches(64, 0.2)
        assert n == sum(len(x) for x in batches)
        for batch in batches:
            got.extend(_rows_from_batch(batch))
    return got


def test_a_pattern_subscription_labels_each_record_with_its_own_topic(kafka_bootstrap: str, topic_factory) -> None:
    tag = uuid.uuid4().hex[:8]
    a, b = topic_factory(f"rx{tag}", partitions=2), topic_factory(f"rx{tag}")
    other = topic_factory("rx-other")  # not matched
    p = RawProducer(secured({"bootstrap.servers": kafka_bootstrap}))
    for i in range(120):
        p.produce(a, f"{a}/{i}".encode(), partition=i % 2)
        if i % 2:
            p.produce(b, f"{b}/{i}".encode())
    p.produce(other, b"never")
    p.flush(30)

    native = NativeConsumer(consumer_conf(kafka_bootstrap, f"g-{uuid.uuid4().hex[:6]}"), max_batch=50)
    native.subscribe([f"^test\\.rx{tag}\\..*"])
    got = _consume_all(native, 180)
    positions = {(tp.topic, tp.partition): tp.offset for tp in native.position(native.assignment())}
    native.close()

    assert len(got) == 180
    assert all(value is not None and value.decode().rsplit("/", 1)[0] == topic for topic, *_, value, _ in got)
    assert {r[0] for r in got} == {a, b}
    assert positions == {(a, 0): 60, (a, 1): 60, (b, 0): 60}

    # a name next to a pattern
    mixed = NativeConsumer(consumer_conf(kafka_bootstrap, f"g-{uuid.uuid4().hex[:6]}"), max_batch=50)
    mixed.subscribe([other, f"^test\\.rx{tag}\\..*"])
    got = _consume_all(mixed, 181)
    mixed.close()
    assert len(got) == 181
    assert sorted({r[0] for r in got}) == sorted({a, b, other})
    assert all(r[4] == b"never" if r[0] == other else r[4].decode().startswith(r[0] + "/") for r in got)


def _errors(code: str) -> float:
    return REGISTRY.get_sample_value("cdl_kafka_consume_errors_total", {"code": code}) or 0.0


def test_consume_errors_are_counted_and_the_stream_goes_on(kafka_bootstrap: str, topic_factory) -> None:
    present, missing = topic_factory("errs"), f"test.missing.{uuid.uuid4().hex[:10]}"
    p = RawProducer(secured({"bootstrap.servers": kafka_bootstrap}))
    for i in range(20):
        p.produce(present, f"r{i}".encode())
    p.flush(30)
    before = _errors("UNKNOWN_TOPIC_OR_PART")
    native = NativeConsumer(consumer_conf(kafka_bootstrap, f"g-{uuid.uuid4().hex[:6]}"), max_batch=50)
    native.subscribe([present, missing])  # a topic that does not exist: librdkafka reports an error
    got: list[Row] = []
    deadline = time.monotonic() + 30
    while (len(got) < 20 or _errors("UNKNOWN_TOPIC_OR_PART") == before) and time.monotonic() < deadline:
        for batch in native.consume_batches(64, 0.2)[1]:
            got.extend(_rows_from_batch(batch))
    native.close()
    assert sorted(r[4] or b"" for r in got) == sorted(f"r{i}".encode() for i in range(20))
    assert _errors("UNKNOWN_TOPIC_OR_PART") > before, "the error was not counted"
