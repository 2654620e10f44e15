"""bench/ingest: validated records per second end to end, against a bare producer.

Both sides send the same pre-encoded JSON records (scikit-learn digits: 64
features and a label) to the same broker in the same run:

- baseline: a bare confluent-kafka producer writing them to a topic (produce + flush);
- cdl: produce them to ``data.raw`` with the ingest service running, until the
  dataset version holding all of them is announced on ``data.updated``
  (validated, dead-letter checked, sharded in MinIO, manifest written).

The two alternate ``CDL_BENCH_INGEST_ROUNDS`` times (5) against one running
ingest service, each round with a fresh dataset, after one warm-up round that
does not count (a cold broker JVM makes the first baseline ~40% slower); the
medians count. Each round also prints the CPU seconds and page faults of the
ingest service, the broker, MinIO and the producer (this process). The
dataset is registered as float32 (as the demo does); ``CDL_BENCH_INGEST_DTYPE``
picks another dtype (e.g. uint8, which digits' 0-16 intensities fit).

After the rounds, ``CDL_BENCH_INGEST_ALONE`` (2) more rounds measure the
ingest service by itself: it is stopped (SIGSTOP) while the producer writes
all N records, then resumed to version the backlog with the machine to
itself; they print its rate and CPU seconds, for diagnosis, not the result.

Goal (DESIGN.md): cdl >= 0.5 x baseline.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, Producer
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import cpu_report, cpu_usage, machine, private_stack, result
from cdl.events import decode
from cdl.kafka.security import secured
from cdl.v1 import ingest_pb2, ingest_pb2_grpc
from cdl_tools.stack._procs import free_port

#: records per measurement: long enough for a steady rate (each side runs 1-4 s)
N = int(os.environ.get("CDL_BENCH_INGEST_RECORDS", "500000"))
#: baseline and cdl alternate this many times; medians count (single runs on a
#: shared 2-core machine vary by +-20%)
ROUNDS = int(os.environ.get("CDL_BENCH_INGEST_ROUNDS", "5"))
#: rounds of the ingest service by itself, on a backlog (diagnosis only)
ALONE_ROUNDS = int(os.environ.get("CDL_BENCH_INGEST_ALONE", "2"))
SETTLE_S = 2.0
#: the producers' compression (both sides); cdl's own producers use lz4
COMPRESSION = os.environ.get("CDL_BENCH_INGEST_COMPRESSION", "lz4")


def records(dataset: str) -> list[bytes]:
    digits = load_digits()
    x, y = digits.data, digits.target
    out = []
    for i in range(N):
        j = i % len(x)
        doc = {"dataset": dataset, "id": f"d{i}", "features": x[j].tolist(), "label": str(y[j])}
        out.append(json.dumps(doc).encode())
    return out


def bare_producer(bootstrap: str, topic: str, values: list[bytes]) -> float:
    conf = {"bootstrap.servers": bootstrap, "linger.ms": 5, "compression.type": COMPRESSION, "acks": "all"}
    p = Producer(secured(conf))  # this process's identity towards a secured stack (bench/secure)
    start = time.perf_counter()
    for v in values:
        while True:
            try:
                p.produce(topic, v)
                break
            except BufferError:
                p.poll(0.01)
    p.flush()
    return len(values) / (time.perf_counter() - start)


def cdl_round(
    bootstrap: str, grpc_port: int, values: list[bytes], name: str, stopped: int | None = None
) -> tuple[float, float]:
    """Register ``name``, produce its records to data.raw, wait for the version holding them all.

    Returns (records/s end to end, seconds spent producing). With ``stopped``
    (the ingest service's pid), the service is stopped while the records are
    produced and the time counts from when it is resumed.
    """
    import grpc

    spec = ingest_pb2.DatasetSpec(
        name=name,
        task=ingest_pb2.TASK_IMAGE_CLASSIFICATION,
        input_shape=[64],
        dtype=os.environ.get("CDL_BENCH_INGEST_DTYPE", "float32"),
        labels=[str(i) for i in range(10)],
        policy=ingest_pb2.RetrainPolicy(min_new_records=len(values)),
        holdout_fraction=0.2,
    )
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        ingest_pb2_grpc.IngestServiceStub(ch).RegisterDataset(ingest_pb2.RegisterDatasetRequest(spec=spec))
    watcher = Consumer(
        secured({"bootstrap.servers": bootstrap, "group.id": f"bench-{name}", "auto.offset.reset": "latest"})
    )
    watcher.subscribe(["data.updated"])
    while not watcher.assignment():
        watcher.poll(0.1)
    if stopped is not None:
        os.kill(stopped, signal.SIGSTOP)
        try:
            bare_producer(bootstrap, "data.raw", values)
        finally:
            os.kill(stopped, signal.SIGCONT)
    start = time.perf_counter()
    if stopped is None:
        bare_producer(bootstrap, "data.raw", values)
    produced = time.perf_counter() - start
    total = 0
    while total < len(values) and time.perf_counter() - start < 600:
        msg = watcher.poll(0.5)
        if msg is None or msg.error():
            continue
        ev = decode(msg.key(), msg.value(), msg.headers())
        if ev.payload.dataset == name:  # type: ignore[attr-defined]
            total = ev.payload.total_records  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - start
    watcher.close()
    if total < len(values):
        raise SystemExit(f"ingest did not version all records in time ({total}/{len(values)})")
    return len(values) / elapsed, produced


def main() -> None:
    with private_stack() as state:
        bootstrap = state["kafka"]["bootstrap"]
        grpc_port, metrics_port = free_port(), free_port()
        env = dict(
            os.environ,
            CDL_INGEST_GRPC_PORT=str(grpc_port),
            CDL_INGEST_METRICS_PORT=str(metrics_port),
            CDL_INGEST_LOG_LEVEL="WARNING",
            CDL_INGEST_INSECURE="true",  # no API key: the bench produces to Kafka, not the API
            PYTHONPATH=str(Path(__file__).resolve().parent.parent),
        )
        log = open(Path(os.environ["CDL_STATE_DIR"]) / "ingest.log", "wb")  # noqa: SIM115
        cmd = [sys.executable, "-m", "services.ingest"]
        if os.environ.get("CDL_BENCH_PROFILE"):
            cmd = [sys.executable, "-m", "cProfile", "-o", os.environ["CDL_BENCH_PROFILE"], "-m", "services.ingest"]
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
        pids = {"ingest": proc.pid, **{n: p["pid"] for n, p in state["procs"].items() if not n.startswith("triton")}}
        pids["bench producer"] = os.getpid()
        bases: list[float] = []
        cdls: list[float] = []
        try:
            for _ in range(300):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=1):
                        break
                except OSError:
                    time.sleep(0.2)
            for r in range(ROUNDS + 1):
                # round 0 warms up (the broker's JIT, the ingest's first allocations) and does not count;
                # each round: a fresh dataset name, so its records are new to ingest
                name = f"bench-{uuid.uuid4().hex[:6]}"
                values = records(name)
                if r == 0:
                    print(f"machine: {machine()}; {N} records of {np.mean([len(v) for v in values]):.0f} bytes")
                time.sleep(SETTLE_S)  # let the previous round's background work (shard writes, GC) end
                before = cpu_usage(pids)
                base = bare_producer(bootstrap, f"bench.bare.{name}", values)
                bare_cpu = cpu_report(before, cpu_usage(pids))
                time.sleep(SETTLE_S)
                before = cpu_usage(pids)
                cdl, produced = cdl_round(bootstrap, grpc_port, values, name)
                cpu = cpu_report(before, cpu_usage(pids))
                if r > 0:
                    bases.append(base)
                    cdls.append(cdl)
                label = f"round {r}" if r else "warm-up (not counted)"
                print(
                    f"{label}: bare producer {base:,.0f} records/s; cdl end to end {cdl:,.0f} records/s "
                    f"({N / cdl:.2f}s; producing took {produced:.2f}s); ratio {cdl / base:.2f}"
                )
                print(f"  cpu during the bare round: {bare_cpu}")
                print(f"  cpu during the cdl round:  {cpu}")
            for _ in range(ALONE_ROUNDS):
                name = f"bench-{uuid.uuid4().hex[:6]}"
                values = records(name)
                time.sleep(SETTLE_S)
                before = cpu_usage({"ingest": proc.pid})
                alone, _ = cdl_round(bootstrap, grpc_port, values, name, stopped=proc.pid)
                print(
                    f"ingest alone on a backlog of {N} records: {alone:,.0f} records/s ({N / alone:.2f}s); "
                    f"{cpu_report(before, cpu_usage({'ingest': proc.pid}))}"
                )
        finally:
            proc.terminate()
            proc.wait(30)
        base, cdl = statistics.median(bases), statistics.median(cdls)
        print(f"medians of {ROUNDS} rounds: bare producer {base:,.0f} records/s, cdl end to end {cdl:,.0f} records/s")
        print(result("ingest_records_per_s", cdl, base, op=">=", goal=0.5, unit="records/s"))


if __name__ == "__main__":
    main()
