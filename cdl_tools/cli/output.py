"""What the ``cdl`` commands print, and the one way a command fails: a single line (rich
markup, not wrapped), then an exit code; never a traceback.

Exit codes: 1 for what went wrong out there (no stack, a server unreachable or refusing),
2 for what the user gave (an unreadable file, a value out of range).
"""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer
from rich.console import Console

__all__ = ["AsJson", "console", "fail", "rpc_error"]

#: every command prints through this console
console = Console()

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def fail(message: str, code: int = 1, *, soft_wrap: bool = True) -> NoReturn:
    """Print ``message`` (rich markup) and leave the command with exit ``code``."""
    console.print(message, soft_wrap=soft_wrap)
    raise typer.Exit(code)


def rpc_error(exc: Exception) -> typer.Exit:
    """Print a failed call in one line (a gRPC status and its details); the exit to raise."""
    import grpc

    if isinstance(exc, grpc.RpcError):
        console.print(f"[red]{exc.code().name}[/]: {' '.join((exc.details() or '').split())}", soft_wrap=True)
    else:
        console.print(f"[red]error[/]: {exc}", soft_wrap=True)
    return typer.Exit(1)
