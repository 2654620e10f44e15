"""Every daily command with no stack, or with a stack recorded but stopped: a one-line error
and a non-zero exit, never a traceback (no servers needed; the running stack's unknown-model
and bad-input paths are in tests/e2e/test_demo.py). The matrix runs the commands in this
process; one case and the argument errors run the command as a user does."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.helpers import cdl_in_process, run_cdl


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stopped_stack(state_dir: Path) -> Path:
    """A stack.json as `cdl stack down` leaves it: endpoints of servers that are gone."""
    state_dir.mkdir(parents=True, exist_ok=True)
    port = _closed_port()
    state = {
        "api_key": "k",
        "kafka": {"bootstrap": f"127.0.0.1:{port}"},
        "minio": {"endpoint": f"127.0.0.1:{port}", "access_key": "a", "secret_key": "b"},
        "services": {"ingest": {"grpc": f"127.0.0.1:{port}"}, "gateway": {"grpc": f"127.0.0.1:{port}"}},
        "procs": {},
        "ports": {},
    }
    (state_dir / "stack.json").write_text(json.dumps(state))
    return state_dir


COMMANDS = [
    ("models",),
    ("models", "digits"),
    ("predict", "digits", "{inputs}"),
    ("approve", "digits", "2"),
    ("rollback", "digits"),
    ("traffic", "digits", "0.5"),
    ("datasets",),
    ("dataset", "show", "digits"),
    ("status",),
    ("report", "digits", "--out", "{out}"),
    ("tune", "digits"),
]


@pytest.mark.parametrize("stack", ["none", "stopped"])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_without_a_running_stack_each_command_says_so_in_one_line(
    tmp_path: Path, stack: str, command: tuple[str, ...]
) -> None:
    state_dir = tmp_path / "stack"
    if stack == "stopped":
        _stopped_stack(state_dir)
    inputs = tmp_path / "x.json"
    inputs.write_text(json.dumps([0.0] * 64))
    args = [a.format(inputs=inputs, out=tmp_path / "report") for a in command]
    out = cdl_in_process(*args, state_dir=state_dir)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "Traceback" not in text, text
    lines = [line for line in out.stdout.strip().splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, text  # one message (rich may wrap it once at 200 columns)


def test_as_a_user_runs_it_a_stopped_stack_is_one_line_at_once(tmp_path: Path) -> None:
    """The same, through the installed entry point in a process of its own: the broker's
    address refuses, so the command says so without waiting on the Kafka client's timeouts."""
    out = run_cdl("status", state_dir=_stopped_stack(tmp_path / "stack"), timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert out.stdout.startswith("kafka unreachable: no broker answers at 127.0.0.1:"), out.stdout
    assert "is the stack up" in out.stdout and len(out.stdout.strip().splitlines()) == 1


def test_bad_arguments_are_refused_before_anything_starts(tmp_path: Path) -> None:
    out = run_cdl("demo", "--phases", "stream,nope", state_dir=tmp_path, timeout=60)
    assert out.returncode == 2 and "unknown nope" in out.stdout
    out = run_cdl("dataset", "register", "d", "--task", "audio", state_dir=tmp_path, timeout=60)
    assert out.returncode == 2 and "--task must be one of" in out.stdout
    out = run_cdl("predict", "digits", str(tmp_path / "missing.json"), state_dir=_stopped_stack(tmp_path / "s"))
    assert out.returncode != 0 and "Traceback" not in out.stdout + out.stderr
