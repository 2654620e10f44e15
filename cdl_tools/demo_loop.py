"""``cdl demo``: the whole loop on the local stack, driven by itself in phases, shown live.

1. **stream** — a wave of records (every digit image once, under new ids);
   a dataset version, a training (and a study), compression, the first version
   serving through the gateway.
2. **traffic** — clients call the gateway with held-out images (tritonclient);
   a share of the answers get a late label on ``data.feedback``; a second wave
   makes a second version, rolled out as a canary under that traffic.
3. **drift** — the clients' images turn inverted (a new scanner) and labelled
   inverted records trickle in; the monitor's drift test fires, ingest cuts an
   early version, the trainer retrains (the tuner studies it), the new version
   rolls out.
4. **bad** — the demo asks the compressor for a faulty next version (its
   Triton entry fails on real inputs: ``services/compressor/faults.py``); the
   gateway's canary sees errors, retries each on the stable version and rolls
   the candidate back: no client request fails.

It ends with a summary and a report (``report.md`` with PNG plots, ``summary.json``)
and stops the stack unless ``--keep``. The demo's stack lives in its own state
directory, wiped at each start. Design notes: docs/demo.md.
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import KafkaException, Producer
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cdl.errors import StackError
from cdl.events import Topics
from cdl.feedback import served_record_id
from cdl.kafka.security import secured
from cdl.v1 import events_pb2
from cdl_tools.demo import DIGITS, DigitsData, register_digits
from cdl_tools.report import ClientSample, LoopEvents, LoopView, freshness, write_report
from cdl_tools.report import summary as summary_of

__all__ = ["PHASES", "Clients", "Demo", "DemoOptions"]

PHASES = ("stream", "traffic", "drift", "bad")

#: the file that marks a directory as the demo's own (the demo wipes only such a directory)
MARKER = ".cdl-demo"
#: how an outcome that did not come starts (the command then exits 1)
MISSED = "missed:"
#: inverted labelled records sent per second in the drift phase (what the version cut at the alert learns from)
TRICKLE = 60
#: a compressor fault the demo asks for (services/compressor/faults.py)
FAULT_SUFFIX = ".failing"

#: the shortest time each phase may wait for its outcome, whatever --duration says
MIN_PHASE_S = {"stream": 180.0, "traffic": 90.0, "drift": 240.0, "bad": 240.0}

#: service settings the demo starts its stack with (the environment overrides each)
DEMO_ENV = {
    "CDL_TUNER_N_TRIALS": "4",
    "CDL_TUNER_MAX_EPOCHS": "3",
    # the phases narrate versions made by data (a wave, a drift); a study's own version would
    # land among them unannounced: in the demo tuned parameters apply from the next data version
    "CDL_TRAINER_TRAIN_ON_TUNING": "false",
    "CDL_COMPRESSOR_LATENCY_RUNS": "50",
    "CDL_GATEWAY_MIN_SAMPLES": "15",
}


@dataclass
class DemoOptions:
    state_dir: Path
    report_dir: Path
    duration_s: float = 300.0
    phases: tuple[str, ...] = PHASES
    keep: bool = False
    rate: float = 25.0
    """Client requests per second through the gateway."""
    feedback_share: float = 0.5
    """Share of answered requests that get a late label."""
    triton_servers: int = 1


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class Clients:
    """Client threads calling the gateway with held-out digits, and a thread sending late labels.

    Request ids are chosen so that ``served-<id>`` (the record the monitor sends back to
    data.raw for a labelled answer) lands in the holdout split: served images stay out of
    training (cdl_tools/demo.py).
    """

    def __init__(
        self, endpoint: str, api_key: str, bootstrap: str, data: DigitsData, rate: float, feedback_share: float
    ) -> None:
        self._endpoint, self._headers = endpoint, {"authorization": f"Bearer {api_key}"}
        self._data, self._rate, self._share = data, rate, feedback_share
        self._images = data.served()
        self._producer = Producer(secured({"bootstrap.servers": bootstrap, "linger.ms": 20, "log_level": 0}))
        self.shifted = False
        self.samples: list[ClientSample] = []
        self.recent: deque[ClientSample] = deque(maxlen=400)
        self.errors: Counter[str] = Counter()
        self.labels_sent = 0
        self.labels_lost = 0
        self._due: list[tuple[float, int, bytes]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._n = 0
        self._threads = [threading.Thread(target=self._call, args=(i,), daemon=True) for i in range(2)]
        self._threads.append(threading.Thread(target=self._labels, daemon=True))

    def start(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def _request_id(self, k: int) -> str:
        return self._data.id_in_split(f"{self._data.run_id}-req{k}", True, served_record_id)

    def _call(self, worker: int) -> None:
        import tritonclient.grpc as tgrpc
        from tritonclient.utils import InferenceServerException

        client = tgrpc.InferenceServerClient(self._endpoint)
        rng = np.random.default_rng(worker)
        period = 2.0 / self._rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            next_at += period
            with self._lock:
                k = self._n
                self._n += 1
            j = int(self._images[rng.integers(len(self._images))])
            shifted = self.shifted
            x = self._data.shifted(self._data.x[j]) if shifted else self._data.x[j]
            inp = tgrpc.InferInput("input", [1, 1, 8, 8], "FP32")
            inp.set_data_from_numpy(x.reshape(1, 1, 8, 8).astype(np.float32))
            rid = self._request_id(k)
            t0 = time.monotonic()
            try:
                result = client.infer(DIGITS, [inp], headers=self._headers, request_id=rid, client_timeout=10)
                version = int(result.get_response().model_version or 0)
                out = result.as_numpy("logits")
                correct = out is not None and int(out.argmax()) == int(self._data.y[j])
                sample = ClientSample(time.time(), version, True, (time.monotonic() - t0) * 1e3, correct, shifted)
                if rng.random() < self._share:
                    label = json.dumps({"request_id": rid, "label": str(int(self._data.y[j]))}).encode()
                    with self._lock:
                        heapq.heappush(self._due, (time.monotonic() + float(rng.uniform(1, 4)), k, label))
            except InferenceServerException as exc:
                with self._lock:
                    self.errors[str(exc.status())] += 1
                sample = ClientSample(time.time(), 0, False, (time.monotonic() - t0) * 1e3, False, shifted)
            except Exception as exc:  # noqa: BLE001 - a client error is a failed request, not a dead thread
                with self._lock:
                    self.errors[type(exc).__name__] += 1
                sample = ClientSample(time.time(), 0, False, (time.monotonic() - t0) * 1e3, False, shifted)
            with self._lock:
                self.samples.append(sample)
                self.recent.append(sample)
            self._stop.wait(max(0.0, next_at - time.monotonic()))
        client.close()

    def _labels(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                ready = []
                while self._due and self._due[0][0] <= now:
                    ready.append(heapq.heappop(self._due)[2])
            for label in ready:
                try:
                    self._producer.produce(Topics.DATA_FEEDBACK, label)
                    self.labels_sent += 1
                except (BufferError, KafkaException):  # a full queue or a gone broker: that label is lost
                    self.labels_lost += 1
            self._producer.poll(0)
            self._stop.wait(0.2)

    def first_answer(self) -> dict[int, float]:
        """The first time each model version answered a client."""
        out: dict[int, float] = {}
        with self._lock:
            for s in self.samples:
                if s.ok:
                    out.setdefault(s.version, s.t)
        return out

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)
        self._producer.flush(5)


@dataclass
class _Phase:
    name: str
    text: str
    started: float = 0.0
    done: bool = False
    outcome: str = ""
    ok: bool = False


@dataclass
class Demo:
    """One run of the demo (``run``), or its parts (the freshness benchmark uses them)."""

    options: DemoOptions
    console: Console = field(default_factory=Console)

    def __post_init__(self) -> None:
        from cdl_tools.settings import StackSettings
        from cdl_tools.stack import LocalStack

        self.stack = LocalStack(
            StackSettings(
                state_dir=self.options.state_dir,
                triton_servers=self.options.triton_servers,
                tuner_workers=1,  # a study beside the trainer, not two: the demo's machine may have 2 cores
            )
        )
        self.data = DigitsData()
        self.state: dict[str, Any] = {}
        self.events: LoopEvents | None = None
        self.clients: Clients | None = None
        self._producer: Any = None
        self.start = time.time()
        self.waves = 0
        #: dataset versions' firing records: wave end times (the wave's last record fires its version)
        self.wave_ends: list[float] = []
        self.phases: list[_Phase] = []
        self.view = LoopView(start=self.start)
        #: the version clients are answered by (as far as the phases know)
        self.serving = 0
        self.failed = False
        #: when the first version first answered (the demo's clients start after it)
        self.first_answered: dict[int, float] = {}

    # ------------------------------------------------------------------ stack
    @property
    def fault_dir(self) -> Path:
        return self.options.state_dir / "demo-faults"

    def wipe(self) -> None:
        """Empty the demo's state directory: only one the demo made (it holds the marker), or an
        empty one; anything else is refused (``--state-dir ~`` must not delete a home)."""
        root = self.options.state_dir
        if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
            raise StackError(
                f"{root} is not empty and not a demo state directory: refusing to wipe it "
                f"(`cdl stack down --purge --state-dir {root}`, then remove it; or give --state-dir)"
            )
        if self.stack.read_state():
            self.stack.down(purge=True)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        (root / MARKER).write_text("made by cdl demo: wiped at each start\n")

    def up(self, report: Callable[[str, str, str], None]) -> None:
        """A fresh stack in the demo's state directory, with the dataset registered."""
        self.wipe()
        self.fault_dir.mkdir(parents=True)
        for k, v in {**DEMO_ENV, "CDL_COMPRESSOR_DEMO_FAULT_DIR": str(self.fault_dir)}.items():
            os.environ.setdefault(k, v)
        self.state = self.stack.up(report)
        register_digits(
            self.state["services"]["ingest"]["grpc"],
            min_new_records=len(self.data),
            max_interval_s=3600.0,
            api_key=self.state["ingest_key"],
        )
        self._producer = Producer(secured({"bootstrap.servers": self.bootstrap, "linger.ms": 20, "log_level": 0}))
        self.events = LoopEvents(self.bootstrap, DIGITS)
        self.start = time.time()

    @property
    def bootstrap(self) -> str:
        return str(self.state["kafka"]["bootstrap"])

    def store(self) -> Any:
        from cdl_tools.stack import stack_store

        return stack_store(self.state)

    def quiet(self) -> None:
        """Stop the clients and the feed (before the stack: no client outlives the broker)."""
        if self.clients is not None:
            self.clients.stop()
        if self._producer is not None:
            self._producer.flush(5)
            self._producer = None

    def down(self) -> list[str]:
        """The clients and the feed first, then the event reader, then the stack (unless
        ``--keep``); a second Ctrl-C meanwhile cannot leave the stack half stopped."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            self.quiet()
            if self.events is not None:
                self.events.close()
                self.events = None
            for flag in self.fault_dir.glob(f"*{FAULT_SUFFIX}"):  # a fault nobody took
                flag.unlink(missing_ok=True)
            if self.options.keep:
                return []
            return self.stack.down(purge=True)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    # ------------------------------------------------------------------ data
    def wave(self, shifted: bool = False, count: int | None = None) -> None:
        """Every image once (or ``count`` of them), each under a new id in its own split."""
        self.waves += 1
        n = len(self.data) if count is None else count
        for j in range(n):
            self._producer.produce(Topics.DATA_RAW, self.data.record(self.waves, j % len(self.data), shifted))
            if j % 500 == 0:
                self._producer.poll(0)
        self._producer.flush(30)
        if count is None:
            self.wave_ends.append(time.time())

    def start_clients(self) -> Clients:
        if self.clients is None:
            self.clients = Clients(
                self.state["services"]["gateway"]["grpc"],
                self.state["api_key"],
                self.bootstrap,
                self.data,
                self.options.rate,
                self.options.feedback_share,
            ).start()
        return self.clients

    def answering(self, timeout_s: float) -> int:
        """Wait until the gateway answers for the dataset's model; the version that answered."""
        import tritonclient.grpc as tgrpc
        from tritonclient.utils import InferenceServerException

        client = tgrpc.InferenceServerClient(self.state["services"]["gateway"]["grpc"])
        inp = tgrpc.InferInput("input", [1, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(self.data.x[0].reshape(1, 1, 8, 8).astype(np.float32))
        headers = {"authorization": f"Bearer {self.state['api_key']}"}
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                try:
                    result = client.infer(DIGITS, [inp], headers=headers, client_timeout=5)
                    version = int(result.get_response().model_version or 0)
                    self.first_answered.setdefault(version, time.time())
                    return version
                except InferenceServerException:
                    self.tick(0.5)
            return 0
        finally:
            client.close()

    # ------------------------------------------------------------------ events
    def tick(self, wait_s: float = 1.0) -> LoopView:
        """Read the events that arrived (for about ``wait_s``) and refresh the view."""
        if self.events is None:
            time.sleep(wait_s)
            return self.view
        self.events.poll(wait_s)
        self.view = self.events.view(start=self.start)
        return self.view

    def freshness_rows(self) -> list[Any]:
        """Per dataset version: its firing record (the end of the wave that cut it, else its
        own event) to the first client answer of the model trained on it."""
        fired: dict[int, float] = {}
        ends = sorted(self.wave_ends)
        for ts, u in self.view.versions:
            before = [t for t in ends if t <= ts]
            if before:
                fired[int(u.version)] = before[-1]
                ends.remove(before[-1])
        answered = dict(self.clients.first_answer()) if self.clients is not None else {}
        for version, at in self.first_answered.items():
            answered[version] = min(at, answered.get(version, at))
        v = self.events.view(self.store(), self.start) if self.events is not None else self.view
        self.view = v
        return freshness(v, fired, answered)

    # ------------------------------------------------------------------ phases
    def _deadline(self, index: int, count: int) -> float:
        """Each phase may take a share of what is left of the duration, and at least its own
        minimum (training and compression on a busy machine take what they take)."""
        left = self.options.duration_s - (time.time() - self.start)
        floor = MIN_PHASE_S.get(self.phases[index].name, 60.0)
        return time.monotonic() + max(floor, left / max(1, count - index))

    def _wait(self, done: Callable[[LoopView], str], deadline: float, render: Callable[[], None]) -> str:
        while time.monotonic() < deadline:
            outcome = done(self.tick(1.0))
            render()
            if outcome:
                return outcome
        return ""

    def _newest(self, view: LoopView, after: int, states: tuple[int, ...]) -> tuple[int, str] | None:
        for _, d in view.deployed:
            if d.version > after and d.state in states:
                return int(d.version), STATE_NAMES.get(d.state, "")
        return None

    def run(self) -> dict[str, Any]:
        """Every phase asked for, live; returns the summary (also written to the report)."""

        opts = self.options
        progress = Progress(
            TextColumn("[bold]cdl demo"),
            BarColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        with progress:
            tasks: dict[str, Any] = {}

            def report(component: str, phase: str, detail: str) -> None:
                if component not in tasks:
                    tasks[component] = progress.add_task(component, total=None)
                progress.update(tasks[component], description=f"{component}: {phase} {detail}")

            try:
                self.up(report)
            except BaseException as exc:  # Ctrl-C or any failure while starting: nothing left running
                if isinstance(exc, KeyboardInterrupt):
                    self.console.print("[yellow]interrupted while starting: stopping what started[/]")
                else:
                    self.console.print(f"[red]the stack failed to start:[/] {exc}", soft_wrap=True)
                self.options.keep = False
                self.down()
                raise
        self.console.print(f"[green]stack up[/] in {opts.state_dir} (Kafka {self.bootstrap})")
        texts = {
            "stream": "a wave of records → version → training → compression → serving",
            "traffic": "clients through the gateway, late labels; a second wave → canary rollout",
            "drift": "inverted images (new scanner) → drift alert → early version → retrain → rollout",
            "bad": "a faulty candidate (Triton entry fails on real input) → rolled back, no client failing",
        }
        self.phases = [_Phase(p, texts[p]) for p in PHASES if p in opts.phases]
        interrupted = False
        try:
            with Live(self._render(), console=self.console, refresh_per_second=2, transient=False) as live:

                def render() -> None:
                    live.update(self._render())

                for i, phase in enumerate(self.phases):
                    phase.started = time.time()
                    phase.outcome = getattr(self, f"_phase_{phase.name}")(self._deadline(i, len(self.phases)), render)
                    phase.ok = not phase.outcome.startswith(MISSED)
                    phase.done = True
                    render()
                self.tick(2.0)
                render()
        except KeyboardInterrupt:
            interrupted = True
            self.console.print("\n[yellow]interrupted: stopping the clients and the feed, then the stack[/]")
        except BaseException as exc:  # noqa: BLE001 - reported, and the stack stopped, below
            self.console.print(f"[red]the demo failed:[/] {type(exc).__name__}: {exc}", soft_wrap=True)
            self.failed = True
        summary = self._finish(interrupted)
        summary["interrupted"] = interrupted
        summary["ok"] = not interrupted and not self.failed and all(p.ok for p in self.phases)
        return summary

    def _phase_stream(self, deadline: float, render: Callable[[], None]) -> str:
        self.wave()
        render()
        version = 0
        while not version and time.monotonic() < deadline:
            version = self.answering(min(5.0, max(0.1, deadline - time.monotonic())))
            render()
        self.serving = version
        return f"v{version} serving through the gateway" if version else MISSED + " no version served in time"

    def _phase_traffic(self, deadline: float, render: Callable[[], None]) -> str:
        self.start_clients()
        serving = max(self.serving, self.view.serving())
        self.wave()

        def done(view: LoopView) -> str:
            hit = self._newest(view, serving, TERMINAL)
            if hit is not None:
                self.serving = max(self.serving, view.serving())
                return f"v{hit[0]} {hit[1]}"
            for mv, (_, t) in sorted(view.trained.items()):  # the gate may turn it down: an outcome too
                if mv > serving and t.verdict == events_pb2.VERDICT_REJECTED:
                    return f"v{mv} rejected by the trainer's gate: {t.reason}"
            return ""

        return self._wait(done, deadline, render) or MISSED + " no second version rolled out in time"

    def _phase_drift(self, deadline: float, render: Callable[[], None]) -> str:
        clients = self.start_clients()
        clients.shifted = True
        alerts = len(self.view.alerts)
        trickle_at = time.monotonic()
        sent = 0

        def done(view: LoopView) -> str:
            nonlocal trickle_at, sent
            # labelled inverted records trickle in (TRICKLE per second): what the early version learns from
            if time.monotonic() >= trickle_at and sent < len(self.data):
                for j in range(sent, min(sent + TRICKLE, len(self.data))):
                    self._producer.produce(Topics.DATA_RAW, self.data.record(self.waves + 1, j, shifted=True))
                self._producer.poll(0)
                sent += TRICKLE
                trickle_at = time.monotonic() + 1.0
            if len(view.alerts) <= alerts:
                return ""
            alerted_at, alert = view.alerts[alerts]
            # the answer: a version trained on a dataset version cut after the alert, promoted
            early = {int(u.version) for ts, u in view.versions if ts >= alerted_at}
            for _, d in view.deployed:
                trained = view.trained.get(int(d.version))
                if (
                    trained is not None
                    and int(trained[1].lineage.dataset_version) in early
                    and d.state == events_pb2.ROLLOUT_STATE_PROMOTED
                ):
                    self.serving = int(d.version)
                    return (
                        f"drift alert on v{alert.version}; data v{trained[1].lineage.dataset_version} cut early, "
                        f"v{d.version} trained on it and promoted"
                    )
            return ""

        try:
            return self._wait(done, deadline, render) or (
                MISSED
                + (
                    " drift alert, no new version promoted in time"
                    if len(self.view.alerts) > alerts
                    else " no drift alert"
                )
            )
        finally:
            self.waves += 1

    def _phase_bad(self, deadline: float, render: Callable[[], None]) -> str:
        self.start_clients()
        flag = self.fault_dir / f"{DIGITS}{FAULT_SUFFIX}"
        flag.write_text("asked by cdl demo\n")
        newest = max(self.view.trained, default=0)
        self.wave(shifted=self.clients is not None and self.clients.shifted)
        waves = [newest]

        def done(view: LoopView) -> str:
            # the version that took the fault (it may be one already compressing when asked)
            taken = {int(p.name.rsplit("-v", 1)[1]) for p in self.fault_dir.glob(f"{flag.name}.taken-v*")}
            for _, d in view.deployed:
                if d.version in taken and d.state in (
                    events_pb2.ROLLOUT_STATE_ROLLED_BACK,
                    events_pb2.ROLLOUT_STATE_FAILED,
                ):
                    return f"v{d.version} rolled back: {d.reason}"
            # not taken yet, and the gate turned the wave's version down: another wave
            rejected = [
                mv for mv, (_, t) in view.trained.items() if mv > waves[-1] and t.verdict == events_pb2.VERDICT_REJECTED
            ]
            if flag.exists() and rejected and len(waves) < 4:
                waves.append(max(view.trained))
                self.wave(shifted=self.clients is not None and self.clients.shifted)
            return ""

        return self._wait(done, deadline, render) or MISSED + " the faulty version was not rolled back in time"

    # ------------------------------------------------------------------ output
    def _render(self) -> Group:
        v = self.view
        elapsed = time.time() - self.start
        head = Table.grid(padding=(0, 2))
        head.add_column()
        head.add_column()
        for p in self.phases:
            mark = "[green]✓[/]" if p.done else ("[yellow]▶[/]" if p.started else "·")
            head.add_row(f"{mark} {p.name}", p.outcome or p.text)
        models = Table(title=f"model versions of '{DIGITS}'", expand=True)
        for col in (
            "ver",
            "data",
            "verdict",
            "holdout",
            "variant",
            "rollout",
            "share",
            "acc on feedback",
            "p50/p99 ms",
        ):
            models.add_column(col)
        for mv, (_, t) in sorted(v.trained.items()):
            c = v.compressed.get(mv)
            state, _reason, share = v.rollout(mv)
            acc, n = v.feedback_accuracy(mv)
            p50, p99 = v.latency(mv)
            verdict = events_pb2.Verdict.Name(t.verdict).removeprefix("VERDICT_").lower()
            colour = {"promoted": "green", "rolled_back": "red", "failed": "red", "canary": "yellow"}.get(
                state, "white"
            )
            models.add_row(
                f"v{mv}",
                f"v{t.lineage.dataset_version}",
                verdict,
                f"{t.challenger_score:.3f}",
                (c[1].chosen_variant if c[1].ok else "[red]failed[/]") if c else "…",
                f"[{colour}]{state or '-'}[/]",
                f"{share:.0%}" if state in ("canary", "shadow") else "",
                f"{acc:.3f} ({n})" if acc is not None else "",
                f"{p50:.1f}/{p99:.1f}" if p50 is not None and p99 is not None else "",
            )
        lines = [
            f"dataset versions: {', '.join(f'v{u.version} ({u.total_records})' for _, u in v.versions) or 'none yet'}",
            f"studies: {len(v.tunings)}   drift alerts: "
            + (", ".join(f"v{a.version} ({a.statistic:.3f} > {a.threshold:.3f})" for _, a in v.alerts) or "none"),
        ]
        if self.clients is not None:
            recent = list(self.clients.recent)
            by_version = Counter(s.version for s in recent if s.ok)
            answered = ", ".join(f"v{k} {n / max(1, len(recent)):.0%}" for k, n in sorted(by_version.items()))
            ok = [s for s in recent if s.ok]
            live = sum(s.correct for s in ok) / len(ok) if ok else 0.0
            failed = sum(not s.ok for s in self.clients.samples)
            lines.append(
                f"clients: {len(self.clients.samples)} requests, [{'red' if failed else 'green'}]{failed} failed[/], "
                f"{self.clients.labels_sent} labels; answered by {answered or '-'}; "
                f"accuracy (last {len(ok)}) {live:.3f}{' on inverted images' if self.clients.shifted else ''}"
            )
        return Group(
            Panel(head, title=f"cdl demo — {elapsed:.0f}s of ~{self.options.duration_s:.0f}s"),
            models,
            *lines,
        )

    def _finish(self, interrupted: bool) -> dict[str, Any]:
        notes = [
            f"phase {p.name}: {p.outcome or ('interrupted' if interrupted else 'not reached')}" for p in self.phases
        ]
        notes.append(
            "data: every wave streams each digit image once under a new id; an image and all its copies are in one "
            "split (by a hash of its pixels), and clients send only held-out images (docs/demo.md)"
        )
        summary: dict[str, Any] = {}
        try:
            self.quiet()  # no client keeps calling while the report is drawn
            if self.events is not None:
                self.tick(1.0)
                fresh = self.freshness_rows()
                samples = list(self.clients.samples) if self.clients is not None else []
                try:
                    path = write_report(self.view, self.options.report_dir, samples, fresh, "cdl demo report", notes)
                except Exception as exc:  # noqa: BLE001 - the summary still comes, without the plots
                    self.console.print(f"[red]the report failed:[/] {type(exc).__name__}: {exc}", soft_wrap=True)
                    self.options.report_dir.mkdir(parents=True, exist_ok=True)
                    path = self.options.report_dir / "summary.json"
                    path.write_text(json.dumps(summary_of(self.view, samples, fresh)))
                summary = json.loads((self.options.report_dir / "summary.json").read_text())
                summary["phases"] = {p.name: p.outcome for p in self.phases}
                (self.options.report_dir / "summary.json").write_text(json.dumps(summary, indent=2))
                self._print_summary(summary)
                self.console.print(f"report: {path}")
        finally:
            stopped = self.down()
        if self.options.keep:
            self.console.print(
                f"the stack keeps running: CDL_STATE_DIR={self.options.state_dir} cdl models  (cdl stack down to stop)"
            )
        else:
            self.console.print(f"stopped: {', '.join(stopped) or 'nothing'}")
        return summary

    def _print_summary(self, s: dict[str, Any]) -> None:
        t = Table(title="cdl demo: summary")
        t.add_column("what")
        t.add_column("result")
        for name, outcome in s.get("phases", {}).items():
            t.add_row(f"phase {name}", outcome or "-")
        c = s["client"]
        t.add_row("serving version", f"v{s['serving_version']}")
        t.add_row("client requests", f"{c['requests']} ({c['failed']} failed)")
        fresh = s.get("freshness", [])
        if fresh:
            t.add_row(
                "freshness (median)",
                f"{sorted(r['total_s'] for r in fresh)[len(fresh) // 2]:.1f}s, of which compute "
                f"{sorted(r['compute_s'] for r in fresh)[len(fresh) // 2]:.1f}s",
            )
        t.add_row("drift alerts", str(len(s["drift_alerts"])))
        self.console.print(t)


TERMINAL = (events_pb2.ROLLOUT_STATE_PROMOTED, events_pb2.ROLLOUT_STATE_ROLLED_BACK, events_pb2.ROLLOUT_STATE_FAILED)
STATE_NAMES = {v: k.removeprefix("ROLLOUT_STATE_").lower() for k, v in events_pb2.RolloutState.items()}
