"""The gateway's native lane (services/gateway/dataplane/lane): its Go tests under the race detector, its
request scanner fuzzed under it, its frames as the gateway reads them, and its build's
fallback (cdl.native.go_program)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cdl import native
from cdl.errors import CdlError
from services.gateway.dataplane import lane as lane_module
from services.gateway.dataplane.lane import NativeLane
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


#: each fuzz target runs this many inputs (about 10 s on an idle machine) in one fuzz worker: a
#: count, not a duration, because a duration that ends while a starved worker (two busy cores)
#: has not answered fails the run with "context deadline exceeded" and no crasher
FUZZ = ("-fuzztime=2000x", "-parallel=1")


def test_go_tests_pass_and_the_scanner_is_fuzzed_under_the_race_detector() -> None:
    """One build: the Go tests, then FuzzScanRoute (the lane reads client bytes)."""
    _go_test("-fuzz=FuzzScanRoute", *FUZZ)


def test_the_rest_body_scanner_is_fuzzed_under_the_race_detector() -> None:
    """FuzzScanJSONID: the lane reads REST bodies' JSON to find and insert the id."""
    _go_test("-run=^$", "-fuzz=FuzzScanJSONID", *FUZZ)


def _served_frame(model: str, version: int, code: int, request_id: str, req: bytes, resp: bytes) -> bytes:
    body = bytes([1]) + struct.pack(
        "<BIddIIII", code, version, 0.002, 1.5e9, len(model), len(request_id), len(req), len(resp)
    )
    body += model.encode() + request_id.encode() + req + resp
    return struct.pack("<I", len(body)) + body


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> None:
        self.calls.append(args)


def _served_http_frame(model: str, version: int, request_id: str, req: bytes, resp: bytes, hq: int, hr: int) -> bytes:
    body = bytes([4]) + struct.pack(
        "<BIddIIIIII", 0, version, 0.003, 1.5e9, len(model), len(request_id), len(req), len(resp), hq, hr
    )
    body += model.encode() + request_id.encode() + req + resp
    return struct.pack("<I", len(body)) + body


def test_frames_are_read_as_the_lane_writes_them(tmp_path: Path) -> None:
    """A fake lane (a shell script) writes ready, served (gRPC and REST) and stats frames in one
    burst, split across reads; the gateway reads both ports, each served request and the stats."""
    frames = struct.pack("<IBII", 9, 0, 43210, 43211)
    frames += _served_frame("digits", 3, 0, "gw-1-l1", b"\x0a\x06digits", b"\x0a\x01x")
    frames += _served_frame("digits", 4, 4, "gw-1-l2", b"", b"")
    frames += _served_http_frame("digits", 3, "gw-1-l3", b'{"id":"gw-1-l3"}', b"{}xy", 0, 2)
    stats = b'{"outstanding": {"t:1": 2}, "dropped": 0, "delegated": 5}'
    frames += struct.pack("<IB", 1 + len(stats), 2) + stats
    data = tmp_path / "frames.bin"
    data.write_bytes(frames)
    script = tmp_path / "lane.sh"
    script.write_text(f"#!/bin/sh\nhead -c 7 {data}; sleep 0.2; tail -c +8 {data}; cat >/dev/null\n")
    script.chmod(0o755)
    rec, rec_http = _Recorder(), _Recorder()
    lane = NativeLane(script, ["--listen=127.0.0.1:0"], rec, dict, list, on_served_http=rec_http)
    try:
        assert lane.start(10) == 43210
        assert lane.http_port == 43211
        deadline = 50
        while (len(rec.calls) < 2 or not lane.stats) and deadline:
            deadline -= 1
            lane._closing.wait(0.1)
        assert rec.calls == [
            ("digits", 3, 0, 0.002, 1.5e9, "gw-1-l1", b"\x0a\x06digits", b"\x0a\x01x"),
            ("digits", 4, 4, 0.002, 1.5e9, "gw-1-l2", b"", b""),
        ]
        assert rec_http.calls == [("digits", 3, 0.003, 1.5e9, "gw-1-l3", b'{"id":"gw-1-l3"}', b"{}xy", 0, 2)]
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
    assert lane_module.lane_binary("auto") is None  # the gateway serves in Python; it never builds
    with pytest.raises(CdlError, match="could not be built"):
        lane_module.install_lane()
    monkeypatch.setenv("CDL_NATIVE_REQUIRED", "1")
    with pytest.raises(native.NativeBuildError):
        native.go_program(MODULE, "gwlane")


