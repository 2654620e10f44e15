"""``cdl demo``: the whole loop by itself, live, on a stack of its own (cdl_tools.demo_loop)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdl.errors import CdlError
from cdl_tools.cli.output import console, fail

__all__ = ["demo"]


def demo(
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
        fail(
            f"[red]--phases: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(PHASES)}[/]",
            2,
            soft_wrap=False,
        )
    import signal

    from cdl.settings import cdl_home

    root = state_dir or cdl_home() / "demo"
    runner = Demo(
        DemoOptions(state_dir=root, report_dir=report_dir, duration_s=duration, phases=wanted, keep=keep, rate=rate),
        console,
    )

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM: the same way out as Ctrl-C (clients, feed, then the stack)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        summary = runner.run()
    except KeyboardInterrupt:
        raise typer.Exit(130) from None  # interrupted while starting: what started was stopped
    except CdlError as exc:
        fail(f"[red]demo failed[/]: {exc}")
    if summary.get("interrupted"):
        raise typer.Exit(130)
    if not summary.get("ok") or summary.get("client", {}).get("failed"):
        missed = [
            f"{name}: {outcome}" for name, outcome in summary.get("phases", {}).items() if outcome.startswith("missed:")
        ]
        fail(f"[red]the demo did not get every outcome[/] ({'; '.join(missed) or 'see above'})")
