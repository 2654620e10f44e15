"""Shared by bench/fmnist and bench/bbc: the whole loop on a stack of the benchmark's own, at
the settings `cdl stack up` starts it with (all six services, two tuner workers), driven as a
user drives it, with a live view.

- the dataset is registered with the `cdl` command line;
- the records go to ``data.raw`` from a plain Kafka producer (any client, kcat included, does
  the same), and the time of the last acknowledgement is kept;
- while the loop works, a live view shows the dataset versions, the training's epochs (the
  trainer's ``training.json``), studies, compression and rollout, and the gateway is asked for
  the model every quarter second until it answers;
- where the time went from the last acknowledgement to that first answer, by hop, from the
  events' Kafka timestamps, and the CPU each component used meanwhile;
- the held-out inputs are scored through the gateway, as served.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench._common import cpu_report, cpu_usage, machine
from tests.corpora import GatewayScorer

#: service settings a user may have exported: the benchmarks measure the defaults, so they are named
SERVICE_PREFIXES = ("CDL_INGEST_", "CDL_TRAINER_", "CDL_TUNER_", "CDL_COMPRESSOR_", "CDL_GATEWAY_", "CDL_MONITOR_")


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every core, ``/proc/stat``)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def non_default_settings() -> list[str]:
    """``CDL_<SERVICE>_…`` variables set in this environment (the services would read them)."""
    return sorted(k for k in os.environ if k.startswith(SERVICE_PREFIXES) or k == "CDL_STACK_SERVICES")


def preamble(console: Console) -> None:
    """The machine, and whether the services will run at their defaults."""
    console.print(f"machine: {machine()}")
    changed = non_default_settings()
    console.print(f"service settings changed by the environment: {', '.join(changed) or 'none (defaults)'}")


@dataclass
class Served:
    """When the first answer came, from which version, and the loop's events up to then."""

    version: str
    last_ack: float
    answered: float
    hops: list[tuple[str, float]] = field(default_factory=list)
    trained: Any = None
    cpu: str = ""

    @property
    def seconds(self) -> float:
        return self.answered - self.last_ack


@dataclass
class Outcome:
    """A run of the loop: v1's first answer, the accuracy as served then and at the end."""

    served: Served
    first: float
    accuracy: float
    versions: set[str]
    followed: str
    view: Any


class Traffic:
    """Client requests at ``rate`` a second through the gateway, one row of ``x`` each (no
    labels), in a thread: the production traffic a canary needs to step up (the gateway's
    ``min_samples`` candidate answers per step)."""

    def __init__(self, endpoint: str, api_key: str, model: str, x: Any, rate: float = 20.0) -> None:
        import threading

        self._scorer = GatewayScorer(endpoint, api_key, model)
        self._x, self._rate = x, rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-traffic", daemon=True)
        self.sent = self.failed = 0

    def _run(self) -> None:
        from tritonclient.utils import InferenceServerException

        next_at = time.monotonic()
        while not self._stop.is_set():
            i = self.sent % len(self._x)
            try:
                self._scorer.predict(self._x[i : i + 1])
            except InferenceServerException:
                self.failed += 1
            self.sent += 1
            next_at += 1.0 / self._rate
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._scorer.close()


