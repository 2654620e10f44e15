"""The kernel's Kafka loops against a real broker: the failure paths.

Every output is read back with ``read_committed`` (what a downstream cdl
consumer sees), so a record of an aborted transaction would not count, and a
record committed twice would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka import Producer as RawProducer

from cdl.dedupe import MemoryProcessedStore
from cdl.errors import InvalidInputError, UnavailableError
from cdl.events import Event, InBatch, OutRecord, decode, encode
from cdl.failure import FailurePolicy
from cdl.kafka import JobLoop, Producer, RecordContext, TransactionalLoop, consumer_conf, read_latest
from cdl.kafka.security import secured
from cdl.v1 import events_pb2
from tests.conftest import kafka_env
from tests.helpers import read_committed, read_topic

HERE = Path(__file__).parent
FAST = FailurePolicy(max_attempts=3, backoff_s=0.05, max_backoff_s=0.5, transaction_retry_s=20)


def _event(n: int, event_id: str | None = None) -> Event:
    payload = events_pb2.DataUpdated(dataset="d", version=n, total_records=n)
    return Event(payload, source="/cdl/test", id=event_id or str(uuid.uuid4()), key="d")


def _job_loop(bootstrap: str, src: str, job, dlq: str, **kw) -> JobLoop:  # type: ignore[no-untyped-def]
    group = f"g-{uuid.uuid4().hex[:8]}"
    return JobLoop(
        bootstrap=bootstrap,
        group_id=group,
        topics=[src],
        transactional_id=f"tx-{group}",
        job=job,
        key=lambda e: e.id,
        deadletter_topic=dlq,
        policy=kw.pop("policy", FAST),
        **kw,
    )


def test_event_round_trips_through_kafka_with_every_header(kafka_bootstrap: str, topic_factory) -> None:
    topic = topic_factory("roundtrip")
    producer = Producer(kafka_bootstrap)
    ev = _event(7)
    producer.send(topic, ev)
    producer.flush()

    [rec] = read_topic(kafka_bootstrap, topic, expected=1)
    assert rec.offset == 0
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


def test_job_loop_dead_letters_undecodable_retries_and_permanent_failures(kafka_bootstrap: str, topic_factory) -> None:
    src, out, dlq = topic_factory("src"), topic_factory("out"), topic_factory("dlq")
    producer = Producer(kafka_bootstrap)
    producer.send(src, _event(1))
    producer.send_raw(src, b"not an event", key=b"k1", headers=[("x-origin", b"kcat")])
    producer.send(src, _event(2))
    producer.send(src, _event(3))
    producer.flush()
    calls: dict[int, int] = {}

    def job(event: Event, ctx: RecordContext) -> list[OutRecord]:
        version = event.payload.version  # type: ignore[attr-defined]
        calls[version] = calls.get(version, 0) + 1
        if version == 1 and calls[version] < 3:
            raise UnavailableError("object store down for a moment")
        if version == 2:
            raise InvalidInputError("version 2 breaks a rule")
        if version == 3:
            raise ValueError("a bug")
        done = events_pb2.ModelTrained(model="m", version=version)
        return [OutRecord.of(out, event.caused(done, source="/cdl/test"))]

    loop = _job_loop(kafka_bootstrap, src, job, dlq)
    loop.run(until=lambda: loop.jobs_done >= 3)
    # an outage is waited out; a rule broken is dead-lettered at once; a bug after max_attempts tries
    assert calls == {1: 3, 2: 1, 3: FAST.max_attempts}

    dead = sorted(read_committed(kafka_bootstrap, dlq, expected=3), key=lambda r: r.offset)
    assert len(dead) == 3
    undecodable = next(r for r in dead if r.value == b"not an event")
    assert undecodable.key == b"k1" and undecodable.headers["x-origin"] == b"kcat"  # original headers kept
    assert undecodable.headers["cdl-reason"].startswith(b"undecodable: missing CloudEvents headers")
    assert undecodable.headers["cdl-origin-topic"] == src.encode()
    assert undecodable.headers["cdl-origin-offset"] == b"1"
    reasons = sorted(r.headers["cdl-reason"] for r in dead if r is not undecodable)
    assert reasons == [b"permanent failure: version 2 breaks a rule", b"retries exhausted: a bug"]
    [done] = read_committed(kafka_bootstrap, out, expected=1)
    assert decode(done.key, done.value, list(done.headers.items())).payload.version == 1


def test_crash_mid_event_redelivers_and_duplicate_ids_are_handled_once(
    stack: dict[str, Any], kafka_bootstrap: str, topic_factory, tmp_path: Path
) -> None:
    src, out = topic_factory("src"), topic_factory("out")
    group = f"g-{uuid.uuid4().hex}"
    producer = Producer(kafka_bootstrap)
    producer.send(src, _event(1, event_id="event-one"))
    producer.flush()

    def run_worker(crash: bool) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent), **kafka_env(stack))
        args = [kafka_bootstrap, group, src, out, str(tmp_path / "processed.sqlite"), str(tmp_path / "calls.log")]
        return subprocess.run(
            [sys.executable, str(HERE / "_worker.py"), *args, "crash" if crash else "ok"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    crashed = run_worker(crash=True)
    assert crashed.returncode == -9, crashed.stderr  # killed itself with SIGKILL mid-job
    assert (tmp_path / "calls.log").read_text().split() == ["event-one"]

    # the same event again (a producer retry), then a new one
    producer.send(src, _event(1, event_id="event-one"))
    producer.send(src, _event(2, event_id="event-two"))
    producer.flush()
    finished = run_worker(crash=False)
    assert finished.returncode == 0, finished.stderr
    # redelivered after the crash and handled once more; its duplicate was skipped
    assert (tmp_path / "calls.log").read_text().split() == ["event-one", "event-one", "event-two"]
    outs = read_committed(kafka_bootstrap, out, expected=2)
    assert sorted(decode(r.key, r.value, list(r.headers.items())).payload.version for r in outs) == [1, 2]


def test_job_loop_fenced_mid_job_starts_a_new_session_and_publishes_once(kafka_bootstrap: str, topic_factory) -> None:
    """A second producer with the loop's transactional id fences it while a job runs: the job's
    transaction fails, the loop starts a new session (fencing the intruder back) and the event
    is handled again from the committed offset; its output is committed exactly once."""
    src, out, dlq = topic_factory("src"), topic_factory("out"), topic_factory("dlq")
    producer = Producer(kafka_bootstrap)
    for n in (1, 2):
        producer.send(src, _event(n, event_id=f"e{n}"))
    producer.flush()
    calls: list[str] = []
    loop_box: list[JobLoop] = []

    def job(event: Event, ctx: RecordContext) -> list[OutRecord]:
        calls.append(event.id)
        if calls == ["e1"]:  # the first try of the first job: fence the loop's producer
            intruder = RawProducer(
                secured(
                    {"bootstrap.servers": kafka_bootstrap, "transactional.id": loop_box[0]._pconf["transactional.id"]}
                )
            )
            intruder.init_transactions(30)
        version = event.payload.version  # type: ignore[attr-defined]
        return [OutRecord.of(out, event.caused(events_pb2.ModelTrained(model="m", version=version), "/t"))]

    loop = _job_loop(kafka_bootstrap, src, job, dlq, processed=MemoryProcessedStore())
    loop_box.append(loop)
    deadline = time.monotonic() + 90
    loop.run(until=lambda: loop.jobs_done >= 2 or time.monotonic() > deadline)
    assert loop.jobs_done == 2 and loop.restarts == 1
    assert calls == ["e1", "e1", "e2"]
    outs = read_committed(kafka_bootstrap, out, expected=2)
    assert sorted(decode(r.key, r.value, list(r.headers.items())).payload.version for r in outs) == [1, 2]


class _Counting:
    """A transactional processor with state: the ids it has taken (its snapshot on a state topic),
    one output record per input record, and a failure injected once at batch ``fail_at``."""

    def __init__(self, bootstrap: str, out: str, state: str, fail_at: int) -> None:
        self.bootstrap, self.out, self.state = bootstrap, out, state
        self.taken: list[str] = []
        self.pending: list[str] = []
        self.batches = 0
        self.fail_at = fail_at
        self.restores = 0

    def restore(self) -> None:
        snapshot = read_latest(self.bootstrap, self.state, b"s")
        self.taken = json.loads(snapshot) if snapshot else []
        self.pending = []
        self.restores += 1

    def on_batch(self, batch: InBatch) -> None:
        self.batches += 1
        for i in range(len(batch)):
            if self.batches == self.fail_at and i == len(batch) // 2:
                raise RuntimeError("processor crashed mid-batch")
            self.pending.append((batch.value(i) or b"").decode())

    def wants_flush(self) -> bool:
        return len(self.pending) >= 50

    def flush(self, now: float | None = None) -> list[OutRecord]:
        if not self.pending:
            return []
        self.taken += self.pending
        outs = [OutRecord(self.out, v.encode(), None) for v in self.pending]
        self.pending = []
        return [*outs, OutRecord(self.state, json.dumps(self.taken).encode(), b"s")]


def test_transactional_loop_recovers_in_place_after_the_processor_raises(kafka_bootstrap: str, topic_factory) -> None:
    """The processor raises mid-batch after earlier flushes committed: nothing of the failed
    session is committed (the revoke hook does not commit on the way out), the loop restores
    the processor from the committed snapshot and reconsumes from the committed offsets."""
    src, out = topic_factory("tl-in", partitions=2), topic_factory("tl-out")
    state = topic_factory("tl-state")
    raw = RawProducer(secured({"bootstrap.servers": kafka_bootstrap}))
    for i in range(600):
        raw.produce(src, f"r{i}".encode(), partition=i % 2)
    raw.flush(30)
    group = f"g-{uuid.uuid4().hex[:6]}"
    proc = _Counting(kafka_bootstrap, out, state, fail_at=4)
    loop = TransactionalLoop(
        bootstrap=kafka_bootstrap,
        group_id=group,
        topics=[src],
        transactional_id=f"tx-{group}",
        processor=proc,
        on_restore=proc.restore,
        batch_size=40,
        policy=FAST,
    )
    deadline = time.monotonic() + 90
    loop.run(until=lambda: (len(proc.taken) >= 600 and not proc.pending) or time.monotonic() > deadline)
    assert loop.restarts == 1 and proc.restores == 2  # the first session's restore, and the one after the failure
    outs = read_committed(kafka_bootstrap, out, expected=600)
    values = sorted(r.value for r in outs)
    assert values == sorted(f"r{i}".encode() for i in range(600))  # each exactly once
    check = Consumer(consumer_conf(kafka_bootstrap, group))
    committed = check.committed([TopicPartition(src, 0), TopicPartition(src, 1)], timeout=10)
    check.close()
    assert sorted(tp.offset for tp in committed) == [300, 300]


def test_transactional_loop_survives_being_fenced(kafka_bootstrap: str, topic_factory) -> None:
    """Another producer takes the loop's transactional id mid-stream: the loop's next transaction
    fails as fenced, it starts a new session, restores and goes on; every record once."""
    src, out = topic_factory("tf-in"), topic_factory("tf-out")
    state = topic_factory("tf-state")
    group = f"g-{uuid.uuid4().hex[:6]}"
    proc = _Counting(kafka_bootstrap, out, state, fail_at=-1)
    loop = TransactionalLoop(
        bootstrap=kafka_bootstrap,
        group_id=group,
        topics=[src],
        transactional_id=f"tx-{group}",
        processor=proc,
        on_restore=proc.restore,
        batch_size=40,
        policy=FAST,
    )
    raw = RawProducer(secured({"bootstrap.servers": kafka_bootstrap}))

    def feed() -> None:
        for i in range(400):
            raw.produce(src, f"r{i}".encode())
            if i == 200:
                raw.flush(30)
                while not loop.transactions:
                    time.sleep(0.05)
                intruder = RawProducer(
                    secured({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"tx-{group}"})
                )
                intruder.init_transactions(30)
        raw.flush(30)

    feeder = threading.Thread(target=feed)
    feeder.start()
    deadline = time.monotonic() + 90
    loop.run(until=lambda: (len(proc.taken) >= 400 and not proc.pending) or time.monotonic() > deadline)
    feeder.join()
    assert loop.restarts >= 1
    values = sorted(r.value for r in read_committed(kafka_bootstrap, out, expected=400))
    assert values == sorted(f"r{i}".encode() for i in range(400))
