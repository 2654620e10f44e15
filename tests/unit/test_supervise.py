"""The supervisor of the local stack's services (``python -m cdl_tools.stack.supervise``), run over a toy
child: restarts after any exit with a growing backoff, a liveness probe that kills a child that
says it is not live three times in a row (never one still starting), a clean stop on SIGTERM."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cdl.errors import StackError
from cdl_tools.settings import StackSettings
from cdl_tools.stack import LocalStack
from cdl_tools.stack._components import Component, ServiceComponent
from cdl_tools.stack._probe import read_supervisor_state
from cdl_tools.stack._procs import free_port, group_members, is_alive, spawn
from cdl_tools.stack.supervise import Backoff

ROOT = Path(__file__).resolve().parent.parent.parent

#: the toy service: /healthz on its port; its control file says "503" (not live) or "exit N" (exit
#: at start); it notes each start and each 503 it answered, and a SIGTERM, next to that file
CHILD = r"""
import http.server, json, os, signal, sys, time

port, ctl = int(sys.argv[1]), sys.argv[2]


def mode():
    try:
        with open(ctl) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def note(suffix, line):
    with open(ctl + suffix, "a") as f:
        f.write(line + "\n")


note(".starts", f"{os.getpid()} {time.time()}")
if mode().startswith("exit"):
    sys.exit(int(mode().split()[1]))


def on_term(signum, frame):
    note(".sigterm", str(os.getpid()))
    os._exit(0)


signal.signal(signal.SIGTERM, on_term)


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if mode() == "503":
            note(".served503", str(os.getpid()))
            code, body = 503, {"status": "not live", "stuck": "work: step for 42.0 s (deadline 40 s)", "loops": {}}
        else:
            code, body = 200, {"status": "live", "loops": {}}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


