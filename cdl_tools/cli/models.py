"""Models at the gateway, through its admin API: ``cdl models`` (with the trainings in
progress), ``cdl approve``, ``cdl rollback`` and ``cdl traffic``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cdl_tools.cli import clients
from cdl_tools.cli.clients import ApiKey, GatewayEndpoint, StateDir
from cdl_tools.cli.output import AsJson, console, fail

__all__ = ["approve", "models", "models_table", "rollback", "traffic", "trainings"]


def models_table(statuses: list[Any]) -> Table:
    """Each model's serving version and mode, and each of its versions' rollout state and traffic."""
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
        console.print(models_table([status]))


def trainings(state_dir: Path | None) -> list[dict[str, Any]]:
    """Trainings in progress: each model's ``training.json`` whose version has no metrics yet."""
    from cdl.registry import MODELS_BUCKET

    state = clients.stack_state(state_dir)
    if not state.get("minio"):
        return []
    out: list[dict[str, Any]] = []
    try:
        store = clients.object_store(state)
        for model in store.folders(MODELS_BUCKET):
            if not store.exists(MODELS_BUCKET, f"{model}/training.json"):
                continue
            doc = store.get_json(MODELS_BUCKET, f"{model}/training.json")
            if not store.exists(MODELS_BUCKET, f"{model}/{doc['version']}/metrics.json"):
                out.append({"model": model, **doc})
    except Exception:  # noqa: BLE001 - progress is a courtesy: the gateway's table still prints
        return out
    return out


def models(
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
        req = admin_pb2.RolloutStatusRequest(model=model)
        _print_status(clients.admin_call(gateway, key, state_dir, "RolloutStatus", req).status, as_json)
        return
    training = trainings(state_dir)
    try:
        listed = clients.admin_call(gateway, key, state_dir, "ListModels", admin_pb2.ListModelsRequest())
    except typer.Exit:
        if not training:  # no gateway yet: what is training is still worth showing
            raise
        listed = admin_pb2.ListModelsResponse()
    if as_json:
        doc = json_format.MessageToDict(listed, preserving_proto_field_name=True)
        console.print_json(data={**doc, "training": training})
        return
    console.print(models_table(list(listed.models)))
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


def approve(
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
    _print_status(clients.admin_call(gateway, key, state_dir, "Approve", req).status, as_json)


def rollback(
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
    _print_status(clients.admin_call(gateway, key, state_dir, "Rollback", req).status, as_json)


def traffic(
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
        fail("[red]the share must be between 0 and 1[/]", 2)
    req = admin_pb2.SetTrafficRequest(model=model, traffic_fraction=share)
    _print_status(clients.admin_call(gateway, key, state_dir, "SetTraffic", req).status, as_json)
