"""bench/scale: what a second instance buys on this machine, and whether the monitor keeps up.

One private stack (Kafka, MinIO, one Triton). Parts, each skippable with
``CDL_BENCH_SCALE_PARTS`` (a comma list of ``gateway,monitor,ingest,ddp``; all by default):

1. **gateway**: the gateway's saturated rate, batch-1 Open Inference Protocol requests in a
   closed loop at concurrency 16 for ``CDL_BENCH_SCALE_SECONDS`` (10 s) through
   ``python -m services.gateway`` with every request logged (as bench/gateway.py does): the
   baseline of the monitor's goal.
2. **monitor**: ``CDL_BENCH_SCALE_EVENTS`` (300,000) answered requests of three models (one per
   partition; one digits image each) are written to their log by the gateway's own log writer in
   rounds of 600 (what it gathers in 200 ms at about 3,000 req/s); then 1, and then 2
   (``CDL_BENCH_SCALE_MONITORS``), monitor processes (one Faust app, one group) read it:
   requests/s from when every process is ready to the last request counted
   (``cdl_monitor_events_total``) and the processes' CPU seconds per 1,000 requests. First, 40,000
   requests with a record each (the log before ``log_batch``), then as the gateway logs by
   default (``InferenceLoggedBatch`` records of up to 256 requests of a model version).
3. **ingest**: ``bench/scale_ingest.py`` (records/s and CPU per 1,000 records of 1 vs 2 ingest
   instances, each owning the datasets of its ``data.raw`` partitions).
4. **ddp**: ``bench/scale_ddp.py`` (samples/s of a two-process torchrun training against one).

On 2 cores two processes share the cores the one had: their rate can be at most about twice
the one's when a single process used one core, less where Kafka and MinIO need the rest. So
CPU per record is printed beside every rate.

``RESULT monitor_vs_gateway_rate value=<requests/s the monitor sustains (its best process
count)> baseline=<the gateway's saturated req/s> goal=>=1.0``, and, for the record,
``RESULT monitor_batch_vs_single``, ``RESULT monitor_2_vs_1`` and the ingest and DDP lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from rich.console import Console
from rich.progress import Progress

from bench._common import closed_loop, machine, private_stack, result
from tests.helpers import metric_value

ROOT = Path(__file__).resolve().parent.parent
PARTS = {p.strip() for p in os.environ.get("CDL_BENCH_SCALE_PARTS", "gateway,monitor,ingest,ddp").split(",")}
SECONDS = float(os.environ.get("CDL_BENCH_SCALE_SECONDS", "10"))
EVENTS = int(os.environ.get("CDL_BENCH_SCALE_EVENTS", "300000"))
#: requests logged a record each (the log before log_batch: slower, so fewer)
SINGLE_EVENTS = 40_000
MONITORS = tuple(int(n) for n in os.environ.get("CDL_BENCH_SCALE_MONITORS", "1,2").split(","))
CONCURRENCY = 16
#: requests the gateway's log writes in one round (log_linger_ms 200 ms at about 3,000 req/s)
ROUND = 600
#: the gateway's default log_batch (services/gateway/settings.py)
LOG_BATCH = 256


def _ready(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"not ready: {log.read_text()[-3000:]}")
        time.sleep(0.2)


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes used so far (their threads included)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _start(module: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", module], env=env, cwd=ROOT, stdout=out, stderr=out)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


# ---------------------------------------------------------------------------------- gateway
def gateway_rate(state: dict[str, Any], console: Console) -> float:
    """The gateway's saturated req/s (closed loop, concurrency 16), every request logged."""
    from bench.gateway import KEY, MODEL, N_IN, N_OUT, _deployed, _request, _wait_http
    from cdl.auth import hash_key
    from cdl.events import Event
    from cdl.kafka import Producer, ensure_topics
    from cdl.v1 import events_pb2
    from cdl_tools.stack import stack_store
    from cdl_tools.stack._procs import free_port
    from tests.models import write_affine

    bootstrap, store, tmp = state["kafka"]["bootstrap"], stack_store(state), Path(state["state_dir"])
    uid = uuid.uuid4().hex[:6]
    topics = {k: f"bench.gw.{k}.{uid}" for k in ("compressed", "deployed", "logged", "deadletter", "health")}
    ensure_topics(bootstrap, {t: 3 if k in ("logged",) else 1 for k, t in topics.items()})
    port, metrics = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), CDL_STATE_DIR=str(tmp), CDL_INSECURE="true")
    env |= {f"CDL_GATEWAY_{k.upper()}_TOPIC": v for k, v in topics.items()}
    env |= {
        "CDL_GATEWAY_GROUP_ID": f"bench-gw-{uid}",
        "CDL_GATEWAY_GRPC_PORT": str(port),
        "CDL_GATEWAY_HTTP_PORT": str(free_port()),
        "CDL_GATEWAY_METRICS_PORT": str(metrics),
        "CDL_GATEWAY_API_KEY_HASHES": json.dumps([hash_key(KEY)]),
        "CDL_GATEWAY_CANARY_STEPS": "[1.0]",
        "CDL_GATEWAY_MIN_SAMPLES": "1",
        "CDL_GATEWAY_STEP_MIN_S": "0.2",
        "CDL_GATEWAY_WARMUP_REQUESTS": "2",
    }
    proc = _start("services.gateway", env, tmp / "gateway.log")
    try:
        _wait_http(f"http://127.0.0.1:{metrics}/healthz")
        w = np.random.default_rng(1).normal(size=(N_IN, N_OUT)).astype(np.float32)
        write_affine(store, MODEL, 1, w, np.zeros(N_OUT, dtype=np.float32))
        producer = Producer(bootstrap)
        msg = events_pb2.ModelCompressed(model=MODEL, version=1, ok=True, chosen_variant="fp32")
        producer.send(topics["compressed"], Event(msg, source="/cdl/bench", key=MODEL))
        producer.flush()
        deadline = time.monotonic() + 120
        while not any(
            d.version == 1 and d.state == events_pb2.ROLLOUT_STATE_PROMOTED
            for _, d in _deployed(bootstrap, topics["deployed"])
        ):
            if time.monotonic() > deadline:
                raise SystemExit(f"v1 never promoted: {(tmp / 'gateway.log').read_text()[-3000:]}")
            time.sleep(0.3)
        metadata = (("authorization", f"Bearer {KEY}"),)
        rates = []
        for _ in range(2):  # the first round warms the lane and Triton; the better one counts
            rates.append(asyncio.run(closed_loop(f"127.0.0.1:{port}", _request(), metadata, SECONDS, CONCURRENCY)))
        console.print(f"gateway: saturated {', '.join(f'{r:,.0f}' for r in rates)} req/s (concurrency {CONCURRENCY})")
        return max(rates)
    finally:
        _stop([proc])


