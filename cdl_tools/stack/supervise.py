"""Supervise one service process the way compose (``restart:``) and Kubernetes (liveness probes) do.

::

    python -m cdl_tools.stack.supervise --name NAME --live-url URL --state PATH \\
        [--backoff-min-s 1] [--backoff-max-s 30] [--probe-interval-s 2] [--probe-failures 3] -- ARGV...

runs ``ARGV`` as a child in the supervisor's own process group (so signalling the group
stops both) and

- restarts it whenever it exits (any code or signal) unless a stop was asked for, after a
  backoff of ``--backoff-min-s`` (1 s), 2 s, 4 s … at most ``--backoff-max-s``, back to the
  first step once a child ran 60 s;
- probes ``GET <live-url>`` every ``--probe-interval-s`` once the child answered 200 there,
  and SIGKILLs and restarts a child that is not live ``--probe-failures`` times in a row
  (an answer other than 200, or none); before its first 200 a child is starting, not failing;
- logs each restart (one JSON line on stderr: why, how many, the backoff) and writes its state
  as JSON to ``--state`` after every change (``LocalStack.status()`` and ``cdl stack status``
  show it);
- on SIGTERM or SIGINT stops restarting, sends SIGTERM to the child, waits for it (SIGKILL
  after 30 s) and exits 0.

Operator tooling: the standard library and cdl.logging only (no torch, no gRPC), so it starts
in a fraction of a second. The child also gets SIGTERM when the supervisor itself dies (kill -9).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from cdl.logging import configure_logging, get_logger
from cdl_tools.stack._probe import probe_live

__all__ = ["Backoff", "Supervisor", "main"]

log = get_logger("cdl.supervise")

#: a child that ran this long before it exited starts the backoff again at its first step
RESET_AFTER_S = 60.0
#: how long a stopping child gets after SIGTERM before SIGKILL
STOP_TIMEOUT_S = 30.0
#: how often the supervisor looks at its child and at stop requests
TICK_S = 0.05
_PR_SET_PDEATHSIG = 1


@dataclass
class Backoff:
    """The wait before each restart: ``min_s`` (1 s), twice that, four times … at most ``max_s``;
    ``min_s`` again after a long run."""

    max_s: float = 30.0
    reset_after_s: float = RESET_AFTER_S
    min_s: float = 1.0
    _next: float | None = None

    def next(self, ran_s: float) -> float:
        """The wait before restarting a child that ran ``ran_s`` seconds."""
        if self._next is None or ran_s >= self.reset_after_s:
            self._next = self.min_s
        delay = min(self._next, self.max_s)
        self._next = min(self._next * 2, self.max_s)
        return delay


def _exit_of(returncode: int) -> dict[str, Any]:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return {"signal": name, "at": time.time()}
    return {"code": returncode, "at": time.time()}


def _describe_exit(last_exit: dict[str, Any]) -> str:
    if "signal" in last_exit:
        return f"killed by {last_exit['signal']}"
    return f"exited with code {last_exit['code']}"


def _die_with_supervisor() -> Callable[[], None] | None:
    """A preexec function asking Linux to SIGTERM the child when the supervisor dies (kill -9),
    so that a later ``cdl stack up`` does not start a second one beside an orphan."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before the request took effect
            os._exit(1)

    return preexec


