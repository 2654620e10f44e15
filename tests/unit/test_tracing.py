"""Tracing: spans are children of the event they handle, the events they cause carry the span,
and the file exporter writes what `cdl trace` reads (in a subprocess: a tracer provider is
set once per process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cdl.tracing import find_trace, parse_traceparent, read_spans

SCRIPT = """
import sys
from types import SimpleNamespace
from opentelemetry import trace
from cdl import tracing
from cdl.events import Event
from cdl.v1 import events_pb2

tracing.setup("trainer", SimpleNamespace(trace_exporter="file", trace_file=sys.argv[1], state_dir="."))
cut = Event(events_pb2.DataUpdated(dataset="digits", version=3), source="/cdl/ingest")
with tracing.span("trainer dev.cdl.data.updated.v1", cut.traceparent, {"cdl.dataset": "digits", "cdl.version": 3}):
    trained = cut.caused(events_pb2.ModelTrained(model="digits", version=2), "/cdl/trainer")
    inner = tracing.current_traceparent()
with tracing.span("compressor", trained.traceparent, {"cdl.model": "digits", "cdl.version": 2, "skip": [1]}):
    pass
outside = cut.caused(events_pb2.ModelTrained(model="digits", version=9), "/cdl/trainer")
trace.get_tracer_provider().shutdown()
print(cut.traceparent, trained.traceparent, inner, outside.traceparent)
"""


def test_a_trace_follows_the_events(tmp_path: Path) -> None:
    path = tmp_path / "traces" / "trainer.jsonl"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, timeout=120, check=True
    )
    cut, trained, inner, outside = out.stdout.split()
    assert trained == inner  # the event caused inside the span carries the span
    assert cut.split("-")[1] == trained.split("-")[1] == outside.split("-")[1]  # one trace
    assert outside.split("-")[2] not in (cut.split("-")[2], trained.split("-")[2])  # no span: a fresh child id
    spans = read_spans(tmp_path / "traces")
    assert [s["name"] for s in spans] == ["trainer dev.cdl.data.updated.v1", "compressor"]
    first, second = spans
    assert first["service"] == "cdl-trainer" and first["parent_id"] == cut.split("-")[2]
    assert second["parent_id"] == first["span_id"] and second["trace_id"] == cut.split("-")[1]
    assert "skip" not in second["attributes"] and second["end_ns"] >= second["start_ns"] > 0
    assert find_trace(spans, "digits", 2) == cut.split("-")[1]
    assert find_trace(spans, "digits", 7) == ""
    path.write_text(path.read_text() + "not json\n" + json.dumps({"x": 1}) + "\n")
    assert len(read_spans(tmp_path / "traces")) == 2  # bad lines are skipped


def test_traceparents_that_are_not_are_refused() -> None:
    good = parse_traceparent("00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    assert good is not None and good.trace_id == int("a" * 32, 16) and good.trace_flags.sampled
    for bad in (
        "",
        "00-abc-def-01",
        "00-" + "0" * 32 + "-" + "b" * 16 + "-01",
        "00-" + "z" * 32 + "-" + "b" * 16 + "-01",
    ):
        assert parse_traceparent(bad) is None