class CorpusLoop:
    """A private stack with the whole loop; ``with CorpusLoop(console, "fmnist") as loop: ...``."""

    def __init__(self, console: Console, model: str) -> None:
        self.console, self.model = console, model
        self._tmp = tempfile.TemporaryDirectory(prefix=f"cdl-bench-{model}-")
        self.state_dir = Path(self._tmp.name) / "stack"
        self.state: dict[str, Any] = {}
        self.stack: Any = None
        self.events: Any = None
        self.store: Any = None

    # ------------------------------------------------------------------ stack
    def __enter__(self) -> CorpusLoop:
        from cdl_tools.report import LoopEvents
        from cdl_tools.settings import StackSettings
        from cdl_tools.stack import LocalStack, stack_store

        self.stack = LocalStack(  # plaintext: comparable with earlier runs (bench/secure measures SASL_SSL)
            StackSettings(state_dir=self.state_dir, kafka_security="plaintext", minio_tls=False)
        )
        try:
            with self.console.status("starting the stack") as status:
                self.state = self.stack.up(lambda c, p, d: status.update(f"starting the stack: {c} {p} {d}"))
        except BaseException:
            self.stack.down(purge=True)
            self._tmp.cleanup()
            raise
        started = ", ".join(sorted(self.state.get("services", {})))
        self.console.print(f"stack up in {self.state_dir} (services: {started})")
        self.store = stack_store(self.state)
        self.events = LoopEvents(self.bootstrap, self.model)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if self.events is not None:
                self.events.close()
            with self.console.status("stopping the stack"):
                self.stack.down(purge=True)
        finally:
            self._tmp.cleanup()

    @property
    def bootstrap(self) -> str:
        return str(self.state["kafka"]["bootstrap"])

    def cdl(self, *args: str) -> str:
        """The `cdl` command line against this stack; its output (a failure stops the benchmark)."""
        env = dict(os.environ, CDL_STATE_DIR=str(self.state_dir), COLUMNS="200")
        done = subprocess.run(
            [sys.executable, "-m", "cdl_tools.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"cdl {' '.join(args[:3])} failed: {done.stdout}{done.stderr}")
        return done.stdout.strip()

    # ------------------------------------------------------------------ data
    def produce(self, records: Sequence[bytes] | Any, count: int) -> float:
        """Send ``count`` records to data.raw; the time Kafka acknowledged the last of them."""
        from confluent_kafka import Producer

        from cdl.kafka.security import secured

        producer = Producer(secured({"bootstrap.servers": self.bootstrap, "linger.ms": 20, "log_level": 0}))
        acked, failed = [0], [0]
        last = [0.0]

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failed[0] += 1
            else:
                acked[0] += 1
                last[0] = time.time()

        progress = Progress(
            TextColumn(f"producing {self.model} to data.raw"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        with progress:
            task = progress.add_task("produce", total=count)
            for i, value in enumerate(records):
                while True:
                    try:
                        producer.produce("data.raw", value, on_delivery=delivered)
                        break
                    except BufferError:
                        producer.poll(0.1)
                if i % 500 == 0:
                    producer.poll(0)
                    progress.update(task, completed=acked[0])
            while producer.flush(1.0):
                progress.update(task, completed=acked[0])
            progress.update(task, completed=acked[0])
        if failed[0] or acked[0] != count:
            raise SystemExit(f"{failed[0]} records failed, {acked[0]} of {count} acknowledged")
        return last[0]

    # ------------------------------------------------------------------ waiting
    def _procs(self) -> dict[str, int]:
        return {name: int(p["pid"]) for name, p in self.stack.read_state().get("procs", {}).items()}

    def _training(self) -> dict[str, Any]:
        from cdl.registry import MODELS_BUCKET

        try:
            doc: dict[str, Any] = self.store.get_json(MODELS_BUCKET, f"{self.model}/training.json")
            return doc
        except Exception:  # noqa: BLE001 - no training yet
            return {}

    def _view(self, since: float, view: Any, training: dict[str, Any], what: str = "the last record") -> Table:
        t = Table(title=f"{self.model}: the loop at work, {time.time() - since:.0f} s after {what}")
        t.add_column("stage")
        t.add_column("state")
        versions = ", ".join(f"v{u.version} ({u.total_records:,} records)" for _, u in view.versions)
        t.add_row("ingest", versions or "versioning…")
        if training:
            score = training.get("val_score", training.get("val_accuracy", float("nan")))
            t.add_row(
                "trainer",
                f"v{training.get('version')}: epoch {training.get('epoch')}/{training.get('epochs')} on "
                f"{training.get('samples', 0):,} samples, {training.get('samples_per_s', 0):,.0f} samples/s, "
                f"train loss {training.get('train_loss', 0):.4f}, validation {score:.4f}",
            )
        for mv, (_, tr) in sorted(view.trained.items()):
            t.add_row(
                f"model v{mv}",
                f"trained ({tr.reason or 'verdict ' + str(tr.verdict)}), holdout "
                f"{tr.metrics.get('holdout_accuracy', float('nan')):.4f} in {tr.lineage.duration_s:.0f} s",
            )
        for mv, (_, c) in sorted(view.compressed.items()):
            t.add_row(f"compressed v{mv}", f"chosen {c.chosen_variant}" if c.ok else f"failed: {c.reason}")
        for _, d in view.deployed[-3:]:
            t.add_row(f"gateway v{d.version}", f"{STATE_NAMES.get(d.state, d.state)} {d.reason}")
        t.add_row("tuner", f"{len(view.tunings)} studies completed")
        return t

    def wait_served(self, probe: Any, last_ack: float, timeout_s: float) -> Served:
        """Ask the gateway for the model until it answers (the view live meanwhile)."""
        from tritonclient.utils import InferenceServerException

        scorer = GatewayScorer(self.state["services"]["gateway"]["grpc"], self.state["api_key"], self.model)
        cpu0, busy0, mine0 = cpu_usage(self._procs()), machine_busy_s(), time.process_time()
        deadline = time.monotonic() + timeout_s
        view, training, read_at = self.events.view(), {}, 0.0
        try:
            with Live(self._view(last_ack, view, training), console=self.console, refresh_per_second=1) as live:
                while True:
                    self.events.poll(0.25)
                    try:
                        version = scorer.wait(probe, timeout_s=0)
                        answered = time.time()
                        break
                    except InferenceServerException:
                        pass
                    if time.monotonic() > deadline:
                        raise SystemExit(f"no version of {self.model} answered within {timeout_s:.0f} s")
                    if time.monotonic() - read_at > 2:
                        view, training, read_at = self.events.view(), self._training(), time.monotonic()
                        live.update(self._view(last_ack, view, training))
        finally:
            scorer.close()
        cpu1 = cpu_usage(self._procs())
        stack_s = sum(c for c, _ in cpu1.values()) - sum(c for c, _ in cpu0.values())
        mine = time.process_time() - mine0
        others = machine_busy_s() - busy0 - stack_s - mine
        cpu = f"{cpu_report(cpu0, cpu1)}; this benchmark {mine:.2f}s; other processes on the machine {others:.2f}s"
        self.events.poll(1.0)
        view = self.events.view(self.store)
        return Served(version, last_ack, answered, self._hops(view, last_ack, answered), view.trained.get(1), cpu)

    @staticmethod
    def _hops(view: Any, last_ack: float, answered: float) -> list[tuple[str, float]]:
        """Where the seconds from the last record to the first answer went, by hop."""
        out: list[tuple[str, float]] = []
        cut = view.versions[0][0] if view.versions else None
        trained = view.trained.get(1)
        compressed = view.compressed.get(1)
        if cut is None or trained is None or compressed is None:
            return out
        train_s, compress_s = trained[1].lineage.duration_s, view.compress_s.get(1, 0.0)
        out.append(("ingest: last record -> data.updated (version cut)", cut - last_ack))
        out.append(("trainer: data.updated -> model.trained", trained[0] - cut))
        out.append(("  of which the training (load, fit, gate)", train_s))
        out.append(("compressor: model.trained -> model.compressed", compressed[0] - trained[0]))
        out.append(("  of which the compression (export, variants, measures)", compress_s))
        loaded = [ts for ts, d in view.deployed if d.version == 1]
        if loaded:
            out.append(("gateway: model.compressed -> first rollout event", min(loaded) - compressed[0]))
            out.append(("gateway: first rollout event -> first answer", answered - min(loaded)))
        else:
            out.append(("gateway: model.compressed -> first answer", answered - compressed[0]))
        return out

    def print_served(self, served: Served) -> None:
        t = Table(
            title=f"{self.model}: last record acknowledged -> v{served.version} answering: {served.seconds:.1f} s"
        )
        t.add_column("hop")
        t.add_column("seconds", justify="right")
        for name, seconds in served.hops:
            t.add_row(name, f"{seconds:.1f}")
        self.console.print(t)
        self.console.print(f"CPU meanwhile: {served.cpu}", soft_wrap=True)

    def follow(self, x: Any, timeout_s: float, grace_s: float = 300.0) -> str:
        """After v1: wait (at most ``timeout_s``) for the first study to complete and for the
        version trained on its parameters to finish its rollout, with client traffic (rows of
        ``x``, :class:`Traffic`) while it is rolled out. Returns what happened, in words;
        whatever it was, the gateway then serves what a user would get."""
        if timeout_s <= 0:
            return "not followed (timeout 0)"
        traffic: Traffic | None = None
        try:
            outcome = ""
            with Live(console=self.console, refresh_per_second=1) as live:
                deadline, start = time.monotonic() + timeout_s, time.time()
                while not outcome and time.monotonic() < deadline:
                    self.events.poll(1.0)
                    view = self.events.view()
                    live.update(self._view(start, view, self._training(), "v1 answered"))
                    outcome, rolling = self._followed(view, start, grace_s)
                    if rolling and traffic is None:
                        endpoint = self.state["services"]["gateway"]["grpc"]
                        traffic = Traffic(endpoint, self.state["api_key"], self.model, x).start()
            if traffic is not None:
                outcome += f" (client traffic meanwhile: {traffic.sent} requests, {traffic.failed} failed)"
            return outcome or f"no study completed and rolled out within {timeout_s:.0f} s"
        finally:
            if traffic is not None:
                traffic.stop()

    @staticmethod
    def _followed(view: Any, start: float, grace_s: float) -> tuple[str, bool]:
        """(what the first study came to, "" while it is not over; whether its version is being rolled out)."""
        from cdl.v1 import events_pb2

        if not view.tunings:
            return "", False
        studied_at, study = view.tunings[0]
        about = (
            f"study {study.study} ({study.reason}) completed {studied_at - start:.0f} s after v1 answered: "
            f"{study.trials} trials ({study.pruned_trials} pruned, {study.trial_epochs} trial-epochs), "
            f"best validation {study.best_value:.4f} with "
            + ", ".join(f"{k}={v}" for k, v in sorted(study.best_params.items()))
        )
        tuned = {
            mv: tr for mv, (_, tr) in view.trained.items() if tr.lineage.hyperparameters_source.startswith("tuning")
        }
        if not tuned:
            late = time.time() - studied_at > grace_s
            return (f"{about}; no version on its parameters in {grace_s:.0f} s" if late else ""), False
        mv = min(tuned)
        tr = tuned[mv]
        trained = (
            f"v{mv} on its parameters: {int(tr.metrics.get('epochs', 0))} epochs "
            f"in {tr.lineage.duration_s:.0f} s, holdout {tr.metrics.get('holdout_accuracy', float('nan')):.4f}"
        )
        if tr.verdict != events_pb2.VERDICT_ACCEPTED:
            return f"{about}; {trained}, rejected: {tr.reason}", False
        done = (
            events_pb2.ROLLOUT_STATE_PROMOTED,
            events_pb2.ROLLOUT_STATE_ROLLED_BACK,
            events_pb2.ROLLOUT_STATE_FAILED,
        )
        ends = [(ts, d) for ts, d in view.deployed if d.version == mv and d.state in done]
        if ends:
            ts, d = ends[0]
            return f"{about}; {trained}, {STATE_NAMES.get(d.state)} {ts - start:.0f} s after v1 answered", False
        return "", any(d.version == mv for _, d in view.deployed)

    # ------------------------------------------------------------------ scoring
    def score(self, x: Any, y: Any) -> tuple[float, set[str]]:
        """Accuracy of what the gateway serves on ``x``/``y``, and the versions that answered."""
        import numpy as np

        scorer = GatewayScorer(self.state["services"]["gateway"]["grpc"], self.state["api_key"], self.model)
        progress = Progress(
            TextColumn(f"scoring {self.model} through the gateway"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        try:
            with progress:
                task = progress.add_task("score", total=len(y))
                done: Callable[[int], None] = lambda n: progress.update(task, completed=n)  # noqa: E731
                predicted = scorer.predict(x, progress=done)
        finally:
            scorer.close()
        return float((predicted == np.asarray(y)).mean()), scorer.versions

    def run(self, records: Any, count: int, x: Any, y: Any, timeout_s: float, follow_s: float) -> Outcome:
        """Produce the records, wait for v1 to answer (``x[:1]`` asked), score ``x``/``y`` as
        served, follow the first study (:meth:`follow`) and score again."""
        t0 = time.monotonic()
        last_ack = self.produce(records, count)
        self.console.print(f"{count:,} records acknowledged in {time.monotonic() - t0:.1f} s")
        served = self.wait_served(x[:1], last_ack, timeout_s)
        self.print_served(served)
        first, versions = self.score(x, y)
        self.console.print(f"v1 as served: accuracy {first:.4f} (answered by v{', v'.join(sorted(versions))})")
        followed = self.follow(x, follow_s)
        self.console.print(f"after v1: {followed}")
        accuracy, versions = self.score(x, y)
        self.console.print(
            f"as served at the end: accuracy {accuracy:.4f} (answered by v{', v'.join(sorted(versions))})"
        )
        return Outcome(served, first, accuracy, versions, followed, self.latest())

    def latest(self) -> Any:
        """The loop's events so far."""
        self.events.poll(0.5)
        return self.events.view(self.store)


def _state_names() -> dict[int, str]:
    from cdl.v1 import events_pb2

    return {v: k.removeprefix("ROLLOUT_STATE_").lower() for k, v in events_pb2.RolloutState.items()}


STATE_NAMES = _state_names()