class Supervisor:
    """Runs one child and keeps it running (see the module's description)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        live_url: str,
        state_path: Path,
        backoff_max_s: float = 30.0,
        backoff_min_s: float = 1.0,
        probe_interval_s: float = 2.0,
        probe_failures: int = 3,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.live_url = live_url
        self.state_path = state_path
        self.backoff = Backoff(backoff_max_s, min_s=backoff_min_s)
        self.probe_interval_s = probe_interval_s
        self.probe_failures = max(1, probe_failures)
        self.stopping = False
        self.child: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.last_exit: dict[str, Any] | None = None
        self.last_reason: str | None = None
        self.backoff_s: float | None = None
        self.live_since: float | None = None
        self.started_at = time.time()
        self._child_started = 0.0
        self._preexec = _die_with_supervisor()

    # ------------------------------------------------------------------ state
    def write_state(self) -> None:
        state = {
            "name": self.name,
            "supervisor_pid": os.getpid(),
            "child_pid": self.child.pid if self.child is not None else None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "last_reason": self.last_reason,
            "backoff_s": self.backoff_s,
            "live_since": self.live_since,
            "started_at": self.started_at,
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(tmp, self.state_path)

    # ------------------------------------------------------------------ loop
    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        """Supervise until SIGTERM or SIGINT; returns the exit code (0)."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self._start_child()
        while not self.stopping:
            self._watch_child()
            if self.stopping:
                break
            self.backoff_s = self.backoff.next(time.monotonic() - self._child_started)
            self.write_state()
            log.warning(
                f"restarting {self.name}: {self.last_reason}",
                reason=self.last_reason,
                restarts=self.restarts + 1,
                backoff_s=self.backoff_s,
            )
            if self._pause(self.backoff_s):
                self.restarts += 1
                self._start_child()
        self._stop_child()
        return 0

    def _start_child(self) -> None:
        self.child = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, preexec_fn=self._preexec)  # noqa: PLW1509 - no threads here
        self._child_started = time.monotonic()
        self.live_since = None
        self.write_state()

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``; False when a stop was asked for meanwhile."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(TICK_S)
        return not self.stopping

    def _watch_child(self) -> None:
        """Return when the child exited or was killed for not being live, or on a stop request."""
        child = self.child
        assert child is not None
        failures = 0
        next_probe = time.monotonic() + self.probe_interval_s
        while not self.stopping:
            returncode = child.poll()
            if returncode is not None:
                self._exited(returncode)
                return
            if time.monotonic() >= next_probe:
                code, detail = probe_live(self.live_url)
                next_probe = time.monotonic() + self.probe_interval_s
                if code == 200:
                    failures = 0
                    if self.live_since is None:
                        self.live_since = time.time()
                        self.write_state()
                elif self.live_since is not None:  # before its first 200 the child is starting
                    failures += 1
                    if failures >= self.probe_failures:
                        with contextlib.suppress(ProcessLookupError):
                            child.kill()
                        self._exited(child.wait())
                        self.last_reason = f"not live: {detail} ({failures} probes in a row)"
                        return
            time.sleep(TICK_S)

    def _exited(self, returncode: int) -> None:
        self.last_exit = _exit_of(returncode)
        self.last_reason = _describe_exit(self.last_exit)
        self.child = None
        self.live_since = None

    def _stop_child(self) -> None:
        child = self.child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if child is not None:
            self._exited(int(child.returncode))
            self.last_reason = f"stopped: {self.last_reason}"
        self.write_state()
        log.info(f"supervisor of {self.name} stopped", restarts=self.restarts)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cdl_tools.stack.supervise",
        description="Run a command and restart it when it exits or its liveness endpoint says it is not live.",
    )
    p.add_argument("--name", required=True, help="the service's name (logs, state)")
    p.add_argument("--live-url", required=True, help="liveness endpoint, e.g. http://127.0.0.1:9100/healthz")
    p.add_argument("--state", required=True, type=Path, help="where to write the supervisor's state (JSON)")
    p.add_argument("--backoff-max-s", type=float, default=30.0, help="longest wait before a restart")
    p.add_argument("--backoff-min-s", type=float, default=1.0, help="the first wait before a restart")
    p.add_argument("--probe-interval-s", type=float, default=2.0, help="seconds between liveness probes")
    p.add_argument("--probe-failures", type=int, default=3, help="failed probes in a row that restart the child")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- the command to run")
    return p


def main(args: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(args)
    argv = list(ns.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        _parser().error("no command to supervise (give it after --)")
    configure_logging(ns.name)
    return Supervisor(
        ns.name,
        argv,
        ns.live_url,
        ns.state,
        backoff_max_s=ns.backoff_max_s,
        backoff_min_s=ns.backoff_min_s,
        probe_interval_s=ns.probe_interval_s,
        probe_failures=ns.probe_failures,
    ).run()


if __name__ == "__main__":
    sys.exit(main())
