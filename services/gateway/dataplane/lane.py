"""The gateway's native data plane: the Go lane process (``services/gateway/dataplane/lane``), driven from here.

With ``data_plane`` native (or auto where Go builds it) the lane serves the
gateway's public gRPC port and this process's ``grpc.aio`` server listens on a
unix socket behind it. The lane serves ModelInfer's common path itself and
hands every other call and case to the Python server (see the Go package's
doc comment for exactly which); the Python server stays the one place that
decides errors, canary retries and shadow mirroring. With ``--http-listen``
the lane serves the REST/HTTP v2 port the same way: infer on the common path
forwarded to a Triton server's HTTP port, everything else to this process's
REST server (:mod:`services.gateway.dataplane.rest`) on a unix socket.

:class:`NativeLane` starts the lane, and:

- at once on :meth:`changed` (the routing table and the pool call it on each
  change) and, as a safety net, every ``SYNC_S``, writes the routing table
  and the Triton servers the pool holds ready to the lane's stdin, when they
  changed (the table is replaced as a whole on each change, so a change is a
  new object); the lane acknowledges each line once applied
  (:meth:`in_step`);
- reads the lane's stdout in a thread: each request the lane served
  (version, status, latency, and for a request sampled for the log its
  request and response bytes) goes to ``on_served`` -- the hot path's
  reporting, so outcomes, metrics and the inference log count it as their
  own -- and the lane's stats (outstanding per server, hand-offs, frames it
  dropped) are kept for Prometheus;
- starts the lane again (after ``RESTART_S``, on the same port) when it dies,
  counting ``cdl_gateway_lane_restarts_total``.

Closing the lane's stdin stops it (it finishes what is in flight); it also
stops when this process dies, even killed -9, as the pipe closes then.
Transport-free: a subprocess and two pipes, no grpc or Kafka here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cdl import native
from cdl.errors import CdlError
from cdl.logging import get_logger
from cdl.settings import cdl_home
from services.gateway.inference_log import LOG_DROPPED
from services.gateway.routing import Route

__all__ = [
    "PROGRAM",
    "RESTARTS",
    "LaneServed",
    "LaneServedHttp",
    "NativeLane",
    "install_lane",
    "lane_binary",
    "source_hash",
]

log = get_logger(__name__)

#: the sync's safety net: changes wake it at once (:meth:`NativeLane.changed`); an idle gateway
#: wakes this often, not 50 times a second
SYNC_S = 1.0
RESTART_S = 1.0
MODULE = Path(__file__).with_name("lane")

RESTARTS = Counter("cdl_gateway_lane_restarts_total", "Times the gateway's native lane was started again after it died")

_U32 = struct.Struct("<I")
#: a served frame after its kind byte: code, version, latency_s, time, then four lengths
_SERVED = struct.Struct("<BIddIIII")
#: a request served over REST: as a served frame, then the JSON part's length of each body
_SERVED_HTTP = struct.Struct("<BIddIIIIII")
_READY, _SERVED_KIND, _STATS, _ACK, _SERVED_HTTP_KIND = 0, 1, 2, 3, 4


class LaneServed(Protocol):
    """Where the lane's served requests go (``InferenceService.lane_served``)."""

    def __call__(
        self,
        model: str,
        version: int,
        code: int,
        latency_s: float,
        when: float,
        request_id: str,
        request: bytes,
        response: bytes,
    ) -> None: ...


class LaneServedHttp(Protocol):
    """Where the lane's requests served over REST go (``InferenceService.lane_served_http``):
    the bodies as sent to and answered by Triton, and each one's JSON length (0: all JSON)."""

    def __call__(
        self,
        model: str,
        version: int,
        latency_s: float,
        when: float,
        request_id: str,
        request: bytes,
        response: bytes,
        request_json_length: int,
        response_json_length: int,
    ) -> None: ...


#: the lane's installed program: on ``PATH`` (scripts/setup.sh installs it in ``$CDL_HOME/bin``,
#: the gateway's image in ``/usr/local/bin``), else in ``$CDL_HOME/bin``
PROGRAM = "cdl-gwlane"


