"""bench/scale_ingest: ingest as 1 and as 2 instances in one group (issue 28; docs/scaling.md).

Called by bench/scale.py with its private stack's state: ``run(state, console)``. For each
count, a fresh set of topics (``data.raw`` with 3 partitions), that many ``python -m
services.ingest`` processes in one group (instances ``i0``, ``i1``), and three datasets whose
home partitions are 0, 1 and 2 (each owned by the instance holding it). The records
(``CDL_BENCH_SCALE_INGEST_RECORDS``, 60,000: 64 features each, as bench/ingest's digits) are
produced keyed by dataset, as the gRPC API does; each dataset's count policy is its record
count, so the clock stops when every dataset's version holding all its records is on
``data.updated``. Reported: records/s from the first record produced to the last version, and
the ingest processes' CPU seconds per 1,000 records.

``RESULT ingest_2_vs_1 value=<2-instance records/s> baseline=<1-instance records/s>
goal=>=0.0`` (informational: on a 2-core machine two instances share the cores with the
broker, MinIO and the producer).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import result

ROOT = Path(__file__).resolve().parent.parent
#: records per measurement, over three datasets
N = int(os.environ.get("CDL_BENCH_SCALE_INGEST_RECORDS", "60000"))
COUNTS = (1, 2)


def _names(uid: str) -> list[str]:
    """Three dataset names whose home partitions (of 3) are 0, 1 and 2."""
    from services.ingest.partitions import home_partition

    by_home: dict[int, str] = {}
    k = 0
    while len(by_home) < 3:
        name = f"scale{k}-{uid}"
        by_home.setdefault(home_partition(name, 3), name)
        k += 1
    return [by_home[p] for p in range(3)]


def _values(names: list[str]) -> list[tuple[bytes, bytes]]:
    """(key, value) of N records spread over ``names``: 64 features of 0-16 and a label."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 17, size=(1797, 64)).tolist()
    out = []
    for i in range(N):
        name = names[i % len(names)]
        doc = {"dataset": name, "id": f"d{i}", "features": x[i % len(x)], "label": str(i % 10)}
        out.append((name.encode(), json.dumps(doc).encode()))
    return out


def _measure(state: dict[str, Any], n: int, console: Any) -> tuple[float, float]:
    """Records/s and CPU seconds per 1,000 records of ``n`` ingest processes."""
    import grpc
    from confluent_kafka import Consumer, Producer

    from bench.scale import _cpu_s, _ready, _start, _stop
    from cdl.events import decode
    from cdl.kafka import ensure_topics
    from cdl.kafka.security import secured
    from cdl.v1 import ingest_pb2, ingest_pb2_grpc
    from cdl_tools.stack._procs import free_port

    bootstrap, tmp = state["kafka"]["bootstrap"], Path(state["state_dir"])
    uid = uuid.uuid4().hex[:6]
    topics = {k: f"bench.ing.{k}.{uid}" for k in ("raw", "feedback", "drift", "deadletter", "updated", "state")}
    ensure_topics(
        bootstrap,
        {t: 3 if k == "raw" else 1 for k, t in topics.items()},
        {topics["state"]: {"cleanup.policy": "compact"}},
    )
    names = _names(uid)
    values = _values(names)
    procs, grpc_ports = [], []
    for i in range(n):
        metrics, grpc_port = free_port(), free_port()
        env = dict(os.environ, PYTHONPATH=str(ROOT), CDL_INSECURE="true")
        env |= {f"CDL_INGEST_{k.upper()}_TOPIC": t for k, t in topics.items()}
        env |= {
            "CDL_INGEST_GROUP_ID": f"bench-ingest-{uid}",
            "CDL_INGEST_INSTANCE": f"i{i}",
            "CDL_INGEST_METRICS_PORT": str(metrics),
            "CDL_INGEST_GRPC_PORT": str(grpc_port),
            "CDL_INGEST_LOG_LEVEL": "WARNING",
        }
        log = tmp / f"ingest-{n}-{i}.log"
        procs.append((_start("services.ingest", env, log), metrics, log))
        grpc_ports.append(grpc_port)
    try:
        for proc, port, log in procs:
            _ready(port, proc, log)
        wanted = {name: sum(1 for i in range(N) if names[i % len(names)] == name) for name in names}
        with grpc.insecure_channel(f"127.0.0.1:{grpc_ports[0]}") as ch:
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            for name in names:
                spec = ingest_pb2.DatasetSpec(
                    name=name,
                    task=ingest_pb2.TASK_IMAGE_CLASSIFICATION,
                    input_shape=[64],
                    dtype="float32",
                    labels=[str(i) for i in range(10)],
                    policy=ingest_pb2.RetrainPolicy(min_new_records=wanted[name]),
                    holdout_fraction=0.2,
                )
                stub.RegisterDataset(ingest_pb2.RegisterDatasetRequest(spec=spec))
        watcher = Consumer(
            secured({"bootstrap.servers": bootstrap, "group.id": f"bench-w-{uid}", "auto.offset.reset": "earliest"})
        )
        watcher.subscribe([topics["updated"]])
        producer = Producer(secured({"bootstrap.servers": bootstrap, "linger.ms": 5, "compression.type": "lz4"}))
        pids = [p.pid for p, _, _ in procs]
        cpu0, start = _cpu_s(pids), time.perf_counter()
        for key, value in values:
            while True:
                try:
                    producer.produce(topics["raw"], value, key=key)
                    break
                except BufferError:
                    producer.poll(0.01)
        producer.flush()
        totals = dict.fromkeys(names, 0)
        deadline = time.monotonic() + 900
        while any(totals[k] < wanted[k] for k in names):
            if time.monotonic() > deadline:
                raise SystemExit(f"{n} ingest process(es) versioned {totals} of {wanted}")
            msg = watcher.poll(0.2)
            if msg is None or msg.error():
                continue
            done = decode(msg.key(), msg.value(), msg.headers()).payload
            totals[done.dataset] = max(totals.get(done.dataset, 0), done.total_records)  # type: ignore[attr-defined]
        seconds, cpu = time.perf_counter() - start, _cpu_s(pids) - cpu0
        watcher.close()
    finally:
        _stop([p for p, _, _ in procs])
    rate = N / seconds
    console.print(f"ingest x{n}: {rate:,.0f} records/s end to end, {cpu / N * 1000:.3f} CPU s per 1,000 records")
    return rate, cpu / N * 1000


def run(state: dict[str, Any], console: Any) -> list[str]:
    """Ingest with 1 and with 2 instances on the private stack ``state``; the RESULT line."""
    rates = {n: _measure(state, n, console)[0] for n in COUNTS}
    return [result("ingest_2_vs_1", rates[2], rates[1], op=">=", goal=0.0, unit="records/s")]
