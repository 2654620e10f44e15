"""The ``cdl`` command line: the local stack and (as they land) the services."""

from __future__ import annotations

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
from cdl.settings import StackSettings
from cdl.stack import LocalStack

__all__ = ["app", "main"]

app = typer.Typer(help="cdl: continuous deep learning over Kafka, MinIO and Triton.", no_args_is_help=True)
stack_app = typer.Typer(help="Start, inspect and stop the local stack.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
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
    for col in ("component", "pid", "state", "endpoints", "log"):
        table.add_column(col)
    for r in rows:
        if r["healthy"]:
            st = "[green]healthy[/]"
        elif r["running"]:
            st = "[yellow]running, not healthy[/]"
        else:
            st = "[red]stopped[/]"
        table.add_row(r["name"], str(r["pid"]), st, r["endpoint"], r["log"])
    return table


@stack_app.command("up")
def stack_up(
    state_dir: StateDir = None,
    triton_servers: Annotated[int | None, typer.Option(help="Number of Triton servers.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stay in the foreground with a live view; Ctrl-C stops the stack.")
    ] = False,
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
            done = phase in ("ready", "failed") or (phase == "healthy" and component.startswith("triton"))
            progress.update(
                tasks[component], description=f"{component}: [{colour}]{phase}[/] {detail}", completed=1 if done else 0
            )

        try:
            state = stack.up(report)
        except CdlError as exc:
            console.print(f"[red]stack failed to start:[/] {exc}")
            raise typer.Exit(1) from exc
    console.print(f"[green]stack healthy[/] in {time.monotonic() - start:.1f}s; state in {stack.state_path}")
    if stack.reused:
        console.print(f"  already running: {', '.join(stack.reused)}")
    console.print(f"  kafka    {state['kafka']['bootstrap']}")
    console.print(f"  minio    {state['minio']['endpoint']}")
    for t in state.get("triton", []):
        console.print(f"  triton   grpc {t['grpc']}  http {t['http']}  repository {t['repository']}")
    if follow:
        try:
            _watch(stack, interval=2.0)
        finally:
            stopped = stack.down()
            console.print(f"stopped: {', '.join(stopped) or 'nothing'}")


@stack_app.command("down")
def stack_down(state_dir: StateDir = None) -> None:
    """Stop exactly the processes `cdl stack up` started."""
    stack = _stack(state_dir)
    stopped = stack.down(lambda c, p, d: console.print(f"  {c}: {p} ({d})"))
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@stack_app.command("status")
def stack_status(
    state_dir: StateDir = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh a live view until Ctrl-C.")] = False,
) -> None:
    """Show each component of the local stack (and, with --watch, topics and artifacts live)."""
    stack = _stack(state_dir)
    if watch:
        _watch(stack, interval=2.0)
        return
    rows = stack.status()
    if not rows:
        console.print(f"no stack recorded in {stack.state_dir}")
        raise typer.Exit(1)
    console.print(_status_table(rows))
    if not all(r["healthy"] for r in rows):
        raise typer.Exit(1)


def _watch(stack: LocalStack, interval: float) -> None:
    from cdl.stack._watch import StackObserver

    state = stack.read_state()
    if "kafka" not in state:
        console.print("no running stack to watch")
        raise typer.Exit(1)
    observer = StackObserver(state)

    def render() -> Group:
        snap = observer.snapshot(stack.status())
        topics = Table(title="topics (records)")
        topics.add_column("topic")
        topics.add_column("records", justify="right")
        for name, n in snap.topics.items():
            topics.add_row(name, str(n))
        objects = Table(title="object store")
        objects.add_column("bucket")
        objects.add_column("objects", justify="right")
        for name, n in snap.objects.items():
            objects.add_row(name, str(n))
        parts: list[Any] = [_status_table(snap.components), topics, objects]
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
