"""Tracing with the OpenTelemetry SDK: one trace per model version's way through the loop.

Every cdl event carries a W3C ``traceparent`` (cdl.events). A service handling an event
opens a span whose parent is that traceparent (:func:`span`), and the events it publishes
while the span is open carry the span's context (``Event.caused`` asks
:func:`current_traceparent`). So a dataset version's trace runs ingest (the version cut) →
trainer → compressor → gateway (load, warm-up, rollout) → the rollout's transitions, each
service's spans in its own process, joined by the traceparent. The gateway gives sampled
requests a span of their own (``CDL_GATEWAY_TRACE_SAMPLE``).

Exporter (``CDL_TRACE_EXPORTER``, or a service's own ``CDL_<SERVICE>_TRACE_EXPORTER``):

- ``file`` (default): finished spans as JSON lines in ``<state dir>/traces/<service>-<pid>.jsonl``
  (``CDL_TRACE_FILE`` to change), batched off the hot path; ``cdl trace`` reads them;
- ``otlp``: OTLP/gRPC to ``CDL_OTLP_ENDPOINT`` (a collector, Jaeger, Tempo);
- ``console``: spans printed to standard output;
- ``none``: no spans recorded (the traceparent still travels with the events).

docs/operations.md shows how to view one trace.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

__all__ = [
    "JsonLinesExporter",
    "current_traceparent",
    "find_trace",
    "parse_traceparent",
    "read_spans",
    "setup",
    "span",
    "span_row",
]

_LOCK = threading.Lock()
_SERVICE: dict[str, str] = {}


def span_row(s: ReadableSpan) -> dict[str, Any]:
    """A finished span as the file exporter writes it (and ``cdl trace`` reads it)."""
    ctx = s.get_span_context()
    parent = s.parent
    return {
        "trace_id": f"{ctx.trace_id:032x}" if ctx else "",
        "span_id": f"{ctx.span_id:016x}" if ctx else "",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else "",
        "name": s.name,
        "service": str(s.resource.attributes.get("service.name", "")),
        "start_ns": s.start_time or 0,
        "end_ns": s.end_time or 0,
        "status": s.status.status_code.name,
        "attributes": {
            k: v if isinstance(v, str | int | float | bool) else str(v) for k, v in (s.attributes or {}).items()
        },
    }


class JsonLinesExporter(SpanExporter):
    """Finished spans appended to a file, one JSON object per line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_row(s)) + "\n" for s in spans)
        with self._lock:
            try:
                self._file.write(lines)
                self._file.flush()
            except OSError:  # a full disk loses spans, never the service
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def _setting(settings: Any, name: str, default: str) -> str:
    own = str(getattr(settings, name, "") or "")
    return own or os.environ.get(f"CDL_{name.upper()}", "") or default


def setup(service: str, settings: Any) -> None:
    """Install the process's tracer provider for ``service`` (once; later calls do nothing)."""
    with _LOCK:
        if _SERVICE:
            return
        _SERVICE["name"] = service
        exporter_name = _setting(settings, "trace_exporter", "file")
        if exporter_name == "none":
            return
        provider = TracerProvider(resource=Resource.create({"service.name": f"cdl-{service}"}))
        exporter: SpanExporter
        if exporter_name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            endpoint = _setting(settings, "otlp_endpoint", "localhost:4317")
            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https"))
        elif exporter_name == "console":
            exporter = ConsoleSpanExporter()
        else:
            state_dir = Path(getattr(settings, "state_dir", "") or ".")
            # one file per process: two processes of one service never write to one file
            default = state_dir / "traces" / f"{service}-{os.getpid()}.jsonl"
            path = Path(_setting(settings, "trace_file", str(default)))
            exporter = JsonLinesExporter(path)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
        trace.set_tracer_provider(provider)


def parse_traceparent(traceparent: str) -> SpanContext | None:
    """The span context a W3C traceparent names (None when it is not one)."""
    parts = traceparent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 1))


@contextlib.contextmanager
def span(name: str, traceparent: str | None = None, attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """A span, child of ``traceparent`` when given (else of the current span, or a new trace)."""
    tracer = trace.get_tracer("cdl")
    ctx = None
    parent = parse_traceparent(traceparent) if traceparent else None
    if parent is not None:
        ctx = trace.set_span_in_context(NonRecordingSpan(parent))
    attrs = {k: v for k, v in (attributes or {}).items() if isinstance(v, str | int | float | bool)}
    with tracer.start_as_current_span(name, context=ctx, attributes=attrs) as s:
        yield s


def current_traceparent() -> str | None:
    """The traceparent of the current span, when one is recording (None otherwise)."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def read_spans(trace_dir: Path) -> list[dict[str, Any]]:
    """Every span the file exporters of a stack wrote (``<state dir>/traces``); unreadable lines skipped."""
    rows = []
    for path in sorted(trace_dir.glob("*.jsonl")):
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and row.get("trace_id"):
                    rows.append(row)
    return rows


def find_trace(spans: list[dict[str, Any]], model: str, version: int) -> str:
    """The trace id of ``model``'s ``version``: the trace of the span that handled its
    ``model.trained`` (the compressor's) or of a rollout step of it (the gateway's); spans that
    name a *dataset* version (ingest's, the trainer's) are not model versions and do not count."""
    named = [
        s
        for s in spans
        if s["attributes"].get("cdl.model") == model
        and s["attributes"].get("cdl.version") == version
        and "cdl.dataset" not in s["attributes"]
    ]
    named.sort(key=lambda s: (s["attributes"].get("cdl.event.type") != "dev.cdl.model.trained.v1", s["start_ns"]))
    return str(named[0]["trace_id"]) if named else ""
