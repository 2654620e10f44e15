"""Replicas of a consumer service in one group, on the real broker (issue 28).

Partitions are the unit of parallelism: instances of a group share its topics' partitions. These
tests run the job services' shell (cdl.service.JobService: the trainer's, tuner's and
compressor's) as separate processes with distinct instance names: work is shared, an instance
killed -9 mid-stream and one added lose and double nothing (the outputs and the offsets commit in
one transaction), and an instance left without partitions is still ready (a standby).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from cdl.events import Event, decode
from cdl.kafka import Producer
from cdl.v1 import events_pb2
from cdl_tools.stack._procs import free_port
from tests.conftest import kafka_env
from tests.helpers import read_committed, wait_for

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


class Replica:
    def __init__(self, args: list[str], instance: str, env: dict[str, str], log: Path) -> None:
        self.instance = instance
        self.port = free_port()
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "_replica_worker.py"), *args[:4], instance, *args[4:6], str(self.port),
                 str(log.parent / f"state-{instance}")],
                env=env, cwd=ROOT, stdout=out, stderr=out,
            )  # fmt: skip

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"replica {self.instance} exited: {self.tail()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _calls(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    return [tuple(line.split(" ", 1)) for line in path.read_text().splitlines() if line]  # type: ignore[misc]


def test_job_service_replicas_share_work_and_survive_kill_and_join(
    kafka_bootstrap: str, topic_factory: Any, stack: dict[str, Any], tmp_path: Path
) -> None:
    """Two instances share a 3-partition topic; one is killed -9 mid-stream (and replaced under its
    name) and a third joins: every event's output is committed exactly once, both first instances
    did some of the work, and an instance beyond the partition count (a standby) is ready."""
    src, out = topic_factory("src", partitions=3), topic_factory("out")
    group = f"cdl-replica-{uuid.uuid4().hex[:8]}"
    calls = tmp_path / "calls.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), **kafka_env(stack))
    args = [kafka_bootstrap, group, src, out, str(calls), "0.15"]
    replicas = [Replica(args, name, env, tmp_path / f"{name}.log") for name in ("a", "b")]
    try:
        wait_for(lambda: all(r.ready() for r in replicas), 90, "both replicas ready")
        producer = Producer(kafka_bootstrap)
        n = 90
        for i in range(n):
            payload = events_pb2.DataUpdated(dataset=f"d{i}", version=i + 1, total_records=1)
            producer.send(src, Event(payload, source="/cdl/test", id=f"e{i}", key=f"d{i}"))
        producer.flush()
        by = lambda: Counter(who for who, _ in _calls(calls))  # noqa: E731
        wait_for(lambda: by()["a"] >= 5 and by()["b"] >= 5, 90, "both replicas handling events")
        replicas[0].proc.send_signal(signal.SIGKILL)  # mid-stream: a job of its may be running
        replicas[0].proc.wait(10)
        # its replacement keeps its name (a StatefulSet's pod does): its transactional id fences
        # the killed one and aborts the transaction it left open at once (under a new name, readers
        # of its outputs would wait for transaction.timeout.ms); and a new instance joins
        replicas[0] = Replica(args, "a", env, tmp_path / "a2.log")
        replicas.append(Replica(args, "c", env, tmp_path / "c.log"))
        outs = read_committed(kafka_bootstrap, out, expected=n, timeout_s=180)
        ids = Counter(decode(r.key, r.value, list(r.headers.items())).id for r in outs)
        assert set(ids) == {f"out-e{i}" for i in range(n)}, f"missing: {n - len(ids)}"
        doubled = {k: c for k, c in ids.items() if c > 1}
        assert not doubled, f"outputs committed more than once: {doubled}"
        handled = by()
        assert handled["a"] > 0 and handled["b"] > 0, handled  # ('a' before it was killed, at least)
        # a job whose event moved to another member (the killed one's, one revoked by a rebalance
        # while it ran) runs again there: a few, not a loop
        again = Counter(e for _, e in _calls(calls))
        assert sum(c - 1 for c in again.values()) <= 6, {e: c for e, c in again.items() if c > 1}
        # a, b and c; one more makes four members for three partitions: one has none, and is ready
        replicas.append(Replica(args, "d", env, tmp_path / "d.log"))
        wait_for(lambda: all(r.ready() for r in replicas), 90, "every replica ready, the standby too")
    finally:
        for r in replicas:
            r.stop()