@dataclass
class Run:
    """One supervisor over the toy child."""

    proc: subprocess.Popen[bytes]
    state_path: Path
    ctl: Path
    stderr: Path
    port: int

    def state(self) -> dict[str, Any]:
        return read_supervisor_state(self.state_path)

    def wait(self, what: str, cond: Callable[[dict[str, Any]], bool], timeout_s: float = 8.0) -> dict[str, Any]:
        """Poll the state file until ``cond`` holds (or fail, showing the state and the log)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = self.state()
            if st and cond(st):
                return st
            assert self.proc.poll() is None, f"supervisor exited ({self.proc.returncode}): {self.log()}"
            time.sleep(0.05)
        raise AssertionError(f"not within {timeout_s} s: {what}; state {self.state()}; log {self.log()}")

    def log(self) -> str:
        return self.stderr.read_text() if self.stderr.exists() else ""

    def restart_lines(self) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]
        return [line for line in lines if line["msg"].startswith("restarting")]

    def lines(self, suffix: str) -> list[str]:
        path = self.ctl.with_name(self.ctl.name + suffix)
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def supervise(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    runs: list[Run] = []

    def start(*options: str, mode: str = "") -> Run:
        n = len(runs)
        port, ctl = free_port(), tmp_path / f"ctl-{n}"
        ctl.write_text(mode)
        state, stderr = tmp_path / f"supervisor-{n}.json", tmp_path / f"supervisor-{n}.log"
        argv = [sys.executable, "-m", "cdl_tools.stack.supervise", "--name", "toy", "--state", str(state)]
        argv += ["--live-url", f"http://127.0.0.1:{port}/healthz", "--probe-interval-s", "0.2", *options]
        argv += ["--", sys.executable, str(child), str(port), str(ctl)]
        with open(stderr, "wb") as err:
            proc = subprocess.Popen(argv, cwd=ROOT, stderr=err, start_new_session=True)
        runs.append(Run(proc, state, ctl, stderr, port))
        return runs[-1]

    yield start
    for run in runs:  # the supervisor and its child share a process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.proc.pid, signal.SIGKILL)
        run.proc.wait(timeout=5)


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def _answers(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
            return int(resp.status)
    except OSError:
        return 0


def test_a_child_killed_with_sigkill_is_restarted(supervise: Callable[..., Run]) -> None:
    run = supervise()
    first = run.wait("the child started", lambda s: s["child_pid"] is not None)
    assert first["restarts"] == 0 and first["supervisor_pid"] == run.proc.pid and first["name"] == "toy"
    old = first["child_pid"]
    os.kill(old, signal.SIGKILL)
    st = run.wait("a new child", lambda s: s["restarts"] == 1 and s["child_pid"] not in (None, old))
    assert st["last_exit"]["signal"] == "SIGKILL" and st["last_exit"]["at"] > 0
    assert st["last_reason"] == "killed by SIGKILL" and st["backoff_s"] == 1.0
    [line] = run.restart_lines()
    assert line["service"] == "toy" and line["restarts"] == 1 and line["backoff_s"] == 1.0
    assert "killed by SIGKILL" in line["msg"]
    run.wait("the new child is live", lambda s: s["live_since"] is not None)
    assert _answers(run.port) == 200


def test_a_child_not_live_three_times_in_a_row_is_killed_and_restarted(supervise: Callable[..., Run]) -> None:
    run = supervise()
    old = run.wait("the child answered 200", lambda s: s["live_since"] is not None)["child_pid"]
    run.ctl.write_text("503")
    st = run.wait("the stuck child replaced", lambda s: s["restarts"] == 1 and s["child_pid"] not in (None, old))
    assert st["last_exit"]["signal"] == "SIGKILL" and _gone(old)
    assert st["last_reason"].startswith("not live: work: step for 42.0 s (deadline 40 s)"), st["last_reason"]
    assert run.lines(".served503").count(str(old)) == 3  # three in a row, then killed
    assert "not live" in run.restart_lines()[0]["msg"]
    # the new child says 503 from its start: never 200 yet, so it is starting, not probed into a restart
    new = st["child_pid"]
    deadline = time.monotonic() + 8
    while run.lines(".served503").count(str(new)) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.lines(".served503").count(str(new)) >= 6
    assert run.state()["restarts"] == 1 and run.state()["child_pid"] == new and run.state()["live_since"] is None
    run.ctl.write_text("")
    run.wait("the new child is live", lambda s: s["live_since"] is not None and s["child_pid"] == new)


def test_sigterm_stops_the_child_and_the_supervisor_exits_0_without_a_restart(supervise: Callable[..., Run]) -> None:
    run = supervise()
    pid = run.wait("the child is live", lambda s: s["live_since"] is not None)["child_pid"]
    run.proc.send_signal(signal.SIGTERM)  # the supervisor only: it passes SIGTERM on
    assert run.proc.wait(timeout=10) == 0, run.log()
    assert run.lines(".sigterm") == [str(pid)]
    assert _gone(pid) and len(run.lines(".starts")) == 1 and run.restart_lines() == []
    st = run.state()
    assert st["restarts"] == 0 and st["child_pid"] is None and st["last_exit"]["code"] == 0
    assert st["last_reason"] == "stopped: exited with code 0"


def test_the_backoff_doubles_up_to_its_cap(supervise: Callable[..., Run]) -> None:
    run = supervise("--backoff-min-s", "0.25", "--backoff-max-s", "0.5", mode="exit 3")  # exits at once, each time
    run.wait("three restarts, the third child exited", lambda s: s["restarts"] == 3 and s["child_pid"] is None)
    lines = run.restart_lines()
    assert [line["backoff_s"] for line in lines][:3] == [0.25, 0.5, 0.5]
    assert all("exited with code 3" in line["msg"] for line in lines)
    starts = [float(line.split()[1]) for line in run.lines(".starts")]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.25 and gaps[1] >= 0.5 and gaps[2] >= 0.5, gaps
    assert run.state()["last_exit"]["code"] == 3


def test_the_backoff_starts_again_after_a_long_run() -> None:
    backoff = Backoff(max_s=30.0)
    assert [backoff.next(ran_s=0.5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.next(ran_s=59.0) == 30
    assert backoff.next(ran_s=60.0) == 1  # the child ran 60 s: a fresh start
    assert backoff.next(ran_s=1.0) == 2


def test_a_service_that_exits_while_the_stack_starts_it_fails_the_start_and_leaves_nothing(tmp_path: Path) -> None:
    """As without a supervisor: `cdl stack up` reports the exit at once (not a timeout later) and
    stops the supervisor, so that the next `up` starts the service afresh."""
    settings = StackSettings(state_dir=tmp_path, start_timeout_s=30)
    name = "no_such_service"
    comp = ServiceComponent(name, tmp_path / name, {"metrics": free_port()}, settings=settings)
    assert comp.argv()[1:3] == ["-m", "cdl_tools.stack.supervise"] and comp.argv()[-1] == "services.no_such_service"
    comp.prepare()
    _, info = spawn(comp.argv(), comp.log_path, env=comp.env(), cwd=comp.workdir)
    started = time.monotonic()
    with pytest.raises(StackError, match=r"exited during start \(exited with code 1\)"):
        LocalStack(settings)._wait_healthy(comp, info, lambda *_: None)
    assert time.monotonic() - started < 15
    assert not is_alive(info) and group_members(info.pid) == []
    assert "No module named services.no_such_service" in comp.log_path.read_text()


def test_a_supervisor_killed_9_takes_its_child_with_it(supervise: Callable[..., Run]) -> None:
    """Its child gets SIGTERM (Linux's parent-death signal): no orphan runs on beside the one a
    later `cdl stack up` starts."""
    run = supervise()
    pid = run.wait("the child is live", lambda s: s["live_since"] is not None)["child_pid"]
    run.proc.kill()
    deadline = time.monotonic() + 5
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid) and run.lines(".sigterm") == [str(pid)]


def test_a_free_port_is_bindable_and_outside_the_range_of_outgoing_connections() -> None:
    import socket

    from cdl_tools.stack._procs import _ephemeral_ports

    low, high = _ephemeral_ports()
    for _ in range(20):
        port = free_port()
        assert not low <= port <= high
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_a_free_port_is_found_when_the_ephemeral_range_is_the_whole_range(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from cdl_tools.stack import _procs

    monkeypatch.setattr(_procs, "_ephemeral_ports", lambda: (1024, 65535))
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


def test_a_free_port_is_never_handed_out_twice_in_one_process() -> None:
    """A stack picks all its ports before its first server binds one: two picks of one port made
    the later server fail to bind (a Triton's HTTP port, once in a parallel CI run)."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


@dataclass
class _Binder(Component):
    """A toy server: binds its port (exits saying the address is in use when it cannot, as Kafka,
    MinIO, PostgreSQL and Triton do), or exits with ``fail`` before binding anything."""

    fail: str = ""

    def argv(self) -> list[str]:
        code = (
            "import socket, sys, time\n"
            f"if {self.fail!r}: sys.exit(print({self.fail!r}) or 3)\n"
            "s = socket.socket()\n"
            f"try: s.bind(('127.0.0.1', {self.ports['api']}))\n"
            "except OSError as e: sys.exit(print('bind failed:', e, flush=True) or 1)\n"
            "s.listen()\n"
            "time.sleep(60)\n"
        )
        return [sys.executable, "-c", code]

    def healthy(self) -> bool:
        import socket

        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.ports["api"]), timeout=1):
            return True
        return False

    def describe(self) -> dict[str, Any]:
        return {"endpoint": f"127.0.0.1:{self.ports['api']}"}