# ---------------------------------------------------------------------------------- monitor
def _log_items(n: int, models: list[str]) -> list[Any]:
    """``n`` answered requests, as the gateway offers them to its log (one digits image each,
    answered right), spread over ``models`` in turn."""
    from sklearn.datasets import load_digits

    from cdl.v1 import open_inference_pb2 as pb

    digits = load_digits()
    x = digits.data.astype(np.float32)
    rng = np.random.default_rng(0)
    items: list[Any] = []
    for k, i in enumerate(rng.choice(len(x), n)):
        model, rid = models[k % len(models)], uuid.uuid4().hex
        req = pb.ModelInferRequest(model_name=model, id=rid)
        inp = req.inputs.add()
        inp.name, inp.datatype = "input", "FP32"
        inp.shape.extend([1, 64])
        req.raw_input_contents.append(np.asarray(x[i], "<f4").tobytes())
        resp = pb.ModelInferResponse(model_name=model, model_version="1", id=rid)
        logits = np.zeros((1, 10), "<f4")
        logits[0, int(digits.target[i])] = 5.0
        resp.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
        resp.raw_output_contents.append(logits.tobytes())
        items.append((model, 1, rid, req.SerializeToString(), resp.SerializeToString(), 0.001, "OK", time.time()))
    return items


def _write_log(bootstrap: str, topic: str, items: list[Any], per_batch: int) -> None:
    """The requests written by the gateway's own log writer
    (``services.gateway.inference_log.RecordWriter``) in rounds of ``ROUND`` (what the gateway
    gathers in a ``log_linger_ms`` of 200 ms at about 3,000 req/s): with ``per_batch`` 1 a record
    per request, else ``InferenceLoggedBatch`` records of that many at most."""
    from cdl.kafka import Producer
    from services.gateway.inference_log import RecordWriter

    producer = Producer(bootstrap)
    writer = RecordWriter(producer, topic, "/cdl/bench/scale", 4096, per_batch)
    for i in range(0, len(items), ROUND):
        writer.write(items[i : i + ROUND])
    producer.flush()


def _models(prefix: str, partitions: int) -> list[str]:
    """A model name for each partition of a topic (librdkafka's partitioner on the name as key:
    the gateway keys a batch by model), so that the log's batches spread over them all."""
    from services.ingest.partitions import home_partition

    names: dict[int, str] = {}
    i = 0
    while len(names) < partitions:
        name = f"{prefix}{i}"
        names.setdefault(home_partition(name, partitions), name)
        i += 1
    return [names[p] for p in range(partitions)]


