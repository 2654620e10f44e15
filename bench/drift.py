"""bench/drift: does the monitor see an input shift soon, and never one that is not there?

A private stack (Kafka, MinIO) and the monitor service as a real process. The
model version under watch is the demo's: a reference sample of the digits
training split, stored as the trainer stores it (``reference.npy``, 2,000 rows
at most, the trainer's seed). Served requests are what the gateway logs for the
demo's model: ``InferenceLogged`` records holding the request (one 8x8 image,
64 floats), drawn at random from the digits images the model was not trained on
(the 20% outside its training split: the same population, unseen inputs).

1. Throughput: 20,000 records produced as fast as the producer can, against the
   time the monitor takes to have processed all of them (its
   ``cdl_monitor_events_total``), each rate in events/s; the same producer alone
   into a scratch topic is the baseline.
2. False alarms: those 20,000 unshifted requests, one model version: every
   ``drift.detected`` is a false alarm (goal: none).
3. Detection delay: for each shift (inverted images, a quarter turn, Gaussian
   noise of sd 4 clipped to 0..16) a fresh model version with the same reference
   serves 1,250 unshifted requests, then shifted ones in chunks of 10, each
   chunk waited for; the delay is the number of shifted requests sent when the
   alert is first seen (the worst of the shifts is the RESULT; goal <= 500).

Prints ``RESULT monitor_throughput`` (not a goal of the issue: for the record),
``RESULT drift_false_alarms`` and, last, ``RESULT drift_detection_delay``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from rich.progress import Progress

from bench._common import assign_all, machine, private_stack, result

UNSHIFTED = int(os.environ.get("CDL_BENCH_DRIFT_REQUESTS", "20000"))
BEFORE_SHIFT = 1250
MAX_SHIFTED = 2000
CHUNK = 10


def _shifts(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "inverted": lambda x: 16.0 - x,
        "quarter turn": lambda x: np.rot90(x.reshape(-1, 8, 8), 1, axes=(1, 2)).reshape(len(x), 64),
        "noise sd 4": lambda x: np.clip(x + rng.normal(0.0, 4.0, x.shape), 0.0, 16.0),
    }


class Feed:
    """Encodes and produces InferenceLogged records as the gateway would."""

    def __init__(self, bootstrap: str, topic: str, model: str) -> None:
        from cdl.kafka import Producer

        self.producer = Producer(bootstrap)
        self.topic, self.model = topic, model
        self.sent = 0

    def encode(self, version: int, rows: np.ndarray, preds: np.ndarray) -> list[tuple[bytes, bytes, list[Any]]]:
        from cdl.events import Event, encode
        from cdl.v1 import events_pb2
        from cdl.v1 import open_inference_pb2 as pb

        out = []
        for row, pred in zip(rows, preds, strict=True):
            rid = uuid.uuid4().hex
            req = pb.ModelInferRequest(model_name=self.model, id=rid)
            inp = req.inputs.add()
            inp.name, inp.datatype = "input", "FP32"
            inp.shape.extend([1, 64])
            req.raw_input_contents.append(np.asarray(row, "<f4").tobytes())
            rec = events_pb2.InferenceLogged(
                request_id=rid,
                model=self.model,
                version=version,
                inputs_sample=req.SerializeToString(),
                predicted_labels=[str(int(pred))],
                latency_ms=1.0,
                status="OK",
            )
            key, value, headers = encode(Event(rec, source="/cdl/bench/drift", key=rid))
            out.append((key or b"", value, headers))
        return out

    def send(self, records: list[tuple[bytes, bytes, list[Any]]], topic: str | None = None) -> None:
        for key, value, headers in records:
            self.producer.send_raw(topic or self.topic, value, key, headers)
        self.producer.flush()
        if topic is None:
            self.sent += len(records)


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _processed(port: int, topic: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("cdl_monitor_events_total{") and f'topic="{topic}"' in line
    )


def _wait_processed(port: int, topic: str, n: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while _processed(port, topic) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"the monitor processed {_processed(port, topic)} of {n} in {timeout_s} s")
        time.sleep(0.05)


class Alerts:
    def __init__(self, bootstrap: str, topic: str) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer

        from cdl.kafka.security import secured

        self._c = Consumer(
            secured({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}", "log_level": 0})
        )
        assign_all(self._c, topic, OFFSET_BEGINNING)
        self.seen: list[Any] = []

    def poll(self) -> list[Any]:
        from cdl.events import decode

        while msgs := self._c.consume(100, timeout=0.2):
            for m in msgs:
                if m.error() is None:
                    self.seen.append(decode(m.key(), m.value(), list(m.headers() or [])).payload)
        return self.seen


def main() -> None:
    from sklearn.datasets import load_digits

    from cdl.kafka import ensure_topics
    from cdl.ml.drift import reference_sample, to_npy
    from cdl_tools.stack import stack_store
    from cdl_tools.stack._procs import free_port

    print(f"machine: {machine()}")
    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    cut = int(0.8 * len(x))
    train, held = order[:cut], order[cut:]  # the training split (the reference) and unseen images
    with private_stack(triton_servers=0) as state:
        boot = state["kafka"]["bootstrap"]
        store = stack_store(state)
        uid = uuid.uuid4().hex[:6]
        topics = {k: f"bench.{k}.{uid}" for k in ("logged", "feedback", "health", "drift", "raw", "scratch")}
        ensure_topics(boot, {t: 3 if k in ("logged", "raw", "scratch") else 1 for k, t in topics.items()})
        model = "digits"
        reference = to_npy(reference_sample(x[train], 2000, seed=0))
        versions = 1 + len(_shifts(rng))
        for v in range(1, versions + 1):
            lineage = {"dataset": "digits", "labels": [str(i) for i in range(10)], "task": "image_classification"}
            store.put_json("cdl-models", f"{model}/{v}/lineage.json", lineage)
            store.put_bytes("cdl-models", f"{model}/{v}/reference.npy", reference)
        port = free_port()
        env = dict(os.environ, CDL_STATE_DIR=state["state_dir"], CDL_MONITOR_METRICS_PORT=str(port))
        env |= {f"CDL_MONITOR_{k.upper()}_TOPIC": t for k, t in topics.items() if k != "scratch"}
        env |= {"CDL_MONITOR_GROUP_ID": f"bench-monitor-{uid}", "CDL_MONITOR_TRAINING_RECORDS": "false"}
        root = Path(__file__).resolve().parent.parent
        log_path = Path(state["state_dir"]) / "monitor.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.monitor"], env=env, cwd=root, stdout=log, stderr=log
            )
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"monitor not ready: {log_path.read_text()[-2000:]}")
                time.sleep(0.3)
            feed = Feed(boot, topics["logged"], model)
            alerts = Alerts(boot, topics["drift"])

            # 1 + 2: throughput and false alarms on the unshifted stream (version 1)
            idx = rng.choice(held, UNSHIFTED)
            records = feed.encode(1, x[idx], y[idx])
            t0 = time.perf_counter()
            feed.send(records, topic=topics["scratch"])
            producer_s = time.perf_counter() - t0
            # the monitor's first sight of a version loads and calibrates its test: not throughput
            feed.send(feed.encode(1, x[idx[:1]], y[idx[:1]]))
            _wait_processed(port, topics["logged"], 1, 120)
            t0 = time.perf_counter()
            feed.send(records)
            with Progress(transient=True) as progress:
                task = progress.add_task("monitor", total=UNSHIFTED)
                while (done := _processed(port, topics["logged"]) - 1) < UNSHIFTED:
                    progress.update(task, completed=done)
                    time.sleep(0.2)
            monitor_s = time.perf_counter() - t0
            producer_rate, monitor_rate = UNSHIFTED / producer_s, UNSHIFTED / monitor_s
            time.sleep(1.0)
            false_alarms = len([a for a in alerts.poll() if a.version == 1])
            tests = _metric(port, "cdl_monitor_drift_tests_total")
            print(
                f"unshifted: {UNSHIFTED} requests, {tests:.0f} drift tests, {false_alarms} alarms; "
                f"producer alone {producer_rate:,.0f}/s, monitor {monitor_rate:,.0f}/s"
            )

            # 3: detection delay per shift (a fresh version each: an alert is once per version)
            delays: dict[str, int] = {}
            for v, (name, shift) in enumerate(_shifts(rng).items(), start=2):
                before = rng.choice(held, BEFORE_SHIFT)
                feed.send(feed.encode(v, x[before], y[before]))
                _wait_processed(port, topics["logged"], feed.sent)
                early = [a for a in alerts.poll() if a.version == v]
                sent = 0
                while not early and sent < MAX_SHIFTED:
                    j = rng.choice(held, CHUNK)
                    feed.send(feed.encode(v, shift(x[j]).astype(np.float32), y[j]))
                    sent += CHUNK
                    _wait_processed(port, topics["logged"], feed.sent)
                    time.sleep(0.02)
                    early = [a for a in alerts.poll() if a.version == v]
                delays[name] = sent if early else MAX_SHIFTED * 10
                stat = f"statistic {early[0].statistic:.4f} > {early[0].threshold:.4f}" if early else "never"
                print(f"shift {name!r}: drift.detected after {sent} shifted requests ({stat})")
        finally:
            proc.terminate()
            proc.wait(30)
    print(result("monitor_throughput", monitor_rate, producer_rate, op=">=", goal=0.0, unit="events/s"))
    print(result("drift_false_alarms", false_alarms, 1, op="<=", goal=0))
    worst = max(delays, key=lambda k: delays[k])
    print(f"(worst shift: {worst})")
    print(result("drift_detection_delay", delays[worst], 500, op="<=", goal=1.0, unit="requests"))


if __name__ == "__main__":
    main()