def test_a_server_whose_port_was_taken_before_it_bound_it_is_started_again_on_a_fresh_port(tmp_path: Path) -> None:
    import socket

    stack = LocalStack(StackSettings(state_dir=tmp_path, start_timeout_s=30, stop_timeout_s=2))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))  # (bound, not listening: it answers no health check)
        taken = squatter.getsockname()[1]
        comp = _Binder("toy", tmp_path / "toy", {"api": taken})
        state: dict[str, Any] = {"procs": {}}
        seen: list[tuple[str, str]] = []
        try:
            stack._start([comp], set(), state, lambda name, what, detail="": seen.append((what, detail)))
            assert comp.ports["api"] != taken and state["toy"] == {"endpoint": f"127.0.0.1:{comp.ports['api']}"}
            assert [what for what, _ in seen] == ["starting", "failed", "retrying", "starting", "healthy"]
            assert comp.log_path.read_text().count("bind failed") == 1
        finally:
            stack.down()


def test_a_server_that_exits_for_another_reason_is_not_started_again(tmp_path: Path) -> None:
    stack = LocalStack(StackSettings(state_dir=tmp_path, start_timeout_s=30))
    comp = _Binder("toy", tmp_path / "toy", {"api": free_port()}, fail="no such config")
    with pytest.raises(StackError, match="exited during start"):
        stack._start([comp], set(), {"procs": {}}, lambda *_: None)
    assert comp.log_path.read_text().count("no such config") == 1


def test_a_port_the_settings_fix_is_not_picked_again(tmp_path: Path) -> None:
    """`minio_port` given: MinIO fails on it rather than moving elsewhere (clients were told it)."""
    stack = LocalStack(StackSettings(state_dir=tmp_path, minio_port=19999, triton_base_port=20000))
    assert stack._picked_ports(_Binder("minio", tmp_path, {"api": 19999, "console": 1})) == ["console"]
    assert stack._picked_ports(_Binder("triton-1", tmp_path, {"grpc": 20003, "http": 20004})) == []
    assert stack._picked_ports(_Binder("kafka", tmp_path, {"broker": 1, "controller": 2})) == ["broker", "controller"]
