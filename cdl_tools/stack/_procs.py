"""Start, identify and stop the local stack's processes."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcInfo", "free_port", "group_members", "is_alive", "port_pool", "port_taken", "spawn", "stop"]


@dataclass(frozen=True)
class ProcInfo:
    """A process the stack started: its pid and its kernel start time (pid reuse guard)."""

    pid: int
    start_ticks: int

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start_ticks": self.start_ticks}


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the local ends of outgoing connections."""
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def port_pool() -> range:
    """Where :func:`free_port` picks: the stack's ``port_range`` when set, else 10000 to below the
    kernel's ephemeral range (or above it, when it starts that low)."""
    from cdl_tools.settings import StackSettings

    configured = StackSettings().port_range
    if configured:
        first, _, last = configured.partition("-")
        return range(int(first), int(last) + 1)
    low, high = _ephemeral_ports()
    return range(10000, low) if low > 11000 else range(high + 1, 65536)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now for a server the stack starts, outside the kernel's ephemeral range: a
    port from inside it (what binding port 0 gives) can become the local end of some process's
    outgoing connection before the server binds it; it happened to a gateway's metrics port,
    held by a Kafka client's connection for as long as that lived."""
    pool = port_pool()
    for port in random.sample(pool, min(len(pool), 100)):
        if port in _handed_out:  # free now, but handed to a server of ours that may not have bound it yet
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a crowded or tiny range: any free port
        s.bind((host, 0))
        found: int = s.getsockname()[1]
        return found


#: the ports ``free_port`` handed out in this process: never handed twice (a stack picks all its
#: ports before its first server starts; two picks of one port made the later server's bind fail)
_handed_out: set[int] = set()

#: what a server's log says when a port it was given was taken before it bound it
_PORT_TAKEN = (
    "already in use",  # Kafka (BindException), MinIO, PostgreSQL, Triton, Python's servers (errno 98)
    "failed to bind",  # gRPC
    "failed to start http service",  # Triton's three endpoints
    "failed to start grpc service",
    "failed to start metrics service",
)


def port_taken(log_path: Path, since: int = 0) -> bool:
    """Whether the log at ``log_path``, from byte ``since``, says a port the server was given was
    taken (another process bound it between ``free_port`` and the server's bind)."""
    try:
        with open(log_path, "rb") as log:
            log.seek(since)
            text = log.read(1 << 20).decode(errors="replace").lower()
    except OSError:
        return False
    return any(marker in text for marker in _PORT_TAKEN)


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces; fields after the closing paren are space separated
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest  # rest[0] is state (field 3), rest[19] is starttime (field 22)


def _start_ticks(pid: int) -> int:
    st = _stat(pid)
    return int(st[19]) if st else -1


def is_alive(info: ProcInfo) -> bool:
    """True while the very process we started runs (a zombie counts as gone)."""
    st = _stat(info.pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return int(st[19]) == info.start_ticks


def group_members(pgid: int) -> list[int]:
    """Pids of live processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = _stat(int(entry.name))
        if st is not None and st[0] not in ("Z", "X") and int(st[2]) == pgid:
            members.append(int(entry.name))
    return members


def spawn(
    argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> tuple[subprocess.Popen[bytes], ProcInfo]:
    """Start ``argv`` in its own session (so its children can be stopped together)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    return proc, ProcInfo(proc.pid, _start_ticks(proc.pid))


def stop(info: ProcInfo, timeout_s: float) -> bool:
    """SIGTERM the process group of ``info``, then SIGKILL what is left.

    Returns True when something of ours was running. Only signals the group when
    the leader is still the process we started, or when its group still has members.
    """
    ours = is_alive(info)
    members = group_members(info.pid)
    if not ours and not members:
        return False
    _signal_group(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_alive(info) and not group_members(info.pid):
            return True
        time.sleep(0.1)
    _signal_group(info.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (is_alive(info) or group_members(info.pid)):
        time.sleep(0.1)
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
