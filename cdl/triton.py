"""Triton model repository entries: config.pbtxt rendering, writing to MinIO,
syncing to a server's local repository, and model control.

Layout (DESIGN.md): ``cdl-triton/<model>/config.pbtxt`` and
``cdl-triton/<model>/<n>/model.onnx`` (+ ``model.py`` for the python backend).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from pathlib import Path

from cdl.store import ObjectStore

__all__ = [
    "TRITON_BUCKET",
    "Backend",
    "ModelSpec",
    "TensorSpec",
    "render_config",
    "runner_source",
    "sync_model",
    "write_entry",
]

TRITON_BUCKET = "cdl-triton"

# numpy dtype name -> Triton config data_type
_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}


class Backend(StrEnum):
    """How Triton runs the ONNX file."""

    PYTHON_ONNXRUNTIME = "python"  # local Triton from the nvidia-pytriton wheel
    ONNXRUNTIME = "onnxruntime"  # production Triton image (onnxruntime_onnx platform)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    dims: tuple[int, ...]  # without the batch dimension; -1 for variable

    @property
    def triton_type(self) -> str:
        try:
            return _DTYPES[self.dtype]
        except KeyError as exc:
            raise ValueError(f"unsupported tensor dtype {self.dtype!r}") from exc


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 64
    backend: Backend = Backend.PYTHON_ONNXRUNTIME
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"
    max_queue_delay_us: int = 200
    preferred_batch_sizes: tuple[int, ...] = field(default_factory=tuple)


def _tensor_block(kind: str, tensors: tuple[TensorSpec, ...]) -> str:
    items = []
    for t in tensors:
        dims = ", ".join(str(d) for d in t.dims)
        items.append(f'  {{\n    name: "{t.name}"\n    data_type: {t.triton_type}\n    dims: [ {dims} ]\n  }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def render_config(spec: ModelSpec) -> str:
    """The ``config.pbtxt`` of a model."""
    head = f'name: "{spec.name}"\n'
    if spec.backend is Backend.PYTHON_ONNXRUNTIME:
        head += 'backend: "python"\n'
    else:
        head += 'platform: "onnxruntime_onnx"\n'
    head += f"max_batch_size: {spec.max_batch_size}\n"
    body = _tensor_block("input", spec.inputs) + _tensor_block("output", spec.outputs)
    batching = "dynamic_batching {\n"
    if spec.preferred_batch_sizes:
        batching += f"  preferred_batch_size: [ {', '.join(map(str, spec.preferred_batch_sizes))} ]\n"
    batching += f"  max_queue_delay_microseconds: {spec.max_queue_delay_us}\n}}\n"
    instances = f"instance_group [\n  {{\n    count: {spec.instance_count}\n    kind: {spec.instance_kind}\n  }}\n]\n"
    policy = "version_policy: { latest: { num_versions: 2 } }\n"
    return head + body + batching + instances + policy


def runner_source() -> str:
    """Source of the python-backend ONNX Runtime runner (``model.py``)."""
    return resources.files("cdl").joinpath("_triton_runner.py").read_text()


def write_entry(store: ObjectStore, spec: ModelSpec, version: int, onnx_bytes: bytes) -> str:
    """Write (or rewrite, identically) a repository entry; returns its URI."""
    prefix = f"{spec.name}/{version}"
    store.put_bytes(TRITON_BUCKET, f"{prefix}/model.onnx", onnx_bytes)
    if spec.backend is Backend.PYTHON_ONNXRUNTIME:
        store.put_bytes(TRITON_BUCKET, f"{prefix}/model.py", runner_source().encode(), "text/x-python")
    store.put_bytes(TRITON_BUCKET, f"{spec.name}/config.pbtxt", render_config(spec).encode(), "text/plain")
    return f"s3://{TRITON_BUCKET}/{prefix}/"


def sync_model(store: ObjectStore, model: str, repository: Path) -> Path:
    """Mirror ``cdl-triton/<model>/`` into a server's local repository directory.

    Files are written to a temporary directory and swapped in, so Triton never
    reads a half-written entry.
    """
    dest = repository / model
    tmp = repository / f".{model}.sync"
    shutil.rmtree(tmp, ignore_errors=True)
    found = False
    for obj in store.list(TRITON_BUCKET, prefix=f"{model}/"):
        rel = obj.key[len(model) + 1 :]
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.get_bytes(TRITON_BUCKET, obj.key))
        found = True
    if not found:
        from cdl.errors import NotFoundError

        raise NotFoundError("no Triton repository entry", model=model)
    old = repository / f".{model}.old"
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest
