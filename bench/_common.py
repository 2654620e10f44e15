"""Shared helpers for the benchmarks: a private local stack and the RESULT line."""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def private_stack(triton_servers: int = 1) -> Iterator[dict[str, Any]]:
    """Start a stack of our own (fresh state dir) and stop it afterwards."""
    # imported here: the trainer benchmark runs on machines without the stack's clients
    from cdl.settings import StackSettings
    from cdl.stack import LocalStack

    with tempfile.TemporaryDirectory(prefix="cdl-bench-") as tmp:
        stack = LocalStack(StackSettings(state_dir=Path(tmp), triton_servers=triton_servers, services=[]))
        try:
            state = stack.up()
            os.environ["CDL_STATE_DIR"] = tmp
            yield state
        finally:
            stack.down()


def machine() -> str:
    cpus = os.cpu_count() or 0
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()} {cpus} cores {mem:.0f} GiB, Python {platform.python_version()}"


def result(name: str, value: float, baseline: float, *, op: str, goal: float, unit: str = "") -> str:
    ratio = value / baseline if baseline else float("nan")
    ok = ratio >= goal if op == ">=" else ratio <= goal
    line = (
        f"RESULT {name} value={value:.6g} baseline={baseline:.6g} ratio={ratio:.4f} goal={op}{goal} "
        f"pass={'true' if ok else 'false'}"
    )
    if unit:
        line += f" unit={unit}"
    return line


def cpu_usage(groups: dict[str, int]) -> dict[str, tuple[float, int]]:
    """CPU seconds (user + system) and minor page faults so far, per named process group.

    ``groups`` maps a name to a process-group leader's pid; every live member counts.
    Differences between two calls say where a measured interval's CPU went.
    """
    from cdl.stack._procs import _stat, group_members

    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, tuple[float, int]] = {}
    for name, pgid in groups.items():
        cpu, faults = 0.0, 0
        for pid in group_members(pgid) or [pgid]:
            st = _stat(pid)
            if st is not None:  # rest[7] minflt (field 10), rest[11..12] utime, stime (fields 14, 15)
                cpu += (int(st[11]) + int(st[12])) / tick
                faults += int(st[7])
        out[name] = (cpu, faults)
    return out


def cpu_report(before: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]]) -> str:
    """``name 1.23s cpu (45k faults), ...`` for the interval between two :func:`cpu_usage` calls."""
    parts = []
    for name, (cpu, faults) in after.items():
        cpu0, faults0 = before.get(name, (0.0, 0))
        parts.append(f"{name} {cpu - cpu0:.2f}s ({(faults - faults0) / 1000:.0f}k faults)")
    return ", ".join(parts)
