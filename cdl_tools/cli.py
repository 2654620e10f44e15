"""The ``cdl`` command line: the local stack and (as they land) the services."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from cdl.errors import CdlError
from cdl_tools.settings import StackSettings
from cdl_tools.stack import LocalStack, service_env

__all__ = ["app", "main"]

app = typer.Typer(help="cdl: continuous deep learning over Kafka, MinIO and Triton.", no_args_is_help=True)
stack_app = typer.Typer(help="Start, inspect and stop the local stack.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
dataset_app = typer.Typer(help="Register and inspect datasets (through the ingest service).", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
checkpoint_app = typer.Typer(help="A model's starting point: your own pretrained weights.", no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")
console = Console()

StateDir = Annotated[
    Path | None,
    typer.Option("--state-dir", help="Stack state directory (default $CDL_STATE_DIR or ~/.cache/cdl/stack)."),
]


def _stack(state_dir: Path | None, **overrides: Any) -> LocalStack:
    settings = StackSettings()
    if state_dir is not None:
        overrides["state_dir"] = state_dir
    if overrides:
        settings = settings.model_copy(update=overrides)
    return LocalStack(settings)


def _status_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="cdl local stack", expand=False)
    for col in ("component", "pid", "state", "live", "restarts", "endpoints", "log"):
        table.add_column(col, justify="right" if col == "restarts" else "left")
    for r in rows:
        if r["healthy"]:
            st = "[green]healthy[/]"
        elif r["running"]:
            st = "[yellow]running, not healthy[/]"
        else:
            st = "[red]stopped[/]"
        live = r.get("live")
        lv = "-" if live is None else "[green]live[/]" if live == "live" else f"[red]{live}[/]"
        restarts = "-" if r.get("restarts") is None else str(r["restarts"])
        table.add_row(r["name"], str(r["pid"]), st, lv, restarts, r["endpoint"], r["log"])
    return table


@stack_app.command("up")
def stack_up(
    state_dir: StateDir = None,
    triton_servers: Annotated[int | None, typer.Option(help="Number of Triton servers.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stay in the foreground with a live view; Ctrl-C stops the stack.")
    ] = False,
    demo: Annotated[
        bool, typer.Option("--demo", help="With --follow: register 'digits' and stream its records into data.raw.")
    ] = False,
    demo_rate: Annotated[float, typer.Option(help="Records per second of the demo feed.")] = 100.0,
) -> None:
    """Start Kafka (KRaft), MinIO and Triton on free ports and wait until each is healthy."""
    overrides: dict[str, Any] = {}
    if triton_servers is not None:
        overrides["triton_servers"] = triton_servers
    stack = _stack(state_dir, **overrides)
    start = time.monotonic()
    tasks: dict[str, Any] = {}
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False
    ) as progress:

        def report(component: str, phase: str, detail: str) -> None:
            if component not in tasks:
                tasks[component] = progress.add_task(f"{component}: {phase}", total=1)
            colour = {"healthy": "green", "ready": "green", "failed": "red", "starting": "yellow"}.get(phase, "white")
            done = phase in ("ready", "failed") or (phase == "healthy" and component not in ("kafka", "minio"))
            progress.update(
                tasks[component], description=f"{component}: [{colour}]{phase}[/] {detail}", completed=1 if done else 0
            )

        try:
            state = stack.up(report)
        except CdlError as exc:
            console.print(f"[red]stack failed to start:[/] {exc}", soft_wrap=True)
            raise typer.Exit(1) from exc
    console.print(f"[green]stack healthy[/] in {time.monotonic() - start:.1f}s; state in {stack.state_path}")
    if stack.reused:
        console.print(f"  already running: {', '.join(stack.reused)}")
    console.print(f"  kafka    {state['kafka']['bootstrap']}")
    console.print(f"  minio    {state['minio']['endpoint']}")
    for t in state.get("triton", []):
        console.print(f"  triton   grpc {t['grpc']}  http {t['http']}  repository {t['repository']}")
    if follow:
        feed = None
        try:
            if demo:
                from cdl_tools.demo import DigitsFeed, register_digits

                ingest = state.get("services", {}).get("ingest", {}).get("grpc")
                if not ingest:
                    console.print("[red]--demo needs the ingest service in the stack[/]", soft_wrap=True)
                    raise typer.Exit(1)
                register_digits(ingest, api_key=state.get("api_key"))
                feed = DigitsFeed(state["kafka"]["bootstrap"], rate=demo_rate).start()
                console.print(f"demo: streaming digits into data.raw at {demo_rate:.0f} records/s")
            _watch(stack, interval=2.0)
        finally:
            if feed is not None:
                feed.stop()
            stopped = stack.down()
            console.print(f"stopped: {', '.join(stopped) or 'nothing'}")


@stack_app.command("down")
def stack_down(
    state_dir: StateDir = None,
    purge: Annotated[
        bool, typer.Option("--purge", help="Also delete data kept outside the state directory (PostgreSQL's as root).")
    ] = False,
) -> None:
    """Stop exactly the processes `cdl stack up` started."""
    stack = _stack(state_dir)
    stopped = stack.down(lambda c, p, d: console.print(f"  {c}: {p} ({d})"), purge=purge)
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@stack_app.command("env")
def stack_env(state_dir: StateDir = None) -> None:
    """Shell exports of the running stack's endpoints and key: eval "$(cdl stack env)".

    What the stack gives the services it starts (CDL_KAFKA_BOOTSTRAP, CDL_S3_*, CDL_TRITON_GRPC,
    CDL_TRITON_HTTP, CDL_STATE_DIR, CDL_TUNER_STORAGE_URL: a service started by hand in that
    shell joins the stack), CDL_API_KEY and, with a gateway, CDL_GATEWAY_GRPC (host:port) and
    CDL_GATEWAY_HTTP (the REST endpoint's URL)."""
    state = _stack(state_dir).read_state()
    if not state.get("kafka"):
        print(f"no stack recorded in {_stack(state_dir).state_dir}", file=sys.stderr)
        raise typer.Exit(1)
    values = service_env(state)
    values["CDL_API_KEY"] = str(state.get("api_key", ""))
    gateway = state.get("services", {}).get("gateway", {})
    if gateway:
        values["CDL_GATEWAY_GRPC"] = str(gateway.get("grpc", ""))
        values["CDL_GATEWAY_HTTP"] = f"http://{gateway['http']}" if "http" in gateway else ""
    for key, value in values.items():
        print(f"export {key}={shlex.quote(value)}")


@stack_app.command("status")
def stack_status(
    state_dir: StateDir = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh a live view until Ctrl-C.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show each component of the local stack (and, with --watch, topics and artifacts live).

    Services run under a supervisor: live is what their /healthz says, restarts how often
    the supervisor started them again (docs/operations.md, "Supervision")."""
    stack = _stack(state_dir)
    if watch:
        _watch(stack, interval=2.0)
        return
    rows = stack.status()
    if not rows:
        console.print(f"no stack recorded in {stack.state_dir}")
        raise typer.Exit(1)
    if as_json:
        import json

        print(json.dumps(rows, indent=2))
    else:
        console.print(_status_table(rows))
    if not all(r["healthy"] for r in rows):
        raise typer.Exit(1)


def _watch(stack: LocalStack, interval: float) -> None:
    from cdl_tools.stack._watch import StackObserver

    state = stack.read_state()
    if "kafka" not in state:
        console.print("no running stack to watch")
        raise typer.Exit(1)
    observer = StackObserver(state)
    from cdl_tools.stack._watch import HealthReader

    health = HealthReader(state["kafka"]["bootstrap"])

    def render() -> Group:
        snap = observer.snapshot(stack.status())
        topics = Table(title="topics (log end offsets; transactional topics count commit markers too)")
        topics.add_column("topic")
        topics.add_column("offsets", justify="right")
        for name, n in snap.topics.items():
            topics.add_row(name, str(n))
        objects = Table(title="object store")
        objects.add_column("bucket")
        objects.add_column("objects", justify="right")
        for name, n in snap.objects.items():
            objects.add_row(name, str(n))
        datasets = Table(title="datasets (newest version)")
        for col in ("dataset", "version", "records", "new", "holdout", "shards"):
            datasets.add_column(col, justify="left" if col == "dataset" else "right")
        for d in snap.datasets:
            datasets.add_row(
                *(str(d.get(c, "-")) for c in ("dataset", "version", "records", "new", "holdout", "shards"))
            )
        models = Table(title="models (newest version)")
        mcols = ("model", "version", "verdict", "score", "champion", "compressed", "tuned")
        for col in mcols:
            models.add_column(col, justify="left" if col in ("model", "verdict", "compressed", "tuned") else "right")
        for m in snap.models:
            models.add_row(*(str(m.get(c, "-")) for c in mcols))
        health.poll(0.5)
        parts: list[Any] = [_status_table(snap.components), topics, objects, datasets, models]
        if health.latest or health.alerts:
            parts.extend(_health_tables(health.rows(), health.alert_rows()))
        if snap.errors:
            parts.append(Panel("\n".join(snap.errors), title="errors", style="red"))
        parts.append("[dim]Ctrl-C to stop[/]")
        return Group(*parts)

    try:
        with Live(render(), console=console, refresh_per_second=1) as live:
            while True:
                time.sleep(interval)
                live.update(render())
    except KeyboardInterrupt:
        pass
    finally:
        observer.close()
        health.close()


def _health_tables(rows: list[dict[str, Any]], alerts: list[dict[str, Any]]) -> list[Table]:
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


@app.command("status")
def status(
    state_dir: StateDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """The newest health window of each model version that served (requests, errors, latency,
    accuracy on feedback, drift statistic), the drift alerts, open or answered, and whether each
    of the stack's services is live (its loops not stuck) and how often it was restarted."""
    import json

    from cdl_tools.stack._watch import HealthReader

    stack = _stack(state_dir)
    state = stack.read_state()
    if "kafka" not in state:
        console.print("[red]no running stack: start it with cdl stack up[/]", soft_wrap=True)
        raise typer.Exit(1)
    try:
        reader = HealthReader(state["kafka"]["bootstrap"])
    except Exception as exc:  # noqa: BLE001 - one line for the user, not a traceback
        console.print(f"[red]kafka unreachable[/]: {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    try:
        reader.poll(5.0)
        rows, alerts = reader.rows(), reader.alert_rows()
    finally:
        reader.close()
    services = [
        {k: r.get(k) for k in ("name", "live", "restarts")} for r in stack.status() if r.get("live") is not None
    ]
    if as_json:
        print(json.dumps({"health": rows, "alerts": alerts, "services": services}, indent=2))
        return
    if not rows and not alerts:
        console.print("no model health yet (the monitor publishes a window once a model has served requests)")
    for table in _health_tables(rows, alerts):
        console.print(table)
    if services:
        table = Table(title="services")
        for col in ("service", "live", "restarts"):
            table.add_column(col)
        for svc in services:
            live = str(svc["live"])
            table.add_row(str(svc["name"]), live if live == "live" else f"[red]{live}[/]", str(svc["restarts"]))
        console.print(table)


IngestEndpoint = Annotated[
    str | None, typer.Option("--ingest", help="Ingest gRPC endpoint host:port (default: from the local stack).")
]


def _ingest_metadata(state_dir: Path | None) -> tuple[tuple[str, str | bytes], ...]:
    """The API key of the local stack (or CDL_API_KEY) as call metadata."""
    import os

    key = os.environ.get("CDL_API_KEY") or _stack(state_dir).read_state().get("api_key")
    return (("authorization", f"Bearer {key}"),) if key else ()


def _ingest_endpoint(endpoint: str | None, state_dir: Path | None) -> str:
    if endpoint:
        return endpoint
    found = _stack(state_dir).read_state().get("services", {}).get("ingest", {}).get("grpc")
    if not found:
        console.print("[red]no ingest endpoint: start the stack (cdl stack up) or pass --ingest[/]", soft_wrap=True)
        raise typer.Exit(1)
    return str(found)


def _rpc_error(exc: Exception) -> typer.Exit:
    import grpc

    if isinstance(exc, grpc.RpcError):
        console.print(f"[red]{exc.code().name}[/]: {' '.join((exc.details() or '').split())}", soft_wrap=True)
    else:
        console.print(f"[red]error[/]: {exc}", soft_wrap=True)
    return typer.Exit(1)


@dataset_app.command("register")
def dataset_register(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    task: Annotated[str, typer.Option(help="tabular | image | text | regression")] = "tabular",
    labels: Annotated[
        str, typer.Option(help="Comma-separated label set (regression: the target's name, default 'target').")
    ] = "",
    shape: Annotated[str, typer.Option(help="Input shape without batch, e.g. 1,8,8 (tensor tasks).")] = "",
    dtype: Annotated[str, typer.Option(help="float32 | float64 | uint8 | int64")] = "float32",
    min_new_records: Annotated[int, typer.Option(help="Version after this many new valid records (0: off).")] = 1000,
    max_interval_s: Annotated[float, typer.Option(help="Or after this many seconds with new records (0: off).")] = 0.0,
    holdout: Annotated[float, typer.Option(help="Holdout fraction (stable hash of the record id).")] = 0.2,
    min_text_length: Annotated[int, typer.Option(help="Text datasets: shortest accepted text.")] = 0,
    lowercase: Annotated[bool, typer.Option(help="Text datasets: lowercase the text.")] = False,
    family: Annotated[
        str, typer.Option(help="Model family: an installed plugin's name (mlp, cnn, text, …); default: the task's.")
    ] = "",
    ingest: IngestEndpoint = None,
    state_dir: StateDir = None,
) -> None:
    """Register a dataset (or update its policy); its schema cannot change once registered."""
    import grpc

    from cdl.v1 import ingest_pb2, ingest_pb2_grpc

    tasks = {
        "tabular": ingest_pb2.TASK_TABULAR_CLASSIFICATION,
        "image": ingest_pb2.TASK_IMAGE_CLASSIFICATION,
        "text": ingest_pb2.TASK_TEXT_CLASSIFICATION,
        "regression": ingest_pb2.TASK_REGRESSION,
    }
    if task not in tasks:
        console.print(f"[red]--task must be one of {', '.join(tasks)}[/]", soft_wrap=True)
        raise typer.Exit(2)
    names = [lab.strip() for lab in labels.split(",") if lab.strip()]
    spec = ingest_pb2.DatasetSpec(
        name=name,
        task=tasks[task],
        input_shape=[int(d) for d in shape.split(",") if d.strip()],
        dtype=dtype,
        labels=names or (["target"] if task == "regression" else []),
        cleaning=ingest_pb2.CleaningRules(min_text_length=min_text_length, lowercase_text=lowercase),
        policy=ingest_pb2.RetrainPolicy(min_new_records=min_new_records, max_interval_s=max_interval_s),
        holdout_fraction=holdout,
        family=family,
    )
    try:
        with grpc.insecure_channel(_ingest_endpoint(ingest, state_dir)) as ch:
            resp = ingest_pb2_grpc.IngestServiceStub(ch).RegisterDataset(
                ingest_pb2.RegisterDatasetRequest(spec=spec), timeout=10, metadata=_ingest_metadata(state_dir)
            )
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from exc
    verb = "registered" if resp.created else "updated"
    console.print(f"[green]{verb}[/] {name} (schema {resp.dataset.schema_hash})")


@dataset_app.command("show")
def dataset_show(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    ingest: IngestEndpoint = None,
    state_dir: StateDir = None,
) -> None:
    """Show a dataset's spec and its newest version."""
    import grpc
    from google.protobuf import json_format

    from cdl.v1 import ingest_pb2, ingest_pb2_grpc

    try:
        with grpc.insecure_channel(_ingest_endpoint(ingest, state_dir)) as ch:
            resp = ingest_pb2_grpc.IngestServiceStub(ch).GetDataset(
                ingest_pb2.GetDatasetRequest(name=name), timeout=10, metadata=_ingest_metadata(state_dir)
            )
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from exc
    ds = resp.dataset
    table = Table(title=f"dataset {name}", show_header=False)
    table.add_row("schema hash", ds.schema_hash)
    table.add_row("latest version", str(ds.latest_version))
    for key, value in json_format.MessageToDict(ds.spec, preserving_proto_field_name=True).items():
        table.add_row(key, str(value))
    console.print(table)


@app.command("datasets")
def datasets_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    ingest: IngestEndpoint = None,
    state_dir: StateDir = None,
) -> None:
    """Every registered dataset with its task, labels, policy and newest version."""
    import grpc
    from google.protobuf import json_format

    from cdl.v1 import ingest_pb2, ingest_pb2_grpc

    try:
        with grpc.insecure_channel(_ingest_endpoint(ingest, state_dir)) as ch:
            resp = ingest_pb2_grpc.IngestServiceStub(ch).ListDatasets(
                ingest_pb2.ListDatasetsRequest(), timeout=10, metadata=_ingest_metadata(state_dir)
            )
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from exc
    if as_json:
        print(
            json_format.MessageToJson(resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        )
        return
    table = Table(title="datasets")
    for col in ("name", "task", "labels", "min new records", "max interval s", "latest version"):
        table.add_column(col)
    for ds in resp.datasets:
        spec = ds.spec
        labels = ",".join(spec.labels)
        table.add_row(
            spec.name,
            ingest_pb2.Task.Name(spec.task).removeprefix("TASK_").lower(),
            labels if len(labels) <= 40 else labels[:37] + "...",
            str(spec.policy.min_new_records),
            f"{spec.policy.max_interval_s:g}",
            str(ds.latest_version),
        )
    console.print(table)
    if not resp.datasets:
        console.print("no dataset registered yet (cdl dataset register)")


@app.command("report")
def report_cmd(
    model: Annotated[str, typer.Argument(help="Model (dataset) name.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for report.md, summary.json and the plots.")] = Path(
        "cdl-report"
    ),
    state_dir: StateDir = None,
) -> None:
    """A report of the loop so far from the stack's topics: Markdown with PNG plots."""
    from cdl.store import ObjectStore
    from cdl_tools.report import LoopEvents, write_report

    state = _stack(state_dir).read_state()
    if "kafka" not in state or "minio" not in state:
        console.print("[red]no running stack: start it with cdl stack up[/]", soft_wrap=True)
        raise typer.Exit(1)
    try:
        events = LoopEvents(state["kafka"]["bootstrap"], model)
    except Exception as exc:  # noqa: BLE001 - one line for the user, not a traceback
        console.print(f"[red]kafka unreachable[/]: {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    try:
        events.poll(10.0)
        m = state["minio"]
        view = events.view(ObjectStore(m["endpoint"], m["access_key"], m["secret_key"]), state.get("started_at", 0.0))
    finally:
        events.close()
    if not view.versions and not view.trained:
        console.print(
            f"[red]nothing about {model!r} on the stack's topics[/] (is it registered and fed?)", soft_wrap=True
        )
        raise typer.Exit(1)
    path = write_report(view, out, title=f"cdl report: {model}")
    console.print(f"report: {path}")


@app.command("trace")
def trace_cmd(
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

    stack = _stack(state_dir)
    spans = read_spans(stack.state_dir / "traces")
    trace_id = find_trace(spans, model, version)
    if not trace_id:
        console.print(
            f"[red]no span of {model} v{version}[/] in {stack.state_dir / 'traces'} (CDL_TRACE_EXPORTER=file?)"
        )
        raise typer.Exit(1)
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


@app.command("demo")
def demo_cmd(
    duration: Annotated[
        float, typer.Option(help="Seconds the phases may take in all (each waits for its outcome).")
    ] = 300.0,
    phases: Annotated[
        str, typer.Option(help="Comma-separated phases: stream,traffic,drift,bad.")
    ] = "stream,traffic,drift,bad",
    keep: Annotated[bool, typer.Option("--keep", help="Leave the stack running at the end.")] = False,
    report_dir: Annotated[Path, typer.Option("--report", help="Where the report goes.")] = Path("cdl-demo-report"),
    rate: Annotated[float, typer.Option(help="Client requests per second through the gateway.")] = 25.0,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="The demo stack's state directory (wiped at start).")
    ] = None,
) -> None:
    """The whole loop, by itself, live: stream, train, compress, serve, feedback, drift, retrain,
    and a bad candidate rolled back; ends with a report (Markdown with plots)."""
    from cdl_tools.demo_loop import PHASES, Demo, DemoOptions

    wanted = tuple(p.strip() for p in phases.split(",") if p.strip())
    unknown = [p for p in wanted if p not in PHASES]
    if unknown or not wanted:
        console.print(
            f"[red]--phases: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(PHASES)}[/]"
        )
        raise typer.Exit(2)
    import signal

    from cdl.settings import cdl_home

    root = state_dir or cdl_home() / "demo"
    demo = Demo(
        DemoOptions(state_dir=root, report_dir=report_dir, duration_s=duration, phases=wanted, keep=keep, rate=rate),
        console,
    )

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM: the same way out as Ctrl-C (clients, feed, then the stack)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        summary = demo.run()
    except KeyboardInterrupt:
        raise typer.Exit(130) from None  # interrupted while starting: what started was stopped
    except CdlError as exc:
        console.print(f"[red]demo failed[/]: {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc
    if summary.get("interrupted"):
        raise typer.Exit(130)
    if not summary.get("ok") or summary.get("client", {}).get("failed"):
        missed = [
            f"{name}: {outcome}" for name, outcome in summary.get("phases", {}).items() if outcome.startswith("missed:")
        ]
        console.print(
            f"[red]the demo did not get every outcome[/] ({'; '.join(missed) or 'see above'})", soft_wrap=True
        )
        raise typer.Exit(1)


# --------------------------------------------------------------------------- the gateway

GatewayEndpoint = Annotated[
    str | None, typer.Option("--gateway", help="Gateway gRPC endpoint host:port (default: from the local stack).")
]
ApiKey = Annotated[
    str | None, typer.Option("--key", envvar="CDL_API_KEY", help="API key (default: the local stack's).")
]


#: a PEM file of the CA that signed the gateway's certificate (``cdl --tls-ca``): TLS to the gateway
_TLS_CA: dict[str, Path | None] = {"path": None}


@app.callback()
def _options(
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-ca",
            envvar="CDL_TLS_CA",
            help="Talk TLS to the gateway, trusting this CA's PEM (a gateway with CDL_GATEWAY_TLS_CERT_FILE).",
        ),
    ] = None,
) -> None:
    """cdl: continuous deep learning over Kafka, MinIO and Triton."""
    _TLS_CA["path"] = tls_ca


def _tls_ca() -> bytes | None:
    path = _TLS_CA["path"]
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        console.print(f"[red]cannot read the TLS CA {path}[/]: {exc}", soft_wrap=True)
        raise typer.Exit(2) from exc


def _gateway(
    endpoint: str | None, key: str | None, state_dir: Path | None
) -> tuple[str, tuple[tuple[str, str | bytes], ...]]:
    """The gateway's endpoint and the call metadata carrying the API key."""
    state = _stack(state_dir).read_state()
    found = endpoint or state.get("services", {}).get("gateway", {}).get("grpc")
    if not found:
        console.print("[red]no gateway endpoint: start the stack (cdl stack up) or pass --gateway[/]", soft_wrap=True)
        raise typer.Exit(1)
    key = key or state.get("api_key")
    return str(found), (("authorization", f"Bearer {key}"),) if key else ()


def _admin_call(endpoint: str | None, key: str | None, state_dir: Path | None, method: str, request: Any) -> Any:
    import grpc

    from cdl.v1 import admin_pb2_grpc

    target, metadata = _gateway(endpoint, key, state_dir)
    ca = _tls_ca()
    try:
        with (
            grpc.secure_channel(target, grpc.ssl_channel_credentials(ca)) if ca else grpc.insecure_channel(target)
        ) as ch:
            return getattr(admin_pb2_grpc.ModelAdminStub(ch), method)(request, timeout=30, metadata=metadata)
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from exc


def _models_table(statuses: list[Any]) -> Table:
    from cdl.v1 import events_pb2

    table = Table(title="models at the gateway")
    for col in ("model", "serving", "mode", "version", "state", "traffic", "reason"):
        table.add_column(col)
    for st in statuses:
        rows = list(st.versions) or [None]
        for i, v in enumerate(rows):
            head = (st.model, str(st.serving_version or "-"), st.mode or "-") if i == 0 else ("", "", "")
            if v is None:
                table.add_row(*head, "-", "-", "-", "")
                continue
            state = events_pb2.RolloutState.Name(v.state).removeprefix("ROLLOUT_STATE_").lower()
            table.add_row(*head, str(v.version), state, f"{v.traffic_fraction:.0%}", v.reason)
    return table


def _print_status(status: Any, as_json: bool) -> None:
    from google.protobuf import json_format

    if as_json:
        console.print_json(json_format.MessageToJson(status, preserving_proto_field_name=True))
    else:
        console.print(_models_table([status]))


AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command("models")
def models_cmd(
    model: Annotated[str | None, typer.Argument(help="One model (default: all).")] = None,
    as_json: AsJson = False,
    gateway: GatewayEndpoint = None,
    key: ApiKey = None,
    state_dir: StateDir = None,
) -> None:
    """Models at the gateway: serving version, candidate, rollout state and traffic."""
    from google.protobuf import json_format

    from cdl.v1 import admin_pb2

    if model:
        resp = _admin_call(gateway, key, state_dir, "RolloutStatus", admin_pb2.RolloutStatusRequest(model=model))
        _print_status(resp.status, as_json)
        return
    training = _trainings(state_dir)
    try:
        listed = _admin_call(gateway, key, state_dir, "ListModels", admin_pb2.ListModelsRequest())
    except typer.Exit:
        if not training:  # no gateway yet: what is training is still worth showing
            raise
        listed = admin_pb2.ListModelsResponse()
    if as_json:
        doc = json_format.MessageToDict(listed, preserving_proto_field_name=True)
        console.print_json(data={**doc, "training": training})
        return
    console.print(_models_table(list(listed.models)))
    if training:
        table = Table(title="training (the trainer's progress, each epoch)")
        for col in ("model", "version", "epoch", "train loss", "val loss", "val score", "samples/s"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for t in training:
            table.add_row(
                t["model"],
                str(t["version"]),
                f"{t['epoch']}/{t['epochs']}",
                f"{t['train_loss']:.4f}",
                f"{t['val_loss']:.4f}",
                f"{t.get('val_score', t.get('val_accuracy', float('nan'))):.3f}",
                f"{t['samples_per_s']:.0f}",
            )
        console.print(table)


def _trainings(state_dir: Path | None) -> list[dict[str, Any]]:
    """Trainings in progress: each model's ``training.json`` whose version has no metrics yet."""
    from cdl.registry import MODELS_BUCKET
    from cdl.store import ObjectStore

    m = _stack(state_dir).read_state().get("minio")
    if not m:
        return []
    out: list[dict[str, Any]] = []
    try:
        store = ObjectStore(m["endpoint"], m["access_key"], m["secret_key"])
        for model in store.folders(MODELS_BUCKET):
            if not store.exists(MODELS_BUCKET, f"{model}/training.json"):
                continue
            doc = store.get_json(MODELS_BUCKET, f"{model}/training.json")
            if not store.exists(MODELS_BUCKET, f"{model}/{doc['version']}/metrics.json"):
                out.append({"model": model, **doc})
    except Exception:  # noqa: BLE001 - progress is a courtesy: the gateway's table still prints
        return out
    return out


@app.command("produce")
def produce_cmd(
    source: Annotated[str, typer.Argument(help="A file of JSON lines, or - for standard input.")] = "-",
    topic: Annotated[str, typer.Option(help="Topic to produce to.")] = "data.raw",
    dataset: Annotated[str, typer.Option(help="Dataset of records that name none.")] = "",
    bootstrap: Annotated[str, typer.Option(help="Kafka bootstrap servers (default: the local stack's).")] = "",
    as_json: AsJson = False,
    state_dir: StateDir = None,
) -> None:
    """Produce records (one JSON object per line) to data.raw, as any Kafka client would.

    Every line is checked first: a line that is not a JSON object stops the command before
    anything is produced. Ingest validates the records themselves (bad ones are dead-lettered
    with their reason).
    """
    import json
    import sys

    import orjson

    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        console.print(f"[red]cannot read {source}[/]: {exc.strerror or exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    records: list[bytes] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            console.print(f"[red]line {n}: not JSON[/]: {exc}", soft_wrap=True)
            raise typer.Exit(1) from None
        if not isinstance(doc, dict):
            console.print(f"[red]line {n}: not a JSON object[/]", soft_wrap=True)
            raise typer.Exit(1)
        if dataset and "dataset" not in doc:
            doc["dataset"] = dataset
        records.append(orjson.dumps(doc))
    if not bootstrap:
        bootstrap = str(_stack(state_dir).read_state().get("kafka", {}).get("bootstrap", ""))
    if not bootstrap:
        console.print("[red]no Kafka: start the stack (cdl stack up) or pass --bootstrap[/]", soft_wrap=True)
        raise typer.Exit(1)
    from cdl.kafka import Producer

    producer = Producer(bootstrap, client_id="cdl-cli", **{"message.timeout.ms": 15000, "log_level": 0})
    for value in records:
        producer.send_raw(topic, value)
    try:
        producer.flush(30)
    except CdlError as exc:
        console.print(f"[red]not all records were produced[/]: {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps({"produced": len(records), "topic": topic}))
    else:
        console.print(f"produced {len(records)} records to {topic}")


@app.command("approve")
def approve_cmd(
    model: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="The version awaiting approval.")],
    approver: Annotated[str, typer.Option(help="Who approves (recorded in model.deployed).")] = "cli",
    as_json: AsJson = False,
    gateway: GatewayEndpoint = None,
    key: ApiKey = None,
    state_dir: StateDir = None,
) -> None:
    """Approve a version that waits for manual approval; its rollout goes on."""
    from cdl.v1 import admin_pb2

    req = admin_pb2.ApproveRequest(model=model, version=version, approver=approver)
    _print_status(_admin_call(gateway, key, state_dir, "Approve", req).status, as_json)


@app.command("rollback")
def rollback_cmd(
    model: Annotated[str, typer.Argument(help="Model name.")],
    reason: Annotated[str, typer.Option(help="Why (recorded in model.deployed).")] = "rolled back from the cli",
    as_json: AsJson = False,
    gateway: GatewayEndpoint = None,
    key: ApiKey = None,
    state_dir: StateDir = None,
) -> None:
    """Roll the model's candidate back: its traffic goes to 0 at once and it is unloaded."""
    from cdl.v1 import admin_pb2

    req = admin_pb2.RollbackRequest(model=model, reason=reason)
    _print_status(_admin_call(gateway, key, state_dir, "Rollback", req).status, as_json)


@app.command("traffic")
def traffic_cmd(
    model: Annotated[str, typer.Argument(help="Model name.")],
    share: Annotated[float, typer.Argument(help="The candidate's share of live requests, 0..1.")],
    as_json: AsJson = False,
    gateway: GatewayEndpoint = None,
    key: ApiKey = None,
    state_dir: StateDir = None,
) -> None:
    """Pin the candidate's share of live traffic."""
    from cdl.v1 import admin_pb2

    if not 0.0 <= share <= 1.0:
        console.print("[red]the share must be between 0 and 1[/]", soft_wrap=True)
        raise typer.Exit(2)
    req = admin_pb2.SetTrafficRequest(model=model, traffic_fraction=share)
    _print_status(_admin_call(gateway, key, state_dir, "SetTraffic", req).status, as_json)


@app.command("tune")
def tune_cmd(
    model: Annotated[str, typer.Argument(help="Model name (its dataset's).")],
    reason: Annotated[str, typer.Option(help="Why (recorded in tuning.completed).")] = "",
    kafka: Annotated[str | None, typer.Option(help="Kafka bootstrap (default: the local stack's).")] = None,
    state_dir: StateDir = None,
) -> None:
    """Ask the tuner to run a study for MODEL now (a tuning.requested event)."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from cdl.events import Event, Topics, source_name
    from cdl.kafka import Producer
    from cdl.v1 import events_pb2

    bootstrap = kafka or _stack(state_dir).read_state().get("kafka", {}).get("bootstrap")
    if not bootstrap:
        console.print("[red]no Kafka: start the stack (cdl stack up) or pass --kafka[/]", soft_wrap=True)
        raise typer.Exit(1)
    now = Timestamp()
    now.GetCurrentTime()
    # one small event: a broker that takes it at all takes it in seconds (and a stopped one is
    # reported after 5 s, not 15)
    producer = Producer(str(bootstrap), client_id="cdl-cli", **{"message.timeout.ms": 5000, "log_level": 0})
    msg = events_pb2.TuningRequested(model=model, reason=reason, time=now)
    producer.send(Topics.TUNING_REQUESTED, Event(msg, source=source_name("cli"), key=model))
    try:
        producer.flush(6)
    except CdlError as exc:
        console.print(f"[red]the request did not reach Kafka[/]: {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc
    console.print(f"tuning requested for [bold]{model}[/]; the result comes on {Topics.TUNING_COMPLETED}")


@app.command("predict")
def predict_cmd(
    model: Annotated[str, typer.Argument(help="Model name.")],
    inputs: Annotated[Path, typer.Argument(help="A .npy array or a JSON file (a list of numbers, or a list of rows).")],
    version: Annotated[str, typer.Option(help="A version (default: what the gateway serves).")] = "",
    as_json: AsJson = False,
    gateway: GatewayEndpoint = None,
    key: ApiKey = None,
    state_dir: StateDir = None,
) -> None:
    """Send inputs through the gateway; prints each row's top class and score."""
    import json

    import numpy as np
    import tritonclient.grpc as tgrpc
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    target, metadata = _gateway(gateway, key, state_dir)
    headers = {k: v if isinstance(v, str) else v.decode() for k, v in metadata}
    try:
        raw = np.load(inputs) if inputs.suffix == ".npy" else json.loads(inputs.read_text())
        x = np.asarray(raw)
    except (OSError, ValueError) as exc:
        console.print(f"[red]cannot read {inputs}[/]: {exc}", soft_wrap=True)
        raise typer.Exit(2) from exc
    ca_path = _TLS_CA["path"]
    client = tgrpc.InferenceServerClient(
        target, ssl=ca_path is not None, root_certificates=str(ca_path) if ca_path else None
    )
    try:
        meta = client.get_model_metadata(model, version, headers=headers)
        spec = meta.inputs[0]
        want = list(spec.shape[1:])
        if spec.datatype == "BYTES":  # a text model: a text or a list of texts, one per row
            texts = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw, list) else []
            if not texts or not all(isinstance(t, str) for t in texts):
                console.print(f"[red]{model} takes texts[/]: give a JSON string or a list of strings", soft_wrap=True)
                raise typer.Exit(2)
            x = np.array([t.encode() for t in texts], dtype=np.object_).reshape(-1, 1)
        else:
            try:
                x = x.astype(tgrpc.triton_to_np_dtype(spec.datatype))
            except (TypeError, ValueError) as exc:
                console.print(f"[red]{model} takes numbers ({spec.datatype})[/]: {exc}", soft_wrap=True)
                raise typer.Exit(2) from exc
        try:
            if x.ndim == 1 or list(x.shape) == [d for d in want if d > 0]:
                x = x.reshape(1, *[d if d > 0 else -1 for d in want]) if want else x.reshape(1, -1)
            elif x.ndim == len(want):
                x = x.reshape(x.shape[0], *[d if d > 0 else -1 for d in want])
        except ValueError:  # does not fit: sent as it is, the gateway says what it expects
            x = x.reshape(1, -1) if x.ndim == 1 else x
        inp = tgrpc.InferInput(
            spec.name, list(x.shape), "BYTES" if x.dtype == np.object_ else np_to_triton_dtype(x.dtype)
        )
        inp.set_data_from_numpy(x)
        result = client.infer(model, [inp], model_version=version, headers=headers)
    except InferenceServerException as exc:
        console.print(f"[red]{exc.status() or 'error'}[/]: {' '.join(str(exc.message()).split())}", soft_wrap=True)
        raise typer.Exit(1) from exc
    finally:
        client.close()
    out = result.as_numpy(meta.outputs[0].name)
    logits = out.reshape(out.shape[0], -1)
    served = result.get_response().model_version
    rows: list[dict[str, Any]]
    if logits.shape[1] == 1:  # one output: a regression's value
        rows = [{"value": float(v)} for v in logits[:, 0]]
    else:
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        rows = [{"class": int(p.argmax()), "score": float(p.max())} for p in probs]
    if as_json:
        console.print_json(json.dumps({"model": model, "version": served, "predictions": rows}))
        return
    table = Table(title=f"{model} v{served}")
    cols = list(rows[0]) if rows else ["class", "score"]
    for col in ("row", *cols):
        table.add_column(col)
    for i, r in enumerate(rows):
        table.add_row(str(i), *(str(v) if isinstance(v, int) else f"{v:.4g}" for v in r.values()))
    console.print(table)


@checkpoint_app.command("upload")
def checkpoint_upload(
    model: Annotated[str, typer.Argument(help="Model (dataset) name.")],
    path: Annotated[Path, typer.Argument(help="A state_dict: .safetensors, or .pt/.pth (read weights-only).")],
    freeze: Annotated[
        list[str] | None, typer.Option(help="Parameter names to keep frozen (fnmatch pattern; repeatable).")
    ] = None,
    state_dir: StateDir = None,
) -> None:
    """Give MODEL a starting point: its first version fine-tunes from these weights (which must fit
    its family's module), and parameters matching --freeze stay as they are in every version."""
    from cdl.registry import ModelRegistry
    from cdl.store import ObjectStore

    try:
        weights = _state_dict_bytes(path)
    except Exception as exc:  # noqa: BLE001 - one line for the user, not a traceback
        console.print(f"[red]not a state dict[/]: {path}: {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    m = _stack(state_dir).read_state().get("minio")
    if not m:
        console.print("[red]no running stack: start it with cdl stack up[/]", soft_wrap=True)
        raise typer.Exit(1)
    registry = ModelRegistry(ObjectStore(m["endpoint"], m["access_key"], m["secret_key"]))
    doc = registry.set_start(model, weights, list(freeze or []), path.name)
    frozen = ", ".join(doc["freeze"]) or "nothing"
    console.print(f"[green]uploaded[/] {model}'s starting point (sha256 {doc['sha256'][:12]}…; frozen: {frozen})")


def _state_dict_bytes(path: Path) -> bytes:
    """``path``'s tensors as safetensors bytes (a .pt/.pth file is read with ``weights_only``)."""
    import safetensors.torch
    import torch

    if path.suffix == ".safetensors":
        raw = path.read_bytes()
        safetensors.torch.load(raw)
        return raw
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("expected a dict of tensors (a module's state_dict)")
    return bytes(safetensors.torch.save({str(k): v.contiguous() for k, v in obj.items()}))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
