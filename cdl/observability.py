"""Health and Prometheus metrics over HTTP, one helper for every service.

``serve_http(port, health)`` answers ``/metrics`` (Prometheus text format),
``/healthz`` (liveness: no loop of the process is stuck, :mod:`cdl.liveness`; 503
naming the stuck loop and step otherwise) and ``/readyz`` (the ``health``
callback says the service can do its work).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest

from cdl.liveness import WATCHDOG

__all__ = ["CONSUME_ERRORS", "EVENTS", "HANDLER_SECONDS", "HttpEndpoint", "count_consume_error", "serve_http"]

#: events seen by consumer loops, by topic, group and outcome
EVENTS = Counter(
    "cdl_events_total",
    "Kafka records handled by cdl consumer loops",
    ["topic", "group", "outcome"],
)
#: handler duration per group
HANDLER_SECONDS = Histogram(
    "cdl_handler_seconds",
    "Time spent in event handlers",
    ["group"],
    buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10, 60, 300, 1800),
)

#: errors a Kafka consumer reported instead of a record, by librdkafka's error name
CONSUME_ERRORS = Counter(
    "cdl_kafka_consume_errors_total",
    "Errors Kafka consumers reported while consuming (end-of-partition events are not errors)",
    ["code"],
)


def count_consume_error(code: str, count: int = 1) -> None:
    """Count ``count`` consume errors of ``code``: librdkafka's error name, as ``KafkaError.name()``
    gives it (e.g. ``_TRANSPORT``, ``UNKNOWN_TOPIC_OR_PART``)."""
    CONSUME_ERRORS.labels(code=code).inc(count)


HealthFn = Callable[[], tuple[bool, dict[str, object]]]


def _always_ready() -> tuple[bool, dict[str, object]]:
    return True, {}


class HttpEndpoint:
    """A running health + metrics HTTP server."""

    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_http(
    port: int = 0,
    health: HealthFn = _always_ready,
    host: str = "127.0.0.1",
    registry: CollectorRegistry = REGISTRY,
) -> HttpEndpoint:
    """Start the endpoint in a daemon thread; ``port=0`` picks a free port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                live, details = WATCHDOG.live()
                body = json.dumps({"status": "live" if live else "not live", **details}, default=str).encode()
                self._send(200 if live else 503, body, "application/json")
            elif path == "/readyz":
                ok, details = health()
                body = json.dumps({"status": "ready" if ok else "not ready", **details}, default=str).encode()
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b"not found", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return None

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="cdl-http", daemon=True)
    thread.start()
    return HttpEndpoint(server, thread)