def monitor_rates(
    state: dict[str, Any], console: Console, counts: tuple[int, ...] = (1, 2), per_batch: int = 256
) -> dict[int, float]:
    """Requests/s of ``n`` monitor processes (started first, ready, then the log written), for
    each n; three models, one per partition of inference.logged."""
    from cdl.kafka import ensure_topics
    from cdl.ml.drift import reference_sample, to_npy
    from cdl_tools.stack import stack_store
    from cdl_tools.stack._procs import free_port

    bootstrap, store, tmp = state["kafka"]["bootstrap"], stack_store(state), Path(state["state_dir"])
    uid = uuid.uuid4().hex[:6]
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)
    models = _models(f"scale{uid}m", 3)
    lineage = {"dataset": "digits", "labels": [str(i) for i in range(10)], "task": "image_classification"}
    reference = to_npy(reference_sample(x, 2000, seed=0))
    for model in models:
        store.put_json("cdl-models", f"{model}/1/lineage.json", lineage)
        store.put_bytes("cdl-models", f"{model}/1/reference.npy", reference)
    events = EVENTS if per_batch > 1 else SINGLE_EVENTS
    items = _log_items(events, models)
    form = "a record per request" if per_batch == 1 else f"batches of up to {per_batch} requests"
    rates: dict[int, float] = {}
    for n in counts:
        topics = {k: f"bench.mon.{k}.{uid}.{n}" for k in ("logged", "feedback", "health", "drift", "raw")}
        ensure_topics(bootstrap, dict.fromkeys(topics.values(), 3))
        t0 = time.perf_counter()
        _write_log(bootstrap, topics["logged"], items, per_batch)
        console.print(f"monitor: {events:,} requests logged ({form}) in {time.perf_counter() - t0:.1f} s")
        group = f"bench-monitor-{uid}-{n}"
        procs, ports = [], []
        for i in range(n):
            port = free_port()
            env = dict(os.environ, PYTHONPATH=str(ROOT), CDL_STATE_DIR=str(tmp / f"mon-{uid}-{n}-{i}"))
            env |= {f"CDL_MONITOR_{k.upper()}_TOPIC": t for k, t in topics.items()}
            env |= {
                "CDL_MONITOR_GROUP_ID": group,
                "CDL_MONITOR_METRICS_PORT": str(port),
                "CDL_MONITOR_TRAINING_RECORDS": "false",
                "CDL_INSECURE": "true",
            }
            procs.append(_start("services.monitor", env, tmp / f"monitor-{uid}-{n}-{i}.log"))
            ports.append(port)
        try:
            for p, port, i in zip(procs, ports, range(n), strict=True):
                _ready(port, p, tmp / f"monitor-{uid}-{n}-{i}.log")

            def done(
                ports: list[int] = ports,
                logged: str = topics["logged"],
                procs: list[subprocess.Popen[bytes]] = procs,
                logs: tuple[Path, ...] = tuple(tmp / f"monitor-{uid}-{n}-{i}.log" for i in range(n)),
            ) -> float:
                for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
                    if p.poll() is not None:  # (its metrics are gone: say why)
                        raise SystemExit(f"monitor {i} exited ({p.returncode}): {log.read_text()[-3000:]}")
                return sum(
                    metric_value(f"http://127.0.0.1:{port}/metrics", "cdl_monitor_events_total", topic=logged)
                    for port in ports
                )

            # the clock runs from when every process is ready (what was done before by the first
            # ones does not count) to the last request counted
            start, count0, cpu0 = time.perf_counter(), done(), _cpu_s([p.pid for p in procs])
            with Progress(transient=True, console=console) as progress:
                task = progress.add_task(f"{n} monitor process(es)", total=events)
                deadline = time.monotonic() + 900
                while (count := done()) < events:
                    progress.update(task, completed=count)
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{n} monitors processed {count} of {events}")
                    time.sleep(0.1)
                seconds = time.perf_counter() - start
                cpu = _cpu_s([p.pid for p in procs]) - cpu0
            if events - count0 < events / 2:
                raise SystemExit(f"{n} monitors had done {count0:.0f} of {events} before all were ready")
            rate = (events - count0) / seconds
            rates[n] = rate
            console.print(
                f"monitor x{n} ({form}): {rate:,.0f} requests/s, {cpu / (events - count0) * 1000:.3f} CPU s per 1,000"
            )
        finally:
            _stop(procs)
    return rates


def main() -> None:
    console = Console()
    console.print(f"machine: {machine()}; parts {sorted(PARTS)}")
    lines: list[str] = []
    with private_stack(triton_servers=1 if "gateway" in PARTS else 0) as state:
        gateway = gateway_rate(state, console) if "gateway" in PARTS else 0.0
        if "monitor" in PARTS:
            single = monitor_rates(state, console, (1,), per_batch=1)  # the log before log_batch
            rates = monitor_rates(state, console, MONITORS, per_batch=LOG_BATCH)
            if 1 in rates:
                lines.append(result("monitor_batch_vs_single", rates[1], single[1], op=">=", goal=0.0, unit="req/s"))
            if 2 in rates and 1 in rates:
                lines.append(result("monitor_2_vs_1", rates[2], rates[1], op=">=", goal=0.0, unit="req/s"))
            if gateway:
                best = max(rates.values())
                lines.append(result("monitor_vs_gateway_rate", best, gateway, op=">=", goal=1.0, unit="req/s"))
        if "ingest" in PARTS:
            from bench.scale_ingest import run as ingest

            lines += ingest(state, console)
    if "ddp" in PARTS:  # after the stack is down: the cores are the training's
        from bench.scale_ddp import run as ddp

        lines += ddp(console)
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
