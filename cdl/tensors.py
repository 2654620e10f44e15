"""Open Inference Protocol tensors as numpy reads them (no grpc: the messages only).

Shared by the gateway's inference log (top labels of a response) and the
monitor (the inputs of a logged request, for drift tests and training records).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError as ProtoDecodeError

from cdl.errors import DecodeError
from cdl.v1 import open_inference_pb2 as pb

__all__ = ["NUMPY_DTYPES", "InputTensor", "first_input", "split_bytes"]

#: Open Inference Protocol datatypes numpy can read as they travel (little-endian)
NUMPY_DTYPES: dict[str, str] = {
    "BOOL": "?",
    "UINT8": "u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}

_TYPED = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "BOOL": "bool_contents",
}


@dataclass(frozen=True, slots=True)
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    values: npt.NDArray[np.generic] | list[bytes]
    """Numeric: an array of ``shape``; ``BYTES``: one element per row (its first)."""


def split_bytes(raw: bytes) -> list[bytes]:
    """The elements of a raw ``BYTES`` tensor (each a 4-byte little-endian length, then the bytes)."""
    out: list[bytes] = []
    i = 0
    while i + 4 <= len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise DecodeError("BYTES tensor element runs past its end")
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    if i != len(raw):
        raise DecodeError("BYTES tensor has trailing bytes")
    return out


def first_input(request: bytes) -> InputTensor:
    """The first input of a serialized ``ModelInferRequest``; :class:`DecodeError` when unreadable."""
    try:
        req = pb.ModelInferRequest.FromString(request)
    except ProtoDecodeError as exc:
        raise DecodeError(f"not a ModelInferRequest: {exc}") from exc
    if not req.inputs:
        raise DecodeError("request has no inputs")
    spec = req.inputs[0]
    shape = tuple(int(d) for d in spec.shape)
    rows = shape[0] if shape else 1
    if spec.datatype == "BYTES":
        raw = req.raw_input_contents
        elems = split_bytes(raw[0]) if raw else list(spec.contents.bytes_contents)
        per_row = max(1, len(elems) // max(1, rows))
        return InputTensor(spec.name, spec.datatype, shape, elems[::per_row][:rows])
    dtype = NUMPY_DTYPES.get(spec.datatype)
    if dtype is None:
        raise DecodeError("unsupported input datatype", datatype=spec.datatype)
    if req.raw_input_contents:
        first: bytes = req.raw_input_contents[0]
        if len(first) % np.dtype(dtype).itemsize:
            raise DecodeError("raw input is not a whole number of elements", datatype=spec.datatype, bytes=len(first))
        values: npt.NDArray[np.generic] = np.frombuffer(first, dtype=dtype)
    elif spec.datatype in _TYPED:
        values = np.asarray(getattr(spec.contents, _TYPED[spec.datatype]), dtype=dtype)
    else:
        raise DecodeError("input has no contents", datatype=spec.datatype)
    expected = math.prod(shape) if shape else 1
    if values.size != expected:
        raise DecodeError("input contents do not match its shape", shape=list(shape), elements=int(values.size))
    return InputTensor(spec.name, spec.datatype, shape, values.reshape(shape or (1,)))