def source_hash(module: Path = MODULE) -> str:
    """SHA-256 of the lane's sources (``*.go``, ``go.mod``, ``go.sum``): which sources a program was
    built from. Empty where the sources are not there (an image that ships only the program)."""
    files = sorted([*module.glob("*.go"), *(module / n for n in ("go.mod", "go.sum") if (module / n).exists())])
    if not files:
        return ""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def install_lane(bin_dir: Path | None = None) -> Path:
    """Build the lane (once per source fingerprint, :func:`cdl.native.go_program`) and install it
    as ``bin_dir/cdl-gwlane`` (default ``$CDL_HOME/bin``): what set-up and the test session
    run, never the gateway. A :class:`CdlError` where it cannot be built."""
    built = native.go_program(MODULE, "gwlane")
    if built is None:
        raise CdlError("the gateway's native lane could not be built (a Go toolchain is needed)")
    target = (bin_dir or cdl_home() / "bin") / PROGRAM
    if not target.exists() or target.read_bytes() != built.read_bytes():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{PROGRAM}.{os.getpid()}")
        shutil.copyfile(built, tmp)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    # which sources it was built from: a gateway of newer sources does not run an older lane
    target.with_name(f"{PROGRAM}.source").write_text(source_hash() + "\n")
    return target


def lane_binary(data_plane: str, path: str = "") -> Path | None:
    """The installed lane for ``data_plane`` (``native``, ``auto``, ``python``): ``path`` (the
    ``lane_path`` setting), else ``cdl-gwlane`` on ``PATH`` or in ``$CDL_HOME/bin``. The gateway
    never builds it. None for python, and for auto where none is installed (a warning);
    native requires it (:class:`CdlError`)."""
    if data_plane == "python":
        return None
    candidates = (
        [Path(path)] if path else [Path(p) for p in (shutil.which(PROGRAM),) if p] + [cdl_home() / "bin" / PROGRAM]
    )
    found = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
    stale = ""
    if found is not None:
        recorded = found.with_name(f"{found.name}.source")
        current = source_hash()
        if recorded.exists() and current and recorded.read_text().strip() != current:
            stale = f"{found} was built from other sources than this gateway's (run scripts/setup.sh)"
            found = None
    if stale:
        if data_plane == "native":
            raise CdlError(f"data_plane=native, but {stale}")
        log.warning("the installed native lane is stale: the gateway serves its port in Python", reason=stale)
    elif found is None:
        where = path or f"{PROGRAM} on PATH or in {cdl_home() / 'bin'}"
        if data_plane == "native":
            raise CdlError(
                f"data_plane=native, but no native lane is installed ({where}; scripts/setup.sh installs it)"
            )
        log.warning("no native lane installed: the gateway serves its port in Python", looked_for=where)
    return found


def _routes_line(routes: Mapping[str, Route]) -> dict[str, list[float]]:
    return {m: [r.stable, r.candidate, r.canary, r.shadow] for m, r in routes.items()}


