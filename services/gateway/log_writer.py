"""The inference log's writer process: records built and produced beside the serving process.

Building an ``InferenceLogged`` record (parsing the request and the response,
the digest, the top labels, the CloudEvents headers) and producing it is
10-40 µs of Python per request. In the serving process it runs under the GIL
that the hot path needs (the log off, the gateway served up to a quarter more
requests a second on two busy cores). So, with ``log_writer="process"``, the log thread
of :class:`~services.gateway.inference_log.InferenceLog` only pickles each
round of offered requests (one ``pickle.dumps`` of a list of tuples of
references, ~1 µs a request) and writes it down a pipe to a child process
that builds, produces and counts them. On a machine with cores to spare that
frees the serving process; on two shared cores it measured a wash (see
docs/gateway.md), so the default is the in-process ``thread``.

Protocol: the child is ``python -m services.gateway.log_writer CONFIG_JSON``.
On its stdin, frames: a 4-byte little-endian length and a pickled list of
offered items; length 0 ends it (it flushes its producer and exits). On its
stdout, after each frame and every ``REPORT_S`` when idle: 16 bytes, the
records sent and the records failed since its last report (``<qq``). The
gateway counts them in ``cdl_gateway_log_sent_total`` and
``cdl_gateway_log_dropped_total{reason="kafka"}``; the child itself serves no
metrics. Pickle is safe here: both ends are the gateway's own.

Failures: the child ends when its stdin closes (the gateway died, even by
kill -9) after flushing what it holds. When the child dies, the round being
written and each round until it is running again (started again at most
once a second) are dropped and counted with reason ``writer``. A slow child
(Kafka slow or away: its producer's queue is full) stops reading its pipe;
the log thread then blocks writing to it, the log's bounded queue fills, and
further requests are dropped and counted (``full``) -- the hot path never
waits.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cdl.errors import UnavailableError
from cdl.logging import get_logger
from services.gateway.inference_log import LOG_DROPPED, LOG_SENT, RecordWriter

__all__ = ["WriterProcess", "main"]

log = get_logger(__name__)

_LEN = struct.Struct("<I")
_REPORT = struct.Struct("<qq")
#: how often an idle child reports delivery failures
REPORT_S = 0.5
#: a child that died is started again after this long
RESTART_S = 1.0
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
        """Whether a child runs; one that died is started again (at most once every RESTART_S)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            return True
        if proc is not None:
            self._read_reports()
            # what it was given and never reported on is lost with it
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
        if time.monotonic() - self._started < RESTART_S:
            return False
        with self._lock:
            if self._closed:
                return False
            self._start()
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
        try:
            self._count(os.read(proc.stdout.fileno(), 1 << 16))
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ValueError):
            return

    def _count(self, data: bytes) -> None:
        data = self._pending + data
        whole = len(data) - len(data) % _REPORT.size
        sent = failed = 0
        for s, f in _REPORT.iter_unpack(data[:whole]):
            sent += s
            failed += f
        self._pending = data[whole:]
        self._inflight = max(0, self._inflight - sent - failed)
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
            proc.stdin.write(_LEN.pack(len(frame)))
            proc.stdin.write(frame)
            proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            self._dropped_writer.inc(len(items))
            return
        self._inflight += len(items)
        self._read_reports()

    def idle(self) -> None:
        if self._alive():
            self._read_reports()

    def close(self, timeout_s: float = 5.0) -> None:
        """End the child after it flushed its producer (within ``timeout_s``; killed past it)."""
        with self._lock:
            self._closed = True
            proc, self._proc = self._proc, None
        if proc is None:
            return
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
        if self._inflight:  # killed before it reported on them
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

    configure_logging("gateway-log-writer", os.environ.get("CDL_GATEWAY_LOG_LEVEL", "INFO"))
    config = json.loads((argv if argv is not None else sys.argv[1:])[0])
    # a log's records may wait: 50 ms batches make fewer, larger produce requests, which cost
    # the broker (on the gateway's machine, in the local stack) less per record
    producer = Producer(
        config["bootstrap"],
        client_id="cdl-gateway-log",
        **{"delivery.report.only.error": True, "linger.ms": 50, **config["producer"]},
    )
    writer = RecordWriter(producer, config["topic"], config["source"], config["inputs_max_bytes"], counted=False)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    reported = (0, 0)

    def report() -> None:
        nonlocal reported
        now = (writer.sent, writer.failed)
        if now != reported:
            os.write(stdout, _REPORT.pack(now[0] - reported[0], now[1] - reported[1]))
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
            writer.write(items)
            report()
    finally:
        try:
            producer.flush(5)
        except UnavailableError as exc:  # what is not acknowledged by now is counted, not raised
            remaining = exc.context.get("remaining")
            writer.failed += remaining if isinstance(remaining, int) else 0
            log.warning("inference log writer: records not acknowledged at exit", error=str(exc))
        writer.idle()
        with contextlib.suppress(OSError):
            report()


if __name__ == "__main__":
    main()