def test_the_gateway_finds_the_installed_lane_and_never_builds_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    program = tmp_path / "bin" / lane_module.PROGRAM
    program.parent.mkdir()
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("CDL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert lane_module.lane_binary("native") == program  # on PATH
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert lane_module.lane_binary("auto") is None
    assert lane_module.lane_binary("native", str(program)) == program  # the lane_path setting
    home_bin = tmp_path / "home" / "bin" / lane_module.PROGRAM
    home_bin.parent.mkdir(parents=True)
    home_bin.write_bytes(program.read_bytes())
    home_bin.chmod(0o755)
    assert lane_module.lane_binary("auto") == home_bin  # $CDL_HOME/bin, where set-up puts it
    # built from other sources than this checkout's (a pull without set-up): not run
    record = home_bin.with_name(f"{lane_module.PROGRAM}.source")
    record.write_text("0" * 64 + "\n")
    assert lane_module.lane_binary("auto") is None
    with pytest.raises(CdlError, match="other sources"):
        lane_module.lane_binary("native")
    record.write_text(lane_module.source_hash() + "\n")
    assert lane_module.lane_binary("native") == home_bin


def _tag(num: int, wire_type: int, extra: int = 0) -> bytes:
    """A tag as a varint, with ``extra`` redundant continuation bytes (a longer encoding)."""
    enc = bytearray(_varint((num << 3) | wire_type))
    if extra:
        enc[-1] |= 0x80
        enc += b"\x80" * (extra - 1) + b"\x00"
    return bytes(enc)


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _requests(n: int) -> list[tuple[bytes, bool]]:
    """Valid ModelInferRequests (True: as protobuf serialized them) and byte-level mutations of
    them (seeded): flipped and cut bytes, fields repeated, routing fields with other wire
    types, groups, long tags, non-UTF-8 strings, unknown fields."""
    from cdl.v1 import open_inference_pb2 as pb

    rnd = random.Random(1234)
    names = ["digits", "m", "", "ü", "a" * 300]
    out: list[tuple[bytes, bool]] = []
    for _ in range(n):
        req = pb.ModelInferRequest(model_name=rnd.choice(names), model_version=rnd.choice(["", "1", "12", "x"]))
        if rnd.random() < 0.4:
            req.id = rnd.choice(["r1", "", "id-" + "9" * 40])
        for _ in range(rnd.choice([0, 1, 1, 2])):
            req.inputs.add(name="input", datatype="FP32", shape=[1, rnd.randint(0, 8)])
            req.raw_input_contents.append(rnd.randbytes(rnd.choice([0, 4, 32, 300])))
        data = bytearray(req.SerializeToString())
        kind = rnd.random()
        if kind < 0.25:
            pass  # valid as it is
        elif kind < 0.4:  # another occurrence of a routing field, maybe with another wire type
            num = rnd.randint(1, 3)
            if rnd.random() < 0.7:
                s = rnd.choice([b"z", b"", b"\xff\xfe", "é".encode()])
                field = _tag(num, 2, rnd.choice([0, 0, 1, 4])) + _varint(len(s)) + s
                data = data + field if rnd.random() < 0.6 else field + data  # a later or an earlier one
            else:
                data += _tag(num, rnd.choice([0, 1, 5])) + rnd.randbytes(8)
        elif kind < 0.5:  # unknown fields of every wire type, groups among them
            wt = rnd.choice([0, 1, 2, 3, 5, 6, 7])
            num = rnd.choice([9, 15, 100, 1 << 20, (1 << 29) - 1, (1 << 29) + 5])
            data += _tag(num, wt) + rnd.randbytes(rnd.randint(0, 12))
        elif kind < 0.7 and data:  # a byte changed
            i = rnd.randrange(len(data))
            data[i] = rnd.randrange(256)
        elif kind < 0.85 and data:  # cut
            del data[rnd.randrange(len(data)) :]
        else:
            data = bytearray(rnd.randbytes(rnd.randint(0, 64)))
        out.append((bytes(data), kind < 0.25))
    return out


def test_scan_reads_what_protobuf_reads() -> None:
    """Differential: the lane's scan against the Python gateway's (wire.route_fields) and
    protobuf's parser over 20,000 seeded requests. Where the lane accepts the bytes, both read
    the same model, version and id (so the lane never routes a request elsewhere than the Python
    gateway would, nor than Triton reads it); it accepts every request as protobuf serializes it
    (what it refuses, such as an unknown group, goes to the Python gateway)."""
    from google.protobuf.message import DecodeError

    from cdl.errors import InvalidInputError
    from cdl.v1 import open_inference_pb2 as pb
    from services.gateway.dataplane import wire

    binary = lane_module.install_lane() if shutil.which("go") or IN_CI else None
    if binary is None:
        pytest.skip("no Go toolchain")
    requests = _requests(20_000)
    stdin = b"".join(struct.pack("<I", len(r)) + r for r, _ in requests)
    out = subprocess.run([str(binary), "--scan"], input=stdin, capture_output=True, timeout=120, check=True).stdout
    pos = accepted = valid = 0
    for data, pristine in requests:
        ok = out[pos]
        pos += 1
        parsed: Any = None
        with contextlib.suppress(DecodeError):
            parsed = pb.ModelInferRequest.FromString(data)
        if not ok:  # left to the Python gateway; never a request as a client library sends it
            assert not pristine, f"a valid request refused: {data[:80]!r}"
            continue
        fields = []
        for _ in range(3):
            (n,) = struct.unpack_from("<I", out, pos)
            fields.append(out[pos + 4 : pos + 4 + n].decode())
            pos += 4 + n
        accepted += 1
        try:
            assert tuple(fields) == wire.route_fields(data), data[:80]
        except InvalidInputError as exc:
            raise AssertionError(f"the lane accepts what the Python scan refuses ({exc}): {data[:80]!r}") from None
        if parsed is not None:
            valid += 1
            assert tuple(fields) == (parsed.model_name, parsed.model_version, parsed.id), data[:80]
    assert pos == len(out)
    assert accepted > 8000 and valid > 5000, (accepted, valid)
