"""The inference log's writer process: records built and produced beside the serving process.

Building an ``InferenceLogged`` record (parsing the request and the response,
the digest, the top labels, the CloudEvents headers) and producing it is
10-40 µs of Python per request. In the serving process it runs under the GIL
that the hot path needs (the log off, the gateway served up to a quarter more
requests a second on two busy cores). So, with ``log_writer="process"``, the
log thread of :class:`~services.gateway.inference_log.InferenceLog` only
pickles each round of offered requests (one ``pickle.dumps`` of the round's
tuples, ~1 µs a small request; it copies the request and response bytes, so a
round of large requests is held twice until the pipe takes it) and writes it
down a pipe to a child process that builds, produces and counts them. On a
machine with cores to spare that frees the serving process; on two shared
cores it measured a wash (see docs/gateway.md), so the default is the
in-process ``thread``.

Protocol: the child is ``python -m services.gateway.log_writer CONFIG_JSON``.
On its stdin, frames (each written in one call): a 4-byte little-endian length
and a pickled list of offered items; length 0 ends it (it flushes its producer
for at most ``FLUSH_S`` and exits). On its stdout (a copy of fd 1 taken at
start; fd 1 itself then points at stderr, so nothing else can write there),
after each frame and every ``REPORT_S`` when idle: 24 bytes, the records
taken from frames, sent and failed since its last report (``<qqq``). The
gateway counts sent and failed in ``cdl_gateway_log_sent_total`` and
``cdl_gateway_log_dropped_total{reason="kafka"}``; the child itself serves no
metrics. Pickle is safe here: both ends are the gateway's own.

Failures: the child ignores SIGTERM and SIGINT (they reach the gateway's
whole process group; the gateway then closes the log, and the child ends on
its end frame or when its stdin closes -- the gateway died, even by kill -9 --
after flushing). When the child dies, the records it was given and had not
taken yet, and each round until it runs again, are dropped and counted with
reason ``writer``; records it had taken and handed to its producer but Kafka
had not acknowledged are lost uncounted (at most the gateway's ``log_linger_ms`` of
them, when something kills the child itself). A child that dies is started
again after ``RESTART_S``, doubling up to ``MAX_RESTART_S`` while it keeps
dying young. A slow child (Kafka slow or away: its producer's queue is full)
stops reading its pipe; the log thread then blocks writing to it, the log's
bounded queue fills, and further requests are dropped and counted (``full``)
-- the hot path never waits.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cdl.logging import get_logger
from services.gateway.inference_log import LOG_DROPPED, LOG_SENT, RecordWriter, flush_unacknowledged

__all__ = ["WriterProcess", "main"]

log = get_logger(__name__)

_LEN = struct.Struct("<I")
_REPORT = struct.Struct("<qqq")
#: how often an idle child reports delivery failures
REPORT_S = 0.5
#: a child that died is started again this long after its start (doubling, up to MAX_RESTART_S,
#: while children die within YOUNG_S of their start)
RESTART_S = 1.0
MAX_RESTART_S = 30.0
YOUNG_S = 10.0
#: the child's last flush at the end frame (the gateway waits longer)
FLUSH_S = 3.0
_F_SETPIPE_SZ = 1031  # Linux: a larger pipe holds a few rounds, so the log thread rarely waits
_PIPE_BYTES = 1 << 20


def _grow_pipe(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)


class WriterProcess:
    """The gateway's side of the writer process: a :class:`~services.gateway.inference_log.RoundWriter`
    for :class:`~services.gateway.inference_log.InferenceLog`'s thread (the only caller)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        source: str,
        inputs_max_bytes: int = 4096,
        producer_config: dict[str, Any] | None = None,
    ) -> None:
        self._config = json.dumps(
            {
                "bootstrap": bootstrap,
                "topic": topic,
                "source": source,
                "inputs_max_bytes": inputs_max_bytes,
                "producer": producer_config or {},
            }
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._backoff = RESTART_S
        self._pending = b""
        self._inflight = 0  # records written to the child and not reported yet
        self._lock = threading.Lock()  # a restart against close, which may come from another thread
        self._closed = False
        self.restarts = -1
        """Times the child was started again (0 after the first start)."""
        self._dropped_writer = LOG_DROPPED.labels(reason="writer")
        self._dropped_kafka = LOG_DROPPED.labels(reason="kafka")
        self._start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        root = str(Path(__file__).resolve().parent.parent.parent)  # the checkout holding services/
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
        self._started = time.monotonic()
        self.restarts += 1
        self._pending = b""
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "services.gateway.log_writer", self._config],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        _grow_pipe(self._proc.stdin.fileno())
        os.set_blocking(self._proc.stdout.fileno(), False)
        log.info("inference log writer process started", pid=self._proc.pid, restarts=self.restarts)

    def _alive(self) -> bool:
        """Whether a child runs; one that died is started again (see RESTART_S)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            return True
        if proc is not None:
            self._read_reports()
            # what it was given and had not taken is lost with it
            log.warning(
                "inference log writer process died",
                pid=proc.pid,
                exitcode=proc.returncode,
                records_lost=self._inflight,
            )
            self._dropped_writer.inc(self._inflight)
            self._inflight = 0
            self._reap(proc)
            self._proc = None
            young = time.monotonic() - self._started < YOUNG_S
            self._backoff = min(MAX_RESTART_S, self._backoff * 2) if young else RESTART_S
        if time.monotonic() - self._started < self._backoff:
            return False
        with self._lock:
            if self._closed:
                return False
            try:
                self._start()
            except OSError as exc:  # not even started: try again later
                self._started = time.monotonic()
                log.error("inference log writer process could not be started", error=str(exc))
                return False
        return True

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> None:
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1)

    def _read_reports(self) -> None:
        """Count what the child reported so far (never blocks)."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        with contextlib.suppress(OSError, ValueError):  # nothing to read yet, or the pipe is gone
            self._count(os.read(proc.stdout.fileno(), 1 << 16))

    def _count(self, data: bytes) -> None:
        data = self._pending + data
        whole = len(data) - len(data) % _REPORT.size
        taken = sent = failed = 0
        for t, s_, f in _REPORT.iter_unpack(data[:whole]):
            taken += t
            sent += s_
            failed += f
        self._pending = data[whole:]
        self._inflight = max(0, self._inflight - taken)
        if sent:
            LOG_SENT.inc(sent)
        if failed:
            self._dropped_kafka.inc(failed)

    def write(self, items: list[Any]) -> None:
        if not self._alive():
            self._dropped_writer.inc(len(items))
            return
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        frame = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            proc.stdin.write(_LEN.pack(len(frame)) + frame)  # one call: a frame is never split
            proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            self._dropped_writer.inc(len(items))
            return
        self._inflight += len(items)
        self._read_reports()

    def idle(self) -> None:
        if self._alive():
            self._read_reports()

    def close(self, timeout_s: float = 5.0, abandon: bool = False) -> None:
        """End the child after it flushed its producer (within ``timeout_s``; killed past it).
        ``abandon``: the log thread may still be writing to it (it did not stop in time), so
        nothing more is written: the child is killed, and what it was given counts as lost."""
        with self._lock:
            self._closed = True
            proc, self._proc = self._proc, None
        if proc is None:
            return
        if abandon:
            proc.kill()
        else:
            try:
                assert proc.stdin is not None
                proc.stdin.write(_LEN.pack(0))
                proc.stdin.flush()
                proc.stdin.close()
            except (BrokenPipeError, ValueError, OSError):
                pass
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("inference log writer process did not end; killed", pid=proc.pid)
            proc.kill()
            proc.wait(5)
        with contextlib.suppress(OSError, ValueError):  # its last reports
            assert proc.stdout is not None
            os.set_blocking(proc.stdout.fileno(), True)
            self._count(proc.stdout.read() or b"")
        if self._inflight:  # killed before it took them
            self._dropped_writer.inc(self._inflight)
            self._inflight = 0
        self._reap(proc)


