"""``cdl signing-key``: the compressor's model-signing key for a deployment (docs/security.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdl.errors import CdlError
from cdl_tools.cli.output import console, fail

__all__ = ["signing_key"]


def signing_key(
    path: Annotated[Path, typer.Argument(help="Where the private key goes (PEM, mode 0600; an existing one is kept).")],
) -> None:
    """Make the key the compressor signs Triton entries with, and print its public key: the
    value of the gateway's CDL_GATEWAY_TRUSTED_KEYS (a JSON list of such keys)."""
    from cdl.signing import generate_signing_key

    try:
        public = generate_signing_key(path)
    except (OSError, CdlError) as exc:
        fail(f"[red]cannot make the signing key {path}[/]: {exc}", 2)
    console.print(f"private key: {path} (the compressor's CDL_COMPRESSOR_SIGNING_KEY_FILE; keep it secret)")
    print(f"CDL_GATEWAY_TRUSTED_KEYS='[\"{public}\"]'")
