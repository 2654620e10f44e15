"""``cdl stack``: start, inspect and stop the local stack (and watch it live)."""

from __future__ import annotations

import shlex
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from cdl.errors import CdlError
from cdl_tools.cli import clients
from cdl_tools.cli.clients import StateDir
from cdl_tools.cli.observe import health_tables
from cdl_tools.cli.output import AsJson, console, fail
from cdl_tools.stack import LocalStack, service_env

__all__ = ["app", "status_table", "watch_stack"]

app = typer.Typer(help="Start, inspect and stop the local stack.", no_args_is_help=True)


def status_table(rows: list[dict[str, Any]]) -> Table:
    """The stack's components: process, health, liveness, restarts, endpoints, log."""
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


@app.command("up")
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
    stack = clients.local_stack(state_dir, **overrides)
    start = time.monotonic()
    tasks: dict[str, Any] = {}
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False
    ) as progress:

        def report(component: str, phase: str, detail: str) -> None:
            if component not in tasks:
                tasks[component] = progress.add_task(f"{component}: {phase}", total=1)
            colours = {"healthy": "green", "ready": "green", "failed": "red", "starting": "yellow"}
            colours["retrying"] = "yellow"
            colour = colours.get(phase, "white")
            done = phase in ("ready", "failed") or (phase == "healthy" and component not in ("kafka", "minio"))
            progress.update(
                tasks[component], description=f"{component}: [{colour}]{phase}[/] {detail}", completed=1 if done else 0
            )

        try:
            state = stack.up(report)
        except CdlError as exc:
            fail(f"[red]stack failed to start:[/] {exc}")
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
                from cdl.v1 import ingest_pb2
                from cdl_tools.demo import DigitsFeed, digits_spec

                ingest = state.get("services", {}).get("ingest", {}).get("grpc")
                if not ingest:
                    fail("[red]--demo needs the ingest service in the stack[/]")
                request = ingest_pb2.RegisterDatasetRequest(spec=digits_spec())
                clients.ingest_call(ingest, state_dir, "RegisterDataset", request)
                feed = DigitsFeed(state["kafka"]["bootstrap"], rate=demo_rate).start()
                console.print(f"demo: streaming digits into data.raw at {demo_rate:.0f} records/s")
            watch_stack(stack, interval=2.0)
        finally:
            if feed is not None:
                feed.stop()
            stopped = stack.down()
            console.print(f"stopped: {', '.join(stopped) or 'nothing'}")


@app.command("down")
def stack_down(
    state_dir: StateDir = None,
    purge: Annotated[
        bool, typer.Option("--purge", help="Also delete data kept outside the state directory (PostgreSQL's as root).")
    ] = False,
) -> None:
    """Stop exactly the processes `cdl stack up` started."""
    stack = clients.local_stack(state_dir)
    stopped = stack.down(lambda c, p, d: console.print(f"  {c}: {p} ({d})"), purge=purge)
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command("env")
def stack_env(state_dir: StateDir = None) -> None:
    """Shell exports of the running stack's endpoints and keys: eval "$(cdl stack env)".

    What the stack gives the services it starts (CDL_KAFKA_BOOTSTRAP, CDL_S3_*, CDL_TRITON_GRPC,
    CDL_TRITON_HTTP, CDL_STATE_DIR, CDL_TUNER_STORAGE_URL: a service started by hand in that
    shell joins the stack), its keys (CDL_API_KEY, CDL_ADMIN_KEY, CDL_INGEST_KEY) and, with a
    gateway, CDL_GATEWAY_GRPC (host:port) and CDL_GATEWAY_HTTP (the REST endpoint's URL)."""
    stack = clients.local_stack(state_dir)
    state = stack.read_state()
    if not state.get("kafka"):
        print(f"no stack recorded in {stack.state_dir}", file=sys.stderr)
        raise typer.Exit(1)
    values = service_env(state)
    for scope, variable in clients.SCOPES.items():  # the keys of the stack, a variable per scope
        values[variable] = str(state.get(scope, ""))
    gateway = state.get("services", {}).get("gateway", {})
    if gateway:
        values["CDL_GATEWAY_GRPC"] = str(gateway.get("grpc", ""))
        values["CDL_GATEWAY_HTTP"] = f"http://{gateway['http']}" if "http" in gateway else ""
    for key, value in values.items():
        print(f"export {key}={shlex.quote(value)}")


@app.command("status")
def stack_status(
    state_dir: StateDir = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh a live view until Ctrl-C.")] = False,
    as_json: AsJson = False,
) -> None:
    """Show each component of the local stack (and, with --watch, topics and artifacts live).

    Services run under a supervisor: live is what their /healthz says, restarts how often
    the supervisor started them again (docs/operations.md, "Supervision")."""
    stack = clients.local_stack(state_dir)
    if watch:
        watch_stack(stack, interval=2.0)
        return
    rows = stack.status()
    if not rows:
        fail(f"no stack recorded in {stack.state_dir}", soft_wrap=False)
    if as_json:
        import json

        print(json.dumps(rows, indent=2))
    else:
        console.print(status_table(rows))
    if not all(r["healthy"] for r in rows):
        raise typer.Exit(1)


def watch_stack(stack: LocalStack, interval: float) -> None:
    """A live view of the stack until Ctrl-C: components, topics, objects, datasets, models, health."""
    from cdl_tools.stack._watch import HealthReader, StackObserver

    state = stack.read_state()
    if "kafka" not in state:
        fail("no running stack to watch", soft_wrap=False)
    observer = StackObserver(state)
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
        parts: list[Any] = [status_table(snap.components), topics, objects, datasets, models]
        if health.latest or health.alerts:
            parts.extend(health_tables(health.rows(), health.alert_rows()))
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
