"""Liveness: every blocking step of a loop has a deadline enforced from outside it.

librdkafka can block past the timeout it was given (``send_offsets_to_transaction``
when the group coordinator goes away mid-transaction: confluentinc/librdkafka
#5456, #5511), and nothing inside the blocked call can notice. So each loop
tells the process's :data:`WATCHDOG` what it is doing:

- ``with tracker.step("commit_transaction", timeout_s):`` around every call
  that can block; the step's deadline is its own timeout plus the policy's
  ``call_grace_s``;
- ``tracker.beat()`` whenever it made progress (a poll returned, a
  transaction finished); a step's end is progress too.

A watchdog thread checks every loop twice a second. A loop is *stuck* when a
step is open past its deadline, or when no step is open and it made no
progress for ``progress_deadline_s``. The one rule for a stuck loop (see
docs/reliability.md, "Liveness"): the process reports *not live* on
``/healthz`` (naming the loop and the step), logs it, and exits with
:data:`EXIT_HUNG` a few seconds later. Its supervisor (the local stack,
compose's ``restart:``, a Kubernetes liveness probe) starts it again, and the
new instance's ``init_transactions`` fences the stuck one's transactional id
and aborts what it left open: a blocked handle is never reused, and nothing
the stuck transaction held is committed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cdl.logging import get_logger

__all__ = ["EXIT_HUNG", "WATCHDOG", "LoopTracker", "Stall", "Watchdog", "exit_hung"]

log = get_logger(__name__)

#: exit status of a process whose watchdog found a loop stuck (EX_SOFTWARE)
EXIT_HUNG = 70

HANGS = Counter("cdl_loop_hangs_total", "Loops found stuck by the watchdog (a step past its deadline)", ["loop"])


@dataclass(frozen=True)
class Stall:
    """A loop found stuck: which loop, in which step, for how long."""

    loop: str
    step: str
    age_s: float
    deadline_s: float

    def __str__(self) -> str:
        return f"{self.loop}: {self.step} for {self.age_s:.1f} s (deadline {self.deadline_s:.0f} s)"


@dataclass
class _Open:
    what: str
    started: float
    deadline_s: float


@dataclass
class LoopTracker:
    """What one thread of control (a loop, or a loop's job) is doing; see the module docstring."""

    name: str
    progress_deadline_s: float
    _last: float = field(default_factory=time.monotonic)
    _last_step: str = "start"
    _open: dict[int, _Open] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def beat(self) -> None:
        """The loop made progress."""
        with self._lock:
            self._last = time.monotonic()

    @contextmanager
    def step(self, what: str, deadline_s: float) -> Iterator[None]:
        """A blocking step that must end within ``deadline_s``; its end is progress."""
        token = next(self._ids)
        with self._lock:
            self._open[token] = _Open(what, time.monotonic(), deadline_s)
        try:
            yield
        finally:
            with self._lock:  # the end is progress, seen together with the step's close
                del self._open[token]
                self._last_step = what
                self._last = time.monotonic()

    def stalled(self, now: float | None = None) -> Stall | None:
        """The step this loop is stuck in, or None while it is live."""
        with self._lock:
            now = time.monotonic() if now is None else now
            steps = list(self._open.values())
            last, last_step = self._last, self._last_step
        for s in steps:
            if now - s.started > s.deadline_s:
                return Stall(self.name, s.what, now - s.started, s.deadline_s)
        if not steps and now - last > self.progress_deadline_s:
            return Stall(self.name, f"no progress since {last_step}", now - last, self.progress_deadline_s)
        return None

    def ages(self, now: float | None = None) -> tuple[float, str | None, float]:
        """Seconds since the last progress; the oldest open step (None: none) and its seconds."""
        with self._lock:
            now = time.monotonic() if now is None else now
            oldest = min(self._open.values(), key=lambda s: s.started, default=None)
            last = self._last
        return now - last, oldest.what if oldest else None, now - oldest.started if oldest else 0.0

    def status(self, now: float | None = None) -> dict[str, object]:
        """For ``/healthz``: the open step (if any) and the ages, in seconds."""
        progress, step, step_age = self.ages(now)
        return {"progress_age_s": round(progress, 3), "step": step, "step_age_s": round(step_age, 3)}


def exit_hung(stall: Stall) -> None:
    """The rule for a stuck loop: exit with :data:`EXIT_HUNG` (the supervisor restarts the process)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # exiting either way
            stream.flush()
    os._exit(EXIT_HUNG)


class Watchdog(Collector):
    """The process's loops and the thread that checks them (see the module docstring).

    ``on_hang`` is called once, on the watchdog's thread, ``exit_delay_s`` after a loop
    was first found stuck (in between ``/healthz`` reports it); the default exits.
    """

    def __init__(
        self,
        on_hang: Callable[[Stall], None] = exit_hung,
        interval_s: float = 0.5,
        exit_delay_s: float = 3.0,
    ) -> None:
        self.on_hang = on_hang
        self.exit_delay_s = exit_delay_s
        self._interval_s = interval_s
        self._loops: dict[str, LoopTracker] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.stall: Stall | None = None
        self._stalled_at = 0.0
        self._acted = False

    def track(self, name: str, progress_deadline_s: float) -> LoopTracker:
        """A tracker for loop ``name`` (replacing an earlier one of that name); starts the watchdog."""
        tracker = LoopTracker(name, progress_deadline_s)
        with self._lock:
            self._loops[name] = tracker
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="cdl-watchdog", daemon=True)
                self._thread.start()
        return tracker

    def untrack(self, tracker: LoopTracker) -> None:
        """The loop ended: stop watching it."""
        with self._lock:
            if self._loops.get(tracker.name) is tracker:
                del self._loops[tracker.name]

    def loops(self) -> list[LoopTracker]:
        with self._lock:
            return list(self._loops.values())

    def live(self) -> tuple[bool, dict[str, object]]:
        """``/healthz``: whether no loop is stuck, with each loop's status."""
        now = time.monotonic()
        details: dict[str, object] = {"loops": {t.name: t.status(now) for t in self.loops()}}
        if self.stall is not None:
            details["stuck"] = str(self.stall)
        return self.stall is None, details

    def check(self, now: float | None = None) -> Stall | None:
        """One round of the watchdog (the thread calls it; tests may too)."""
        now = time.monotonic() if now is None else now
        if self.stall is None:
            for tracker in self.loops():
                stall = tracker.stalled(now)
                if stall is not None:
                    self.stall, self._stalled_at = stall, now
                    HANGS.labels(stall.loop).inc()
                    log.error(
                        "loop stuck: reporting not live, exiting for the supervisor to restart",
                        loop=stall.loop,
                        step=stall.step,
                        age_s=round(stall.age_s, 1),
                        deadline_s=stall.deadline_s,
                        exit_in_s=self.exit_delay_s,
                    )
                    break
        if self.stall is not None and not self._acted and now - self._stalled_at >= self.exit_delay_s:
            self._acted = True
            self.on_hang(self.stall)
        return self.stall

    def _watch(self) -> None:
        while True:
            time.sleep(self._interval_s)
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the watchdog itself must not die
                log.error("watchdog round failed", error=f"{type(exc).__name__}: {exc}")

    def collect(self) -> Iterable[GaugeMetricFamily]:
        now = time.monotonic()
        progress = GaugeMetricFamily(
            "cdl_loop_progress_age_seconds", "Seconds since the loop last made progress", labels=["loop"]
        )
        step = GaugeMetricFamily(
            "cdl_loop_step_age_seconds", "Seconds the loop's open blocking step has run (0: none)", labels=["loop"]
        )
        live = GaugeMetricFamily("cdl_loop_live", "1 while the loop is not stuck", labels=["loop"])
        for t in self.loops():
            progress_age, _, step_age = t.ages(now)
            progress.add_metric([t.name], progress_age)
            step.add_metric([t.name], step_age)
            live.add_metric([t.name], 0.0 if self.stall is not None and self.stall.loop == t.name else 1.0)
        yield progress
        yield step
        yield live


#: the process's watchdog: every loop registers here; ``/healthz`` reads it
WATCHDOG = Watchdog()
REGISTRY.register(WATCHDOG)
