"""Into the loop through Kafka, as any client would: ``cdl produce`` (records into data.raw)
and ``cdl tune`` (a tuning.requested event)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdl_tools.cli import clients
from cdl_tools.cli.clients import StateDir
from cdl_tools.cli.output import AsJson, console, fail

__all__ = ["produce", "tune"]


def produce(
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
        fail(f"[red]cannot read {source}[/]: {exc.strerror or exc}")
    records: list[bytes] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            fail(f"[red]line {n}: not JSON[/]: {exc}")
        if not isinstance(doc, dict):
            fail(f"[red]line {n}: not a JSON object[/]")
        if dataset and "dataset" not in doc:
            doc["dataset"] = dataset
        records.append(orjson.dumps(doc))
    sender = clients.producer(clients.kafka_bootstrap(bootstrap, state_dir, "--bootstrap"), 15000)
    for value in records:
        sender.send_raw(topic, value)
    clients.deliver(sender, 30, "not all records were produced")
    if as_json:
        print(json.dumps({"produced": len(records), "topic": topic}))
    else:
        console.print(f"produced {len(records)} records to {topic}")


def tune(
    model: Annotated[str, typer.Argument(help="Model name (its dataset's).")],
    reason: Annotated[str, typer.Option(help="Why (recorded in tuning.completed).")] = "",
    kafka: Annotated[str | None, typer.Option(help="Kafka bootstrap (default: the local stack's).")] = None,
    state_dir: StateDir = None,
) -> None:
    """Ask the tuner to run a study for MODEL now (a tuning.requested event)."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from cdl.events import Event, Topics, source_name
    from cdl.v1 import events_pb2

    bootstrap = clients.kafka_bootstrap(kafka, state_dir, "--kafka")
    now = Timestamp()
    now.GetCurrentTime()
    # one small event: a broker that takes it at all takes it in seconds (and a stopped one is
    # reported after 5 s, not 15)
    sender = clients.producer(bootstrap, 5000)
    msg = events_pb2.TuningRequested(model=model, reason=reason, time=now)
    sender.send(Topics.TUNING_REQUESTED, Event(msg, source=source_name("cli"), key=model))
    clients.deliver(sender, 6, "the request did not reach Kafka")
    console.print(f"tuning requested for [bold]{model}[/]; the result comes on {Topics.TUNING_COMPLETED}")
