"""`cdl stack up` / `status` / `down` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdl.stack._procs import ProcInfo, group_members, is_alive
from tests.helpers import IN_CI, run_cdl


def test_stack_up_then_down_leaves_nothing_running(tmp_path: Path) -> None:
    state_dir = tmp_path / "stack"
    up = run_cdl("stack", "up", state_dir=state_dir)
    if up.returncode != 0 and "run scripts/setup.sh" in up.stdout and not IN_CI:
        pytest.skip(up.stdout)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "stack healthy" in up.stdout
        state = json.loads((state_dir / "stack.json").read_text())
        procs = {name: ProcInfo(**p) for name, p in state["procs"].items()}
        expected = {"kafka", "minio", "postgres", "triton-0"} | {
            "ingest",
            "trainer",
            "tuner",
            "compressor",
            "gateway",
            "monitor",
        }
        assert set(procs) == expected
        assert all(is_alive(p) for p in procs.values())

        status = run_cdl("stack", "status", state_dir=state_dir)
        assert status.returncode == 0, status.stdout
        assert status.stdout.count("healthy") == 10

        # up again is a no-op: same processes
        again = run_cdl("stack", "up", state_dir=state_dir)
        assert again.returncode == 0 and "already running" in again.stdout
        assert json.loads((state_dir / "stack.json").read_text())["procs"] == state["procs"]
    finally:
        down = run_cdl("stack", "down", "--purge", state_dir=state_dir)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not Path(state["postgres"]["data"]).exists()  # --purge: nothing left outside the state dir
    for name, info in procs.items():
        assert not is_alive(info), name
        assert group_members(info.pid) == [], f"{name} left processes behind"
    after = run_cdl("stack", "status", state_dir=state_dir)
    assert after.returncode == 1