# ------------------------------------------------------------------ the child


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def main(argv: list[str] | None = None) -> None:
    """The child: frames from stdin, records to Kafka, counts to stdout (see the module docstring)."""
    from cdl.kafka import Producer
    from cdl.logging import configure_logging

    # the gateway's process group gets SIGTERM and SIGINT: the gateway closes the log, and this
    # process ends on its end frame (or EOF) after flushing, not at once
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # reports go to a copy of fd 1; fd 1 (print, C libraries) goes to stderr
    stdout = os.dup(1)
    os.dup2(2, 1)
    configure_logging("gateway-log-writer", os.environ.get("CDL_GATEWAY_LOG_LEVEL", "INFO"))
    config = json.loads((argv if argv is not None else sys.argv[1:])[0])
    # the gateway's log producer settings (its log_linger_ms among them)
    producer = Producer(
        config["bootstrap"], client_id="cdl-gateway-log", **{"delivery.report.only.error": True, **config["producer"]}
    )
    writer = RecordWriter(producer, config["topic"], config["source"], config["inputs_max_bytes"], counted=False)
    stdin = sys.stdin.fileno()
    taken = 0
    reported = (0, 0, 0)

    def report() -> None:
        nonlocal reported
        now = (taken, writer.sent, writer.failed)
        if now != reported:
            os.write(stdout, _REPORT.pack(*(a - b for a, b in zip(now, reported, strict=True))))
            reported = now

    try:
        while True:
            ready, _, _ = select.select([stdin], [], [], REPORT_S)
            if not ready:
                writer.idle()
                report()
                continue
            try:
                (size,) = _LEN.unpack(_read_exact(stdin, _LEN.size))
                if size == 0:
                    break
                items = pickle.loads(_read_exact(stdin, size))
            except EOFError:  # the gateway is gone
                break
            taken += len(items)
            writer.write(items)
            report()
    finally:
        writer.failed += flush_unacknowledged(producer, FLUSH_S)
        writer.idle()
        with contextlib.suppress(OSError):
            report()


if __name__ == "__main__":
    main()
