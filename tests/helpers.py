"""Helpers shared by tests (reading topics back, running the cdl command line)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from cdl.kafka.security import secured
from cdl_tools.settings import StackSettings
from cdl_tools.stack import LocalStack
from cdl_tools.stack._procs import ProcInfo, is_alive


@dataclass
class Rec:
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    partition: int
    offset: int


def read_committed(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list[Rec]:
    """:func:`read_topic` as a cdl consumer reads: records of aborted transactions left out."""
    return read_topic(bootstrap, topic, expected, timeout_s, isolation="read_committed")


def committed_payloads(bootstrap: str, topic: str) -> list[Any]:
    """The decoded payloads of every committed event on ``topic`` so far (a short read)."""
    from cdl.events import decode

    return [decode(r.key, r.value, list(r.headers.items())).payload for r in read_committed(bootstrap, topic, 10**6, 2)]


def _partitions(consumer: Consumer, topic: str, timeout_s: float = 10.0) -> list[int]:
    """``topic``'s partitions as the broker lists them (none when it does not exist yet)."""
    meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    return sorted(meta.partitions) if meta is not None and meta.error is None else []


def read_topic(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0, isolation: str = "read_uncommitted"
) -> list[Rec]:
    """Read a topic from the start until ``expected`` records arrived (or time ran out), then on
    to the end of every partition as it is then (its high watermark; for ``read_committed`` its
    last stable offset): records beyond ``expected`` that were written by then are read too."""
    consumer = Consumer(  # as this process's identity towards the stack (a secured one's admin)
        secured(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"test-reader-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": isolation,
                "enable.partition.eof": True,
            }
        )
    )
    # assign (no group join, so no rebalance delay): every partition from the start
    deadline = time.monotonic() + timeout_s
    partitions: list[int] = []
    while not partitions and time.monotonic() < deadline + 10:
        partitions = _partitions(consumer, topic, timeout_s=5)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    out: list[Rec] = []
    at_end: set[int] = set()  # partitions read to their end, and nothing read from them since

    def take(msg: Any) -> None:
        if msg is None:
            return
        if msg.error() is not None:
            if msg.error().code() == KafkaError._PARTITION_EOF:
                at_end.add(msg.partition() or 0)
            return
        at_end.discard(msg.partition() or 0)
        headers = {k: v for k, v in (msg.headers() or []) if isinstance(v, bytes)}
        out.append(Rec(msg.key(), msg.value(), headers, msg.partition() or 0, msg.offset() or 0))

    try:
        while len(out) < expected and time.monotonic() < deadline:
            take(consumer.poll(0.5))
        # on to the end of every partition (records beyond `expected` are read, not waited for)
        end = time.monotonic() + 10.0
        while not at_end.issuperset(partitions) and time.monotonic() < end:
            take(consumer.poll(0.2))
    finally:
        consumer.close()
    return out


def committed_offsets(bootstrap: str, group: str, topic: str) -> int:
    """How many of ``topic``'s records consumer group ``group`` has committed past, over all
    partitions (asked of the group's coordinator; the group is not joined)."""
    consumer = Consumer(secured({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}))
    try:
        partitions = _partitions(consumer, topic)
        done = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return sum(max(tp.offset, 0) for tp in done)
    finally:
        consumer.close()


def end_offsets(bootstrap: str, topic: str) -> int:
    """The sum of ``topic``'s high watermarks: how many offsets it holds (records, and the
    transaction markers of transactional producers)."""
    consumer = Consumer(secured({"bootstrap.servers": bootstrap, "group.id": f"test-ends-{uuid.uuid4().hex}"}))
    try:
        partitions = _partitions(consumer, topic)
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions)
    finally:
        consumer.close()


def wait_committed(bootstrap: str, group: str, topic: str, offset: int, timeout_s: float = 60.0) -> None:
    """Wait until ``group`` committed past the first ``offset`` records of ``topic``: a
    transactional service has then handled them, and whatever it produced for them is committed
    with that offset (a negative check reads the outputs after this, not after a sleep)."""
    wait_for(
        lambda: committed_offsets(bootstrap, group, topic) >= offset,
        timeout_s,
        f"{group} committing past {offset} records of {topic}",
        interval_s=0.3,
    )


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def run_cdl(
    *args: str, state_dir: Path, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The `cdl` command line as a user runs it, against the stack in ``state_dir`` (``env``:
    more environment, e.g. service settings)."""
    env = dict(os.environ, **(env or {}), CDL_STATE_DIR=str(state_dir), COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "cdl_tools.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cdl_in_process(*args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    """:func:`run_cdl` in this process (no interpreter start, no imports again: for the many
    short error paths); an exception the command let out is a traceback in ``stderr``, as a
    user would see it."""
    import traceback

    from typer.testing import CliRunner

    from cdl_tools.cli import app

    result = CliRunner().invoke(app, list(args), env={"CDL_STATE_DIR": str(state_dir), "COLUMNS": "200"})
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["cdl", *args], result.exit_code, result.stdout, stderr)


def broker_proc(stack: dict[str, Any]) -> ProcInfo:
    """The session stack's Kafka broker process."""
    state = json.loads((Path(stack["state_dir"]) / "stack.json").read_text())
    return ProcInfo(**state["procs"]["kafka"])


def restart_broker(stack: dict[str, Any], sig: signal.Signals) -> None:
    """Stop the broker with ``sig`` (its whole process group), then bring it back as
    `cdl stack up` does: same data directory, same ports."""
    info = broker_proc(stack)
    os.killpg(info.pid, sig)
    deadline = time.monotonic() + 60
    while is_alive(info) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not is_alive(info), "broker did not stop"
    time.sleep(2)  # clients notice it is gone
    # the stack as it was: its Tritons (the gateway's tests use every one), PostgreSQL if it had one
    servers, postgres = len(stack.get("triton", [])), bool(stack.get("postgres"))
    settings = StackSettings(state_dir=Path(stack["state_dir"]), triton_servers=servers, postgres=postgres, services=[])
    LocalStack(settings).up()


def wait_for(cond: Any, timeout_s: float, what: str = "a condition", interval_s: float = 0.2) -> Any:
    """``cond()``'s first truthy value, asked every ``interval_s`` until ``timeout_s``; an
    AssertionError naming ``what`` when it never came. The one way tests wait."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(interval_s)
    got = cond()  # one last look: the deadline may have passed during a slow ask
    if got:
        return got
    raise AssertionError(f"timed out after {timeout_s:.1f} s: {what}")


def metric_value(url: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``, scraped from a
    Prometheus endpoint (``http://host:port/metrics``), read with prometheus_client's parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def register_digits(
    channel: Any, name: str, *, min_new_records: int, max_interval_s: float = 0.0, family: str = ""
) -> None:
    """Register an 8x8-digits image dataset (labels 0-9, holdout 0.2) through ingest's gRPC API."""
    from cdl.v1 import ingest_pb2, ingest_pb2_grpc
    from cdl_tools.demo import digits_spec

    spec = digits_spec(min_new_records, max_interval_s, name)
    spec.family = family
    ingest_pb2_grpc.IngestServiceStub(channel).RegisterDataset(ingest_pb2.RegisterDatasetRequest(spec=spec), timeout=10)
