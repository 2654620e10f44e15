"""``cdl dataset`` (register, show) and ``cdl datasets``: datasets, through the ingest service."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cdl_tools.cli import clients
from cdl_tools.cli.clients import IngestEndpoint, StateDir
from cdl_tools.cli.output import AsJson, console, fail

__all__ = ["app", "datasets", "register", "show"]

app = typer.Typer(help="Register and inspect datasets (through the ingest service).", no_args_is_help=True)


@app.command("register")
def register(
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
    from cdl.v1 import ingest_pb2

    tasks = {
        "tabular": ingest_pb2.TASK_TABULAR_CLASSIFICATION,
        "image": ingest_pb2.TASK_IMAGE_CLASSIFICATION,
        "text": ingest_pb2.TASK_TEXT_CLASSIFICATION,
        "regression": ingest_pb2.TASK_REGRESSION,
    }
    if task not in tasks:
        fail(f"[red]--task must be one of {', '.join(tasks)}[/]", 2)
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
    resp = clients.ingest_call(ingest, state_dir, "RegisterDataset", ingest_pb2.RegisterDatasetRequest(spec=spec))
    verb = "registered" if resp.created else "updated"
    console.print(f"[green]{verb}[/] {name} (schema {resp.dataset.schema_hash})")


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    ingest: IngestEndpoint = None,
    state_dir: StateDir = None,
) -> None:
    """Show a dataset's spec and its newest version."""
    from google.protobuf import json_format

    from cdl.v1 import ingest_pb2

    resp = clients.ingest_call(ingest, state_dir, "GetDataset", ingest_pb2.GetDatasetRequest(name=name))
    ds = resp.dataset
    table = Table(title=f"dataset {name}", show_header=False)
    table.add_row("schema hash", ds.schema_hash)
    table.add_row("latest version", str(ds.latest_version))
    for key, value in json_format.MessageToDict(ds.spec, preserving_proto_field_name=True).items():
        table.add_row(key, str(value))
    console.print(table)


def datasets(
    as_json: AsJson = False,
    ingest: IngestEndpoint = None,
    state_dir: StateDir = None,
) -> None:
    """Every registered dataset with its task, labels, policy and newest version."""
    from google.protobuf import json_format

    from cdl.v1 import ingest_pb2

    resp = clients.ingest_call(ingest, state_dir, "ListDatasets", ingest_pb2.ListDatasetsRequest())
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
