"""Triton model repository entries: config.pbtxt rendering and writing to MinIO
(Triton reads its repository from there, ``s3://``).

Layout (DESIGN.md): ``cdl-triton/<model>/config.pbtxt`` and
``cdl-triton/<model>/<n>/model.onnx`` (+ ``model.py`` for the python backend, and
``cdl-signature.json`` when the entry is signed: cdl.signing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from typing import TYPE_CHECKING

from cdl.store import BlobStore

if TYPE_CHECKING:
    from cdl.signing import Signer

__all__ = [
    "TRITON_BUCKET",
    "Backend",
    "ModelSpec",
    "TensorSpec",
    "render_config",
    "runner_source",
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
    "string": "TYPE_STRING",  # Open Inference Protocol BYTES: a text model's input
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
    #: ONNX Runtime's intra-op threads per instance: the ``intra_op_thread_count`` parameter,
    #: which Triton's onnxruntime backend and cdl's python-backend runner both read
    intra_op_threads: int = 1


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
    threads = f'parameters: {{ key: "intra_op_thread_count" value: {{ string_value: "{spec.intra_op_threads}" }} }}\n'
    return head + body + batching + instances + policy + threads


def runner_source() -> str:
    """Source of the python-backend ONNX Runtime runner (``model.py``)."""
    return resources.files("cdl").joinpath("_triton_runner.py").read_text()


def write_entry(
    store: BlobStore,
    spec: ModelSpec,
    version: int,
    onnx_bytes: bytes,
    files: Mapping[str, bytes] | None = None,
    signer: Signer | None = None,
) -> str:
    """Write (or rewrite, identically) a repository entry; returns its URI.

    ``files``: more files for the version's directory, e.g. a text model's ``tokenizer.json``
    (the python-backend runner then takes texts and tokenizes them: cdl/_triton_runner.py).
    ``signer``: sign the entry (cdl.signing), its signature written after the version's files
    and before the model's ``config.pbtxt``.
    """
    prefix = f"{spec.name}/{version}"
    blobs = {**(files or {}), "model.onnx": onnx_bytes}
    if spec.backend is Backend.PYTHON_ONNXRUNTIME:
        blobs["model.py"] = runner_source().encode()
    for name, blob in blobs.items():
        kind = "text/x-python" if name.endswith(".py") else "application/octet-stream"
        store.put_bytes(TRITON_BUCKET, f"{prefix}/{name}", blob, kind)
    config = render_config(spec).encode()
    if signer is not None:
        from cdl.signing import SIGNATURE_FILE

        store.put_json(TRITON_BUCKET, f"{prefix}/{SIGNATURE_FILE}", signer.sign(spec.name, version, blobs, config))
    store.put_bytes(TRITON_BUCKET, f"{spec.name}/config.pbtxt", config, "text/plain")
    return f"s3://{TRITON_BUCKET}/{prefix}/"
