"""No loop hangs (issue: a broker stop/start inside a transaction stalled ingest for good).

librdkafka's ``send_offsets_to_transaction`` can block far past its timeout when the group
coordinator goes away mid-transaction (librdkafka #5456, #5511); with the broker paused
(SIGSTOP) it blocks until the transaction times out (180 s), whatever timeout it was given. The
rule (cdl.liveness, docs/reliability.md): a call past its deadline makes the process report not
live and exit 70; its supervisor starts it again; the new instance fences the stuck one's
transactional id. Recovery bound stated here: every record is versioned or dead-lettered, every
event's output published, within 120 s of the broker being back.

Run under the local stack's supervisor (cdl_tools.stack.supervise), against the session's broker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer as KProducer
from sklearn.datasets import load_digits

from cdl.datasets import load_version
from cdl.events import decode
from cdl.kafka import Producer, ensure_topics
from cdl.kafka.security import secured
from cdl.store import ObjectStore
from cdl.v1 import events_pb2
from cdl_tools.stack._components import broker_answers
from cdl_tools.stack._probe import read_supervisor_state
from cdl_tools.stack._procs import free_port
from tests.helpers import broker_proc, read_committed, register_digits, restart_broker, wait_for
from tests.integration.conftest import ROOT

DIGITS = load_digits()
RECOVERY_S = 120


def _healthz(metrics: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://{metrics}/healthz", timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def _record(name: str, i: int) -> bytes:
    k = i % len(DIGITS.target)
    doc = {"dataset": name, "id": f"r{i}", "features": DIGITS.data[k].tolist(), "label": int(DIGITS.target[k])}
    return json.dumps(doc).encode()


def test_ingest_stuck_in_a_transaction_on_a_paused_broker_is_restarted_and_loses_nothing(
    stack: dict[str, Any], kafka_bootstrap: str, object_store: ObjectStore, ingest_factory: Any, ingest_topics: Any
) -> None:
    """The broker paused (SIGSTOP) while ingest streams: its transaction call blocks past its
    deadline, /healthz says not live naming the step, the process exits 70, the supervisor starts
    it again; after the broker resumes, every record is versioned or dead-lettered exactly once."""
    svc = ingest_factory(
        call_grace_s="3", transaction_retry_s="8", shard_max_records="1500", batch_size="500", flush_interval_s="0.5"
    ).start(supervised=True)
    name = f"live-{uuid.uuid4().hex[:6]}"
    with svc.channel() as ch:
        register_digits(ch, name, min_new_records=1000, max_interval_s=3.0)
    producer = KProducer(
        secured({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "message.timeout.ms": 600000})
    )
    good = bad = 0

    def chunk(n: int) -> None:
        nonlocal good, bad
        for j in range(n):
            if j % 50 == 49:  # malformed
                producer.produce(ingest_topics["raw"], b'{"dataset": "' + name.encode() + b'", "id": "bad')
                bad += 1
            else:
                producer.produce(ingest_topics["raw"], _record(name, good))
                good += 1
            producer.poll(0)

    chunk(1000)
    assert producer.flush(60) == 0
    wait_for(lambda: read_committed(kafka_bootstrap, ingest_topics["updated"], 1, timeout_s=2), 60, "a first version")
    first_pid = read_supervisor_state(svc.supervisor_state).get("child_pid")
    broker = broker_proc(stack)
    # a chunk in the broker as it stops: ingest has fetched part of it and commits what it takes
    # next in a transaction with the broker paused
    chunk(4000)
    assert producer.flush(60) == 0
    os.killpg(broker.pid, signal.SIGSTOP)
    try:
        _, body = wait_for(lambda: (s := _healthz(svc.metrics))[0] == 503 and s, 60, "ingest reporting not live")
        assert "stuck" in body and body["status"] == "not live", body
        # the step it is stuck in is a blocking Kafka call of the loop, named
        assert any(step in body["stuck"] for step in ("transaction", "consume", "init", "flush", "close")), body
        state = wait_for(
            lambda: (s := read_supervisor_state(svc.supervisor_state)).get("restarts", 0) >= 1 and s, 60, "a restart"
        )
        assert state["child_pid"] != first_pid
        # the watchdog's own exit (70), or the supervisor's kill on the not-live probes: whichever came first
        assert state["last_exit"].get("code") == 70 or state["last_reason"].startswith("not live"), state
    finally:
        os.killpg(broker.pid, signal.SIGCONT)
    back = time.monotonic()
    chunk(500)
    assert producer.flush(120) == 0

    def all_versioned() -> Any:
        ups = [
            decode(r.key, r.value, list(r.headers.items())).payload
            for r in read_committed(kafka_bootstrap, ingest_topics["updated"], 10**6, timeout_s=2)
        ]
        return ups if ups and ups[-1].total_records >= good else None

    updates = wait_for(all_versioned, RECOVERY_S, f"all {good} records versioned")
    assert time.monotonic() - back <= RECOVERY_S
    numbers = [u.version for u in updates]
    assert numbers == list(range(1, len(numbers) + 1)), numbers  # each version once, in order
    assert updates[-1].total_records == good
    ids = load_version(object_store, name, updates[-1].version).ids
    assert len(ids) == len(set(ids)) == good and set(ids) == {f"r{k}" for k in range(good)}
    dead = read_committed(kafka_bootstrap, ingest_topics["deadletter"], expected=bad, timeout_s=60)
    origins = [(d.headers["cdl-origin-partition"], d.headers["cdl-origin-offset"]) for d in dead]
    assert len(origins) == len(set(origins)) == bad  # each malformed record dead-lettered once
    assert _healthz(svc.metrics)[0] == 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["broker-stopped", "broker-killed"])
def test_a_job_loop_whose_broker_goes_away_inside_a_transaction_recovers_and_publishes_once(
    stack: dict[str, Any], kafka_bootstrap: str, tmp_path: Path, sig: signal.Signals
) -> None:
    """A job loop with its job's output produced and the offsets about to join the open
    transaction when the broker is stopped (SIGTERM) or killed (-9) and started again: it
    recovers by itself (in place, or through the watchdog's exit and its supervisor) and every
    event's output is published exactly once."""
    uid = uuid.uuid4().hex[:8]
    src, out = f"test.live-src.{uid}", f"test.live-out.{uid}"
    ensure_topics(kafka_bootstrap, {src: 1, out: 1})
    sender = Producer(kafka_bootstrap)
    events = 5
    for n in range(1, events + 1):
        sender.send(src, _event(n))
    sender.flush()
    pause, go, metrics = tmp_path / "paused", tmp_path / "go", free_port()
    worker = [
        sys.executable,
        "-m",
        "tests.integration._txn_worker",
        kafka_bootstrap,
        f"g-{uid}",
        src,
        out,
        str(tmp_path / "processed.sqlite"),
        str(metrics),
        str(pause),
        str(go),
    ]
    state = tmp_path / "supervisor.json"
    argv = [
        sys.executable, "-m", "cdl_tools.stack.supervise", "--name", "txn-worker", "--state", str(state),
        "--live-url", f"http://127.0.0.1:{metrics}/healthz", "--probe-interval-s", "1", "--backoff-max-s", "5",
        "--", *worker,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "worker.log", "ab") as log:
        sup = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=log)
    try:
        wait_for(pause.exists, 90, "the worker inside its first transaction")
        restart = _Background(lambda: restart_broker(stack, sig))
        wait_for(lambda: not broker_answers(kafka_bootstrap), 60, "the broker gone")
        go.write_text("go")  # the transaction goes on with the broker away
        restart.join(120)
        back = time.monotonic()

        def published() -> Any:
            recs = read_committed(kafka_bootstrap, out, events, timeout_s=3)
            return recs if len(recs) >= events else None

        recs = wait_for(published, RECOVERY_S, f"{events} outputs")
        assert time.monotonic() - back <= RECOVERY_S
        versions = sorted(decode(r.key, r.value, list(r.headers.items())).payload.version for r in recs)
        assert versions == list(range(1, events + 1)), versions  # each once
    finally:
        sup.send_signal(signal.SIGTERM)
        try:
            sup.wait(40)
        except subprocess.TimeoutExpired:
            sup.kill()
            sup.wait(10)
    log_text = (tmp_path / "worker.log").read_text(errors="replace")
    assert sup.returncode == 0, log_text[-3000:]


class _Background:
    def __init__(self, fn: Any) -> None:
        import threading

        self.error: list[BaseException] = []

        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                self.error.append(exc)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()

    def join(self, timeout_s: float) -> None:
        self._t.join(timeout_s)
        assert not self._t.is_alive(), "background step did not finish"
        if self.error:
            raise self.error[0]


def _event(n: int) -> Any:
    from cdl.events import Event

    payload = events_pb2.DataUpdated(dataset="d", version=n, total_records=n)
    return Event(payload, source="/cdl/test", id=f"ev-{n}-{uuid.uuid4().hex[:6]}", key="d")
