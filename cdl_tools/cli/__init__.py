"""The ``cdl`` command line: the local stack, datasets, models, the loop's events and reports.

The root app and its one option (``--tls-ca``); each command group or topic is a module of
its own, and :mod:`cdl_tools.cli.clients` builds everything a command talks to:

- ``stack``: ``cdl stack up|down|env|status`` (and the live view);
- ``dataset``: ``cdl dataset register|show``, ``cdl datasets`` (the ingest service);
- ``models``: ``cdl models|approve|rollback|traffic`` (the gateway's admin API);
- ``predict``: ``cdl predict`` (the gateway's inference API);
- ``loop``: ``cdl produce|tune`` (into Kafka, as any client would);
- ``observe``: ``cdl status|report|trace`` (what the loop did);
- ``run_demo``: ``cdl demo``; ``checkpoint``: ``cdl checkpoint upload``;
- ``keys``: ``cdl signing-key`` (the compressor's model-signing key, docs/security.md);
- ``output``: the console and the one-line failure (an exit code, never a traceback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdl_tools.cli import checkpoint, clients, dataset, keys, loop, models, observe, predict, run_demo, stack

__all__ = ["app", "main"]

app = typer.Typer(help="cdl: continuous deep learning over Kafka, MinIO and Triton.", no_args_is_help=True)


@app.callback()
def _options(
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-ca",
            envvar="CDL_TLS_CA",
            help=(
                "Talk TLS to the gateway and to ingest, trusting this CA's PEM"
                " (a gateway with CDL_GATEWAY_TLS_CERT_FILE)."
            ),
        ),
    ] = None,
) -> None:
    """cdl: continuous deep learning over Kafka, MinIO and Triton."""
    clients.set_tls_ca(tls_ca)


# the commands, in the order `cdl --help` lists them
for _name, _command in (
    ("status", observe.status),
    ("datasets", dataset.datasets),
    ("report", observe.report),
    ("trace", observe.trace),
    ("demo", run_demo.demo),
    ("models", models.models),
    ("produce", loop.produce),
    ("approve", models.approve),
    ("rollback", models.rollback),
    ("traffic", models.traffic),
    ("tune", loop.tune),
    ("predict", predict.predict),
    ("signing-key", keys.signing_key),
):
    app.command(_name)(_command)
app.add_typer(stack.app, name="stack")
app.add_typer(dataset.app, name="dataset")
app.add_typer(checkpoint.app, name="checkpoint")


def main() -> None:
    """The ``cdl`` entry point."""
    app()
