"""What the loop did, read back: ``cdl status`` (model health, drift alerts, services live),
``cdl report`` (Markdown with plots) and ``cdl trace`` (a model version's spans)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cdl_tools.cli import clients
from cdl_tools.cli.clients import StateDir
from cdl_tools.cli.output import console, fail

__all__ = ["health_tables", "report", "status", "trace"]


def health_tables(rows: list[dict[str, Any]], alerts: list[dict[str, Any]]) -> list[Table]:
    """The monitor's newest window of each serving version, and the drift alerts."""
    health = Table(title="model health (the newest window of each version that served; the monitor)")
    hcols = ("model", "version", "requests", "errors", "p50_ms", "p99_ms", "score", "feedback", "drift")
    for col in hcols:
        health.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        drift = "-" if r["drift"] is None else f"{r['drift']:.4g} / {r['drift_threshold']:.4g}"
        acc = "-" if r["score"] is None else f"{r['metric']} {r['score']:.3f}"
        health.add_row(*(str(r[c]) for c in hcols[:6]), acc, str(r["feedback"]), drift)
    drift_table = Table(title="drift alerts")
    for col in ("model", "version", "dataset", "statistic", "threshold", "at", "state"):
        drift_table.add_column(col)
    for a in alerts:
        style = "red" if a["state"] == "open" else ""
        drift_table.add_row(
            *(str(a[c]) for c in ("model", "version", "dataset", "statistic", "threshold", "at")),
            f"[{style}]{a['state']}[/]" if style else a["state"],
        )
    return [health, drift_table]


def status(
    state_dir: StateDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """The newest health window of each model version that served (requests, errors, latency,
    accuracy on feedback, drift statistic), the drift alerts, open or answered, and whether each
    of the stack's services is live (its loops not stuck) and how often it was restarted."""
    import json

    from cdl_tools.stack._watch import HealthReader

    state = clients.running_state(state_dir, "kafka")
    reader = clients.kafka_reader(state["kafka"]["bootstrap"], HealthReader)
    try:
        reader.poll(5.0)
        rows, alerts = reader.rows(), reader.alert_rows()
    finally:
        reader.close()
    services = [
        {k: r.get(k) for k in ("name", "live", "restarts")}
        for r in clients.local_stack(state_dir).status()
        if r.get("live") is not None
    ]
    if as_json:
        print(json.dumps({"health": rows, "alerts": alerts, "services": services}, indent=2))
        return
    if not rows and not alerts:
        console.print("no model health yet (the monitor publishes a window once a model has served requests)")
    for table in health_tables(rows, alerts):
        console.print(table)
    if services:
        table = Table(title="services")
        for col in ("service", "live", "restarts"):
            table.add_column(col)
        for svc in services:
            live = str(svc["live"])
            table.add_row(str(svc["name"]), live if live == "live" else f"[red]{live}[/]", str(svc["restarts"]))
        console.print(table)


def report(
    model: Annotated[str, typer.Argument(help="Model (dataset) name.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for report.md, summary.json and the plots.")] = Path(
        "cdl-report"
    ),
    state_dir: StateDir = None,
) -> None:
    """A report of the loop so far from the stack's topics: Markdown with PNG plots."""
    from cdl_tools.report import LoopEvents, write_report

    state = clients.running_state(state_dir, "kafka", "minio")
    events = clients.kafka_reader(state["kafka"]["bootstrap"], lambda b: LoopEvents(b, model))
    try:
        events.poll(10.0)
        view = events.view(clients.object_store(state), state.get("started_at", 0.0))
    finally:
        events.close()
    if not view.versions and not view.trained:
        fail(f"[red]nothing about {model!r} on the stack's topics[/] (is it registered and fed?)")
    path = write_report(view, out, title=f"cdl report: {model}")
    console.print(f"report: {path}")


def trace(
    model: Annotated[str, typer.Argument(help="Model (dataset) name.")],
    version: Annotated[int, typer.Argument(help="Model version.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the spans as JSON.")] = False,
    state_dir: StateDir = None,
) -> None:
    """The trace of a model version across the services (the stack's file exporters' spans):
    ingest's version cut, training, compression, the gateway's rollout steps."""
    import json

    from rich.tree import Tree

    from cdl.tracing import find_trace, read_spans

    traces = clients.local_stack(state_dir).state_dir / "traces"
    spans = read_spans(traces)
    trace_id = find_trace(spans, model, version)
    if not trace_id:
        fail(f"[red]no span of {model} v{version}[/] in {traces} (CDL_TRACE_EXPORTER=file?)", soft_wrap=False)
    mine = sorted((s for s in spans if s["trace_id"] == trace_id), key=lambda s: s["start_ns"])
    if as_json:
        print(json.dumps({"trace_id": trace_id, "spans": mine}, indent=2))
        return
    t0 = mine[0]["start_ns"]
    by_parent: dict[str, list[dict[str, Any]]] = {}
    ids = {s["span_id"] for s in mine}
    for s in mine:
        by_parent.setdefault(s["parent_id"] if s["parent_id"] in ids else "", []).append(s)
    tree = Tree(f"trace {trace_id}: {model} v{version}, {len(mine)} spans")

    def add(node: Tree, parent: str) -> None:
        for s in by_parent.get(parent, []):
            ms = (s["end_ns"] - s["start_ns"]) / 1e6
            at = (s["start_ns"] - t0) / 1e9
            colour = "red" if s["status"] == "ERROR" else "green"
            add(node.add(f"[{colour}]{s['service']}[/] {s['name']}  +{at:.2f}s  {ms:.1f} ms"), s["span_id"])

    add(tree, "")
    console.print(tree)