class NativeLane:
    """The lane process and its pipes; see the module docstring."""

    def __init__(
        self,
        binary: Path,
        args: Sequence[str],
        on_served: LaneServed,
        routes: Callable[[], Mapping[str, Route]],
        ready: Callable[[], Sequence[str]],
        on_served_http: LaneServedHttp | None = None,
        keys: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        """``args``: the lane's flags (``--listen`` among them, ``--http-listen`` for the REST
        port); ``routes``/``ready``: read by the sync thread (the routing table's current dict,
        the endpoints of the ready servers); ``on_served_http``: requests served over REST;
        ``keys``: the inference keys' digests now, sent when they rotate (and to a restarted lane)."""
        self._keys = keys
        self._sent_keys: tuple[str, ...] | None = None
        self._binary = binary
        self._args = list(args)
        self._on_served = on_served
        self._on_served_http = on_served_http
        self._routes = routes
        self._ready = ready
        self._proc: subprocess.Popen[bytes] | None = None
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._generation = 0
        self._log_dropped = 0
        self._port = 0
        self._http_port = 0
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._started = threading.Event()
        self._lock = threading.Lock()
        self.stats: dict[str, Any] = {}
        """The lane's last stats frame (outstanding per server, delegated, dropped)."""
        self._threads: list[threading.Thread] = []
        self._collector = _LaneCollector(self)
        REGISTRY.register(self._collector)

    @property
    def port(self) -> int:
        return self._port

    @property
    def http_port(self) -> int:
        """The REST port it serves (0: none)."""
        return self._http_port

    def alive(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None and self._started.is_set()

    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout_s: float = 30.0) -> int:
        """Start the lane; the port it serves, once it says it is ready."""
        self._spawn()
        if not self._started.wait(timeout_s):
            self.close()
            raise CdlError("the gateway's native lane did not start", timeout_s=timeout_s)
        for target, name in ((self._sync, "cdl-gateway-lane-sync"), (self._supervise, "cdl-gateway-lane")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self._port

    def in_step(self) -> bool:
        """Whether the lane routes by the table as it is now and knows the servers ready now
        (it acknowledged what the sync sent of them)."""
        routes, ready, seq = self._sent
        return routes is self._routes() and ready == tuple(self._ready()) and self._acked >= seq > 0

    def barrier(self, timeout_s: float = 10.0) -> None:
        """Wait until every request the lane answered so far has been handed to ``on_served``
        (the lane acknowledges a control line behind the reports it queued before it)."""
        seq = self._next_seq()
        if not self._write({"seq": seq}):
            raise CdlError("the gateway's native lane is not running")
        deadline = time.monotonic() + timeout_s
        while self._acked < seq:
            if time.monotonic() > deadline:
                raise CdlError("the gateway's native lane did not acknowledge", timeout_s=timeout_s)
            self._closing.wait(0.005)

    def _next_seq(self) -> int:
        with self._seq_lock:
            self._seq += 1
            return self._seq

    def changed(self) -> None:
        """The routing table or the servers changed: tell the lane now, not at the next sync."""
        self._wake.set()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the lane (it finishes what is in flight) and the threads."""
        self._closing.set()
        self._wake.set()
        proc = self._proc
        if proc is not None:
            with self._lock, contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for t in self._threads:
            t.join(timeout_s)
        with contextlib.suppress(KeyError):
            REGISTRY.unregister(self._collector)

    # ------------------------------------------------------------------ process

    def _spawn(self) -> None:
        args = list(self._args)
        for flag, port in (("--listen=", self._port), ("--http-listen=", self._http_port)):
            if port:  # started again: the port it had
                args = [a if not a.startswith(flag) else f"{a.rsplit(':', 1)[0]}:{port}" for a in args]
        # each start names its ids apart from the last one's (its counter starts again at 1)
        args = [f"{a}{self._generation}." if a.startswith("--id-prefix=") else a for a in args]
        if self._keys is not None:  # a lane restarted after a rotation starts with the keys of now
            keys = ",".join(self._keys())
            args = [f"--key-hashes={keys}" if a.startswith("--key-hashes=") else a for a in args]
        self._generation += 1
        self._log_dropped = 0  # the new lane counts from 0
        self._started.clear()
        proc = subprocess.Popen(
            [str(self._binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=False
        )
        self._proc = proc
        self._sent: tuple[Any, Any, int] = (None, None, 0)
        self._sent_keys = None  # a new lane: its flags' keys may be older than the rotated ones
        self._acked = 0
        reader = threading.Thread(target=self._read, args=(proc,), name="cdl-gateway-lane-frames", daemon=True)
        reader.start()
        self._reader = reader

    def _supervise(self) -> None:
        """Start the lane again when it dies (not when closed)."""
        while not self._closing.is_set():
            proc = self._proc
            assert proc is not None
            code = proc.wait()
            self._reader.join()
            if self._closing.is_set():
                return
            log.error("the gateway's native lane died; starting it again", code=code, port=self._port)
            RESTARTS.inc()
            if self._closing.wait(RESTART_S):
                return
            try:
                self._spawn()
            except OSError as exc:
                log.error("the gateway's native lane cannot be started", error=str(exc))
                continue
            self._wake.set()

    # ------------------------------------------------------------------ control (stdin)

    def _write(self, msg: Mapping[str, Any]) -> bool:
        proc = self._proc
        if proc is None or proc.stdin is None:
            return False
        line = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            try:
                proc.stdin.write(line)
                proc.stdin.flush()
            except (OSError, ValueError):  # it died (the supervisor starts it again) or is closing
                return False
        return True

    def _sync(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(SYNC_S)
            self._wake.clear()
            if self._closing.is_set() or not self._started.is_set():
                continue
            try:
                routes, ready = self._routes(), tuple(self._ready())
                sent_routes, sent_ready, _ = self._sent
                msg: dict[str, Any] = {}
                if routes is not sent_routes:
                    msg["routes"] = _routes_line(routes)
                if ready != sent_ready:
                    msg["ready"] = list(ready)
                keys = tuple(self._keys()) if self._keys is not None else None
                if keys is not None and keys != self._sent_keys:
                    msg["keys"] = list(keys)
                if msg:
                    msg["seq"] = seq = self._next_seq()
                    if self._write(msg):
                        self._sent = (routes, ready, seq)
                        if "keys" in msg:
                            self._sent_keys = keys
            except Exception:  # the sync must never stop
                log.exception("gateway lane sync failed")

    # ------------------------------------------------------------------ frames (stdout)

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        buf = bytearray()  # what was read and not yet taken apart: at most one partial frame
        need = 5  # bytes the next frame needs before it can be taken apart
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk  # amortised; a large frame arriving in pieces is copied once, when whole
            if len(buf) < need:
                continue
            data = bytes(buf)
            pos, end = 0, len(data)
            need = 5
            while end - pos >= 5:
                (n,) = _U32.unpack_from(data, pos)
                if end - pos - 4 < n:
                    need = 4 + n
                    break
                body = pos + 4
                pos = body + n
                try:
                    self._frame(data, body, pos)
                except Exception:  # a frame must never stop the reader
                    log.exception("gateway lane frame not read")
            del buf[:pos]
        with contextlib.suppress(OSError):
            proc.stdout.close()

    def _frame(self, buf: bytes, start: int, end: int) -> None:
        kind = buf[start]
        if kind == _SERVED_KIND:
            code, version, latency, when, lm, li, lq, lr = _SERVED.unpack_from(buf, start + 1)
            model, request_id, request, response = _payload(buf, start + 1 + _SERVED.size, lm, li, lq, lr)
            self._on_served(model, version, code, latency, when, request_id, request, response)
        elif kind == _SERVED_HTTP_KIND:
            _, version, latency, when, lm, li, lq, lr, hq, hr = _SERVED_HTTP.unpack_from(buf, start + 1)
            model, request_id, request, response = _payload(buf, start + 1 + _SERVED_HTTP.size, lm, li, lq, lr)
            if self._on_served_http is not None:
                self._on_served_http(model, version, latency, when, request_id, request, response, hq, hr)
        elif kind == _STATS:
            self.stats = stats = json.loads(buf[start + 1 : end])
            dropped = int(stats.get("log_dropped", 0))
            if dropped > self._log_dropped:  # records the lane kept from a slow reader: the log's drops
                LOG_DROPPED.labels(reason="full").inc(dropped - self._log_dropped)
            self._log_dropped = dropped
        elif kind == _ACK:
            (self._acked,) = _U32.unpack_from(buf, start + 1)
        elif kind == _READY:
            (self._port,) = _U32.unpack_from(buf, start + 1)
            if end - start >= 9:
                (self._http_port,) = _U32.unpack_from(buf, start + 5)
            self._started.set()
            self._wake.set()  # a lane (started again or not) gets the table and the servers at once


def _payload(buf: bytes, p: int, lm: int, li: int, lq: int, lr: int) -> tuple[str, str, bytes, bytes]:
    """A served frame's model, request id, request and response, from ``p`` with those lengths."""
    q = p + lm + li
    return buf[p : p + lm].decode(), buf[p + lm : q].decode(), buf[q : q + lq], buf[q + lq : q + lq + lr]


class _LaneCollector(Collector):
    """``cdl_gateway_lane_*``, read from the lane's last stats at scrape time."""

    def __init__(self, lane: NativeLane) -> None:
        self._lane = lane

    def collect(self) -> Any:
        stats = self._lane.stats
        g = GaugeMetricFamily(
            "cdl_gateway_lane_outstanding",
            "Requests the native lane has in flight per Triton server",
            labels=["server"],
        )
        for server, n in (stats.get("outstanding") or {}).items():
            g.add_metric([server], n)
        yield g
        yield CounterMetricFamily(
            "cdl_gateway_lane_delegated",
            "ModelInfer requests the native lane handed to the Python server",
            value=stats.get("delegated", 0),
        )
        yield CounterMetricFamily(
            "cdl_gateway_lane_reports_dropped",
            "Served-request reports the native lane dropped (this process did not read them in time)",
            value=stats.get("dropped", 0),
        )
        up = GaugeMetricFamily("cdl_gateway_lane_up", "Whether the native lane is serving")
        up.add_metric([], 1.0 if self._lane.alive() else 0.0)
        yield up
