"""The gateway's native lane (services/gateway/lane): its Go tests under the race detector, its
request scanner fuzzed under it, its frames as the gateway reads them, and its build's
fallback (cdl.native.go_program)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cdl import native
from cdl.errors import CdlError
from services.gateway import lane as lane_module
from services.gateway.lane import NativeLane
from tests.helpers import IN_CI

MODULE = lane_module.MODULE


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        if IN_CI:
            pytest.fail("no Go toolchain: the gateway's native lane cannot be tested")
        pytest.skip("no Go toolchain")
    return go


def _go_test(*args: str, timeout_s: float = 600) -> None:
    env = {**os.environ, "CGO_ENABLED": "1", "GOFLAGS": "-buildvcs=false -mod=readonly"}
    out = subprocess.run(
        [_go(), "test", "-race", "-count=1", *args, "."],
        cwd=MODULE,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


def test_go_tests_pass_and_the_scanner_is_fuzzed_under_the_race_detector() -> None:
    """One build: the Go tests, then FuzzScanRoute for 10 s (the lane reads client bytes)."""
    _go_test("-fuzz=FuzzScanRoute", "-fuzztime=10s")


def _served_frame(model: str, version: int, code: int, request_id: str, req: bytes, resp: bytes) -> bytes:
    body = bytes([1]) + struct.pack(
        "<BIddHHII", code, version, 0.002, 1.5e9, len(model), len(request_id), len(req), len(resp)
    )
    body += model.encode() + request_id.encode() + req + resp
    return struct.pack("<I", len(body)) + body


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> None:
        self.calls.append(args)


def test_frames_are_read_as_the_lane_writes_them(tmp_path: Path) -> None:
    """A fake lane (a shell script) writes ready, served and stats frames in one burst, split
    across reads; the gateway reads the port, each served request and the stats."""
    frames = struct.pack("<IBI", 5, 0, 43210)
    frames += _served_frame("digits", 3, 0, "gw-1-l1", b"\x0a\x06digits", b"\x0a\x01x")
    frames += _served_frame("digits", 4, 4, "gw-1-l2", b"", b"")
    stats = b'{"outstanding": {"t:1": 2}, "dropped": 0, "delegated": 5}'
    frames += struct.pack("<IB", 1 + len(stats), 2) + stats
    data = tmp_path / "frames.bin"
    data.write_bytes(frames)
    script = tmp_path / "lane.sh"
    script.write_text(f"#!/bin/sh\nhead -c 7 {data}; sleep 0.2; tail -c +8 {data}; cat >/dev/null\n")
    script.chmod(0o755)
    rec = _Recorder()
    lane = NativeLane(script, ["--listen=127.0.0.1:0"], rec, dict, list)
    try:
        assert lane.start(10) == 43210
        deadline = 50
        while (len(rec.calls) < 2 or not lane.stats) and deadline:
            deadline -= 1
            lane._closing.wait(0.1)
        assert rec.calls == [
            ("digits", 3, 0, 0.002, 1.5e9, "gw-1-l1", b"\x0a\x06digits", b"\x0a\x01x"),
            ("digits", 4, 4, 0.002, 1.5e9, "gw-1-l2", b"", b""),
        ]
        assert lane.stats["delegated"] == 5
        assert lane.alive()
    finally:
        lane.close(5)
    assert not lane.alive()


def test_go_program_falls_back_without_a_toolchain(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CDL_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no go
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("CDL_NATIVE_REQUIRED", "0")
    assert native.go_program(MODULE, "gwlane") is None
    assert lane_module.lane_binary("python") is None
    with pytest.raises(CdlError, match="data_plane=native"):
        lane_module.lane_binary("native")
    monkeypatch.setenv("CDL_NATIVE_REQUIRED", "1")
    with pytest.raises(native.NativeBuildError):
        native.go_program(MODULE, "gwlane")
