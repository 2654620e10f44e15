"""``cdl predict``: inputs through the gateway's inference API (the Open Inference Protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cdl_tools.cli import clients
from cdl_tools.cli.clients import ApiKey, GatewayEndpoint, StateDir
from cdl_tools.cli.output import AsJson, console, fail

__all__ = ["predict"]


def predict(
    model: Annotated[str, typer.Argument(help="Model name.")],
    inputs: Annotated[Path, typer.Argument(help="A .npy array or a JSON file (a list of numbers, or a list of rows).")],
    version: Annotated[str, typer.Option(help="A version (default: what the gateway serves).")] = "",
    as_json: AsJson = False,
    gateway: GatewayEndpoint = None,
    key: ApiKey = None,
    state_dir: StateDir = None,
) -> None:
    """Send inputs through the gateway; prints each row's top class and score."""
    import json

    import numpy as np
    import tritonclient.grpc as tgrpc
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    target, metadata = clients.gateway(gateway, key, state_dir)
    headers = {k: v if isinstance(v, str) else v.decode() for k, v in metadata}
    try:
        raw = np.load(inputs) if inputs.suffix == ".npy" else json.loads(inputs.read_text())
        x = np.asarray(raw)
    except (OSError, ValueError) as exc:
        fail(f"[red]cannot read {inputs}[/]: {exc}", 2)
    client = clients.inference_client(target)
    try:
        meta = client.get_model_metadata(model, version, headers=headers)
        spec = meta.inputs[0]
        want = list(spec.shape[1:])
        if spec.datatype == "BYTES":  # a text model: a text or a list of texts, one per row
            texts = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw, list) else []
            if not texts or not all(isinstance(t, str) for t in texts):
                fail(f"[red]{model} takes texts[/]: give a JSON string or a list of strings", 2)
            x = np.array([t.encode() for t in texts], dtype=np.object_).reshape(-1, 1)
        else:
            try:
                x = x.astype(tgrpc.triton_to_np_dtype(spec.datatype))
            except (TypeError, ValueError) as exc:
                fail(f"[red]{model} takes numbers ({spec.datatype})[/]: {exc}", 2)
        try:
            if x.ndim == 1 or list(x.shape) == [d for d in want if d > 0]:
                x = x.reshape(1, *[d if d > 0 else -1 for d in want]) if want else x.reshape(1, -1)
            elif x.ndim == len(want):
                x = x.reshape(x.shape[0], *[d if d > 0 else -1 for d in want])
        except ValueError:  # does not fit: sent as it is, the gateway says what it expects
            x = x.reshape(1, -1) if x.ndim == 1 else x
        inp = tgrpc.InferInput(
            spec.name, list(x.shape), "BYTES" if x.dtype == np.object_ else np_to_triton_dtype(x.dtype)
        )
        inp.set_data_from_numpy(x)
        result = client.infer(model, [inp], model_version=version, headers=headers)
    except InferenceServerException as exc:
        fail(f"[red]{exc.status() or 'error'}[/]: {' '.join(str(exc.message()).split())}")
    finally:
        client.close()
    out = result.as_numpy(meta.outputs[0].name)
    logits = out.reshape(out.shape[0], -1)
    served = result.get_response().model_version
    rows: list[dict[str, Any]]
    if logits.shape[1] == 1:  # one output: a regression's value
        rows = [{"value": float(v)} for v in logits[:, 0]]
    else:
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        rows = [{"class": int(p.argmax()), "score": float(p.max())} for p in probs]
    if as_json:
        console.print_json(json.dumps({"model": model, "version": served, "predictions": rows}))
        return
    table = Table(title=f"{model} v{served}")
    cols = list(rows[0]) if rows else ["class", "score"]
    for col in ("row", *cols):
        table.add_column(col)
    for i, r in enumerate(rows):
        table.add_row(str(i), *(str(v) if isinstance(v, int) else f"{v:.4g}" for v in r.values()))
    console.print(table)
