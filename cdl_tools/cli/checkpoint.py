"""``cdl checkpoint``: a model's starting point, your own pretrained weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdl_tools.cli import clients
from cdl_tools.cli.clients import StateDir
from cdl_tools.cli.output import console, fail

__all__ = ["app", "state_dict_bytes", "upload"]

app = typer.Typer(help="A model's starting point: your own pretrained weights.", no_args_is_help=True)


@app.command("upload")
def upload(
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

    try:
        weights = state_dict_bytes(path)
    except Exception as exc:  # noqa: BLE001 - one line for the user, not a traceback
        fail(f"[red]not a state dict[/]: {path}: {exc}")
    state = clients.running_state(state_dir, "minio")
    registry = ModelRegistry(clients.object_store(state))
    doc = registry.set_start(model, weights, list(freeze or []), path.name)
    frozen = ", ".join(doc["freeze"]) or "nothing"
    console.print(f"[green]uploaded[/] {model}'s starting point (sha256 {doc['sha256'][:12]}…; frozen: {frozen})")


def state_dict_bytes(path: Path) -> bytes:
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
