"""The local stack supervises its services: a service process killed -9 is started again by its
supervisor, ready on its own endpoints, with nobody calling `cdl stack up`; `cdl stack status`
counts the restart; `up` stays a no-op and `down` leaves no process of the stack behind."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from cdl_tools.settings import StackSettings
from cdl_tools.stack import LocalStack
from cdl_tools.stack._procs import ProcInfo, group_members, is_alive
from tests.helpers import run_cdl


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return int(resp.status) == 200
    except OSError:
        return False


@pytest.mark.timeout(400)
def test_a_service_killed_9_is_restarted_by_its_supervisor_and_down_stops_everything(tmp_path: Path) -> None:
    state_dir = tmp_path / "stack"
    settings = StackSettings(state_dir=state_dir, services=["compressor"], triton_servers=0, postgres=False)
    stack = LocalStack(settings)
    try:
        state = stack.up()
        supervisor = ProcInfo(**state["procs"]["compressor"])
        readyz = f"http://{state['services']['compressor']['metrics']}/readyz"
        [row] = [r for r in stack.status() if r["name"] == "compressor"]
        assert row["healthy"] and row["live"] == "live" and row["restarts"] == 0, row
        assert row["pid"] == supervisor.pid and row["child_pid"] not in (None, supervisor.pid), row
        assert row["processes"] >= 2  # the supervisor and the service, one process group
        child = int(row["child_pid"])
        # the service reads this stack's endpoints from its environment (never stack.json), and
        # `cdl stack env` gives a shell the same
        environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in kv)
        assert environ["CDL_KAFKA_BOOTSTRAP"] == state["kafka"]["bootstrap"]
        assert environ["CDL_S3_ENDPOINT"] == state["minio"]["endpoint"]
        # its own object-store key (cdl.store_access), never the store's root
        assert environ["CDL_COMPRESSOR_S3_ACCESS_KEY"] == "cdl-compressor"
        assert environ["CDL_COMPRESSOR_S3_SECRET_KEY"] == state["minio_users"]["compressor"]
        assert state["minio"]["secret_key"] not in environ.values()
        exports = run_cdl("stack", "env", state_dir=state_dir)
        assert exports.returncode == 0, exports.stderr
        assert f"export CDL_KAFKA_BOOTSTRAP={state['kafka']['bootstrap']}" in exports.stdout.splitlines()
        # a key per scope (inference, admin, ingest), each exported; the signing key the compressor's alone
        keys = [state[scope] for scope in ("api_key", "admin_key", "ingest_key")]
        assert len(set(keys)) == 3 and all(len(k) >= 24 for k in keys)
        for variable, key in zip(("CDL_API_KEY", "CDL_ADMIN_KEY", "CDL_INGEST_KEY"), keys, strict=True):
            assert f"export {variable}={key}" in exports.stdout.splitlines()
        signing = Path(environ["CDL_COMPRESSOR_SIGNING_KEY_FILE"])
        assert signing.is_file() and signing.stat().st_mode & 0o077 == 0
        # no default secret: MinIO's root password is the stack's own, and the file holding it is private
        assert len(state["minio"]["secret_key"]) >= 24 and state["minio_secret_key"] == state["minio"]["secret_key"]
        assert (state_dir / "stack.json").stat().st_mode & 0o077 == 0
        sup_state = state_dir / "compressor" / "supervisor.json"
        assert json.loads(sup_state.read_text())["child_pid"] == child

        os.kill(child, signal.SIGKILL)  # the service only: its supervisor stays
        deadline = time.monotonic() + 180
        now: dict[str, object] = {}
        while time.monotonic() < deadline:
            now = json.loads(sup_state.read_text())
            if now["restarts"] == 1 and now["child_pid"] not in (None, child) and _ready(readyz):
                break
            time.sleep(0.5)
        else:
            log = (state_dir / "compressor" / "compressor.log").read_text()[-3000:]
            raise AssertionError(f"compressor not back: {now}; its log ends: {log}")
        assert now["last_exit"] == {"signal": "SIGKILL", "at": now["last_exit"]["at"]}  # type: ignore[index]
        assert is_alive(supervisor) and stack.read_state()["procs"]["compressor"] == supervisor.to_json()

        [row] = [r for r in stack.status() if r["name"] == "compressor"]
        assert row["healthy"] and row["live"] == "live" and row["restarts"] == 1, row
        assert row["child_pid"] == now["child_pid"] and row["pid"] == supervisor.pid
        log = (state_dir / "compressor" / "compressor.log").read_text()
        assert "restarting compressor: killed by SIGKILL" in log

        shown = run_cdl("stack", "status", "--json", state_dir=state_dir)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        [listed] = [r for r in json.loads(shown.stdout) if r["name"] == "compressor"]
        assert listed["restarts"] == 1 and listed["live"] == "live" and listed["child_pid"] == now["child_pid"]
        assert {r["name"]: r["restarts"] for r in json.loads(shown.stdout)} == {
            "kafka": None,
            "minio": None,
            "compressor": 1,
        }
        table = run_cdl("stack", "status", state_dir=state_dir)
        assert table.returncode == 0 and "restarts" in table.stdout and " live " in table.stdout, table.stdout

        again = LocalStack(settings)  # up is still a no-op: the same supervisor, the same service
        again.up()
        assert sorted(again.reused) == ["compressor", "kafka", "minio"]
        assert again.read_state()["procs"]["compressor"] == supervisor.to_json()
        assert json.loads(sup_state.read_text())["child_pid"] == now["child_pid"]
    finally:
        procs = {name: ProcInfo(**p) for name, p in stack.read_state().get("procs", {}).items()}
        stack.down(purge=True)
    assert set(procs) == {"kafka", "minio", "compressor"}
    for name, info in procs.items():
        assert not is_alive(info), name
        assert group_members(info.pid) == [], f"{name} left processes behind"
