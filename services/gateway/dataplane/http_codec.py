"""The Open Inference Protocol's REST/HTTP v2 bodies, to and from its gRPC messages.

The gateway serves REST by translating each call into the gRPC message the gRPC path
takes, so an HTTP request goes through the same key check, routing, canary and shadow
split, inference log and rollback accounting as a ``ModelInfer`` (and is logged in the
same protobuf form the monitor reads). This module is the translation only (no I/O):

- an infer body is JSON, or JSON followed by the tensors' bytes (Triton's binary tensor
  extension: the ``Inference-Header-Content-Length`` header gives the JSON's length, and
  an input with ``parameters.binary_data_size`` takes that many bytes, in order);
  :func:`infer_request` checks it (every input named, typed, shaped, its data of the
  size its shape says, no byte left over) and gives a serialized ``ModelInferRequest``
  with every input as raw contents -- what the gRPC path forwards;
- :func:`infer_response` gives the JSON (and binary) body of a ``ModelInferResponse``:
  each output as JSON ``data``, or as bytes after the JSON where the request asked for
  binary (``parameters.binary_data`` on the output, or ``binary_data_output`` on the
  request);
- :func:`response_message` reads an infer answer's body back into a serialized
  ``ModelInferResponse`` (what the native lane served over REST, for the inference log);
- :func:`message_json` is any other message (metadata, config, statistics) as the
  JSON Triton answers: proto field names, 64-bit integers as numbers.

Bad input is an :class:`~cdl.errors.InvalidInputError` naming what is wrong.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2

from cdl.errors import InvalidInputError

__all__ = [
    "DTYPES",
    "HEADER_LENGTH",
    "InferBody",
    "infer_request",
    "infer_response",
    "message_json",
    "parse_json",
    "response_message",
]

#: the header that gives the JSON part's length in a binary-extension body
HEADER_LENGTH = "Inference-Header-Content-Length"

#: the protocol's datatypes with a fixed size, as numpy (little-endian) types
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_U32 = struct.Struct("<I")
#: most dimensions an input may have (Triton's own limit is lower in practice)
_MAX_DIMS = 32


@dataclass(frozen=True)
class InferBody:
    """A translated infer request: the serialized ``ModelInferRequest`` and how to answer it."""

    request: bytes
    binary: Mapping[str, bool]
    """Per requested output: whether it is answered as bytes (absent: ``binary_default``)."""
    binary_default: bool


def parse_json(data: bytes, trusted: bool = False) -> Any:
    """A JSON body, or an InvalidInputError saying why it is not one (nesting too deep too).
    ``trusted``: one Triton accepted or wrote, read with orjson (faster; it reads an integer
    past 64 bits as a float, which a client's body must not get away with)."""
    try:
        return orjson.loads(data) if trusted else json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # (orjson.JSONDecodeError is a ValueError)
        raise _bad(f"malformed JSON: {str(exc)[:200]}") from None


def _bad(reason: str) -> InvalidInputError:
    return InvalidInputError(reason)


def _set_param(param: Any, value: Any, where: str) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        if -(2**63) <= value < 2**63:
            param.int64_param = value
        elif 0 <= value < 2**64:
            param.uint64_param = value
        else:
            raise _bad(f"{where}: an integer parameter must fit 64 bits")
    elif isinstance(value, float):
        param.double_param = value
    elif isinstance(value, str):
        param.string_param = value
    else:
        raise _bad(f"{where}: a parameter must be a boolean, a number or a string")


def _params(doc: Mapping[str, Any], where: str) -> dict[str, Any]:
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise _bad(f"{where}: parameters must be an object")
    return params


def _flatten(data: Any, out: list[Any]) -> None:
    if isinstance(data, list):
        for item in data:
            _flatten(item, out)
    else:
        out.append(data)


def _raw_trusted(data: Any, datatype: str, count: int, where: str) -> bytes:
    """:func:`_raw_from_json` for bodies Triton accepted or wrote (the log reads back what the
    native lane served): numbers converted by numpy at once, only their count checked."""
    if datatype == "BYTES":
        return _raw_from_json(data, datatype, count, where)
    try:
        array = np.asarray(data, dtype=DTYPES[datatype])
    except (ValueError, TypeError, OverflowError) as exc:
        raise _bad(f"{where}: data not read: {str(exc)[:100]}") from None
    if array.size != count:
        raise _bad(f"{where}: data has {array.size} elements, its shape says {count}")
    return array.tobytes()


def _raw_from_json(data: Any, datatype: str, count: int, where: str) -> bytes:
    """The raw little-endian bytes of an input's JSON ``data`` (nested or flat, row-major)."""
    flat: list[Any] = []
    _flatten(data, flat)
    if len(flat) != count:
        raise _bad(f"{where}: data has {len(flat)} elements, its shape says {count}")
    if datatype == "BYTES":
        parts = []
        for item in flat:
            if not isinstance(item, str):
                raise _bad(f"{where}: BYTES data must be strings")
            raw = item.encode()
            parts.append(_U32.pack(len(raw)) + raw)
        return b"".join(parts)
    dtype = DTYPES[datatype]
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in flat):
            raise _bad(f"{where}: BOOL data must be true or false")
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        if not all(isinstance(v, int) and not isinstance(v, bool) and info.min <= v <= info.max for v in flat):
            raise _bad(f"{where}: {datatype} data must be integers from {info.min} to {info.max}")
    elif not all(
        (isinstance(v, float) and math.isfinite(v))
        or (isinstance(v, int) and not isinstance(v, bool) and -(2**1023) < v < 2**1023)
        for v in flat
    ):
        raise _bad(f"{where}: {datatype} data must be finite numbers")
    array = np.asarray(flat, dtype=np.float64 if dtype.kind == "f" else dtype)
    if dtype.kind == "f":
        if array.size and float(np.abs(array).max()) > float(np.finfo(dtype).max):
            raise _bad(f"{where}: data does not fit {datatype}")
        array = array.astype(dtype)
    return array.tobytes()


def _bytes_size(raw: bytes, count: int, where: str) -> None:
    """Check raw BYTES contents: ``count`` elements, each a 4-byte length and that many bytes."""
    pos = 0
    for _ in range(count):
        if pos + 4 > len(raw):
            raise _bad(f"{where}: BYTES data ends early")
        (n,) = _U32.unpack_from(raw, pos)
        pos += 4 + n
    if pos != len(raw):
        raise _bad(f"{where}: BYTES data is not {count} length-prefixed elements")


def infer_request(model: str, version: str, body: bytes, header_length: int | None, trusted: bool = False) -> InferBody:
    """Translate an infer request's body (see the module docstring). ``trusted``: a body Triton
    accepted already (the log's reading of what the native lane served): JSON data is converted
    without the element-by-element checks."""
    try:
        return _infer_request(model, version, body, header_length, trusted)
    except InvalidInputError:
        raise
    except (ValueError, TypeError, OverflowError, UnicodeError) as exc:  # what a check missed: still the client's
        raise _bad(f"request not accepted: {type(exc).__name__}: {str(exc)[:200]}") from None


#: parameters that would make Triton read or write a shared-memory region (registration is refused)
_SHARED_MEMORY = frozenset({"shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"})


def _json_part(body: bytes, header_length: int | None, trusted: bool) -> tuple[bytes, Any]:
    """A body's JSON part (all of it, or its first ``header_length`` bytes) and what it holds."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise _bad(f"{HEADER_LENGTH} must be between 1 and the body's length ({len(body)})")
    head = body[:header_length] if header_length is not None else body
    return head, parse_json(head, trusted)


def _infer_request(model: str, version: str, body: bytes, header_length: int | None, trusted: bool) -> InferBody:
    head, doc = _json_part(body, header_length, trusted)
    raw_of = _raw_trusted if trusted else _raw_from_json
    if not isinstance(doc, dict):
        raise _bad("the request must be a JSON object")
    req = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise _bad("id must be a string")
    req.id = request_id
    binary_default = False
    for key, value in _params(doc, "request").items():
        if key == "binary_data_output":
            binary_default = value is True
            continue
        _set_param(req.parameters[str(key)], value, f"parameter {key!r}")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("inputs must be a non-empty list")
    offset = len(head)
    for i, inp in enumerate(inputs):
        if not isinstance(inp, dict):
            raise _bad(f"input {i} must be an object")
        name, datatype, shape = inp.get("name"), inp.get("datatype"), inp.get("shape")
        where = f"input {name!r}" if isinstance(name, str) else f"input {i}"
        if not isinstance(name, str) or not name:
            raise _bad(f"{where}: a name is required")
        if datatype not in DTYPES and datatype != "BYTES":
            raise _bad(f"{where}: unknown datatype {str(datatype)[:20]!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape)
        ):
            raise _bad(f"{where}: shape must be a list of at most {_MAX_DIMS} non-negative integers")
        count = math.prod(shape)
        tensor = req.inputs.add(name=name, datatype=datatype, shape=shape)
        params = _params(inp, where)
        if _SHARED_MEMORY & params.keys():
            raise _bad(f"{where}: shared memory is not available through the gateway")
        size = params.pop("binary_data_size", None)
        for key, value in params.items():
            _set_param(tensor.parameters[str(key)], value, f"{where} parameter {key!r}")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or header_length is None:
                raise _bad(f"{where}: binary_data_size needs a non-negative size and {HEADER_LENGTH}")
            raw = body[offset : offset + size]
            if len(raw) != size:
                raise _bad(f"{where}: binary_data_size {size} is more than the body holds")
            offset += size
            if datatype == "BYTES":
                _bytes_size(raw, count, where)
            elif size != count * DTYPES[datatype].itemsize:
                raise _bad(f"{where}: {size} bytes for {count} {datatype} elements")
        elif "data" in inp:
            raw = raw_of(inp["data"], datatype, count, where)
        else:
            raise _bad(f"{where}: data or parameters.binary_data_size is required")
        req.raw_input_contents.append(raw)
    if offset != len(body):
        raise _bad(f"{len(body) - offset} bytes after the inputs' data")
    binary: dict[str, bool] = {}
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list):
        raise _bad("outputs must be a list")
    for i, out in enumerate(outputs):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise _bad(f"output {i} must be an object with a name")
        tensor = req.outputs.add(name=out["name"])
        out_params = _params(out, f"output {out['name']!r}")
        if _SHARED_MEMORY & out_params.keys():
            raise _bad(f"output {out['name']!r}: shared memory is not available through the gateway")
        for key, value in out_params.items():
            if key == "binary_data":
                binary[out["name"]] = value is True
            else:
                _set_param(tensor.parameters[str(key)], value, f"output {out['name']!r} parameter {key!r}")
    return InferBody(bytes(req.SerializeToString()), binary, binary_default)


def _output_json(raw: bytes, datatype: str, shape: list[int]) -> list[Any]:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos + 4 <= len(raw):
            (n,) = _U32.unpack_from(raw, pos)
            items.append(raw[pos + 4 : pos + 4 + n].decode(errors="replace"))
            pos += 4 + n
        return items
    dtype = DTYPES.get(datatype)
    if dtype is None:
        return []
    values: list[Any] = np.frombuffer(raw, dtype=dtype).tolist()
    return values


def _params_json(params: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(p, which)
    return out


def infer_response(response: bytes, body: InferBody) -> tuple[bytes, int | None]:
    """The HTTP body of a serialized ``ModelInferResponse``, and the JSON part's length when
    binary outputs follow it (None: the body is all JSON)."""
    msg = service_pb2.ModelInferResponse.FromString(response)
    doc: dict[str, Any] = {"model_name": msg.model_name, "model_version": msg.model_version}
    if msg.id:
        doc["id"] = msg.id
    if msg.parameters:
        doc["parameters"] = _params_json(msg.parameters)
    tail: list[bytes] = []
    outputs = []
    for i, out in enumerate(msg.outputs):
        raw = msg.raw_output_contents[i] if i < len(msg.raw_output_contents) else b""
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        params = _params_json(out.parameters)
        if body.binary.get(out.name, body.binary_default):
            params["binary_data_size"] = len(raw)
            tail.append(raw)
        else:
            entry["data"] = _output_json(raw, out.datatype, list(out.shape))
        if params:
            entry["parameters"] = params
        outputs.append(entry)
    doc["outputs"] = outputs
    head = orjson.dumps(doc)
    if not tail:
        return head, None
    return head + b"".join(tail), len(head)


def response_message(body: bytes, header_length: int | None) -> bytes:
    """The serialized ``ModelInferResponse`` of an infer answer's HTTP body (JSON, or JSON
    and binary outputs after ``header_length`` bytes): the inverse of :func:`infer_response`.
    An :class:`InvalidInputError` where the body is not such an answer."""
    try:
        return _response_message(body, header_length)
    except InvalidInputError:
        raise
    except (ValueError, TypeError, OverflowError, UnicodeError, KeyError) as exc:
        raise _bad(f"answer not read: {type(exc).__name__}: {str(exc)[:200]}") from None


def _response_message(body: bytes, header_length: int | None) -> bytes:
    head, doc = _json_part(body, header_length, trusted=True)
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs", []), list):
        raise _bad("an infer answer is a JSON object with a list of outputs")
    msg = service_pb2.ModelInferResponse(
        model_name=str(doc.get("model_name", "")), model_version=str(doc.get("model_version", ""))
    )
    msg.id = str(doc.get("id", ""))
    for key, value in _params(doc, "answer").items():
        _set_param(msg.parameters[str(key)], value, f"parameter {key!r}")
    offset = len(head)
    for i, out in enumerate(doc.get("outputs", [])):
        if not isinstance(out, dict):
            raise _bad(f"output {i} must be an object")
        name, datatype, shape = str(out.get("name", "")), str(out.get("datatype", "")), out.get("shape", [])
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise _bad(f"output {name!r}: shape must be a list of non-negative integers")
        tensor = msg.outputs.add(name=name, datatype=datatype, shape=shape)
        params = _params(out, f"output {name!r}")
        size = params.pop("binary_data_size", None)
        for key, value in params.items():
            _set_param(tensor.parameters[str(key)], value, f"output {name!r} parameter {key!r}")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(body):
                raise _bad(f"output {name!r}: binary_data_size {size} is more than the body holds")
            raw = body[offset : offset + size]
            offset += size
        elif datatype in DTYPES or datatype == "BYTES":
            raw = _raw_trusted(out.get("data", []), datatype, math.prod(shape), f"output {name!r}")
        else:
            raise _bad(f"output {name!r}: unknown datatype {datatype[:20]!r}")
        msg.raw_output_contents.append(raw)
    return bytes(msg.SerializeToString())


_INTS = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
    }
)


def _value_json(fd: Any, value: Any) -> Any:
    """One field's value as JSON (``fd``: its FieldDescriptor, of either protobuf backend)."""
    if fd.message_type is not None:
        return message_json(value)
    if fd.enum_type is not None:
        named = fd.enum_type.values_by_number.get(value)
        return named.name if named is not None else value
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return value.decode(errors="replace")
    if fd.type in _INTS:
        return int(value)
    return value


def message_json(msg: Message) -> dict[str, Any]:
    """A message as Triton's JSON: proto field names, every scalar and list field (defaults
    too, as Triton writes its config and statistics), message fields where set, 64-bit
    integers as numbers."""
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            vfd = fd.message_type.fields_by_name["value"]
            out[fd.name] = {str(k): _value_json(vfd, v) for k, v in value.items()}
        elif fd.is_repeated:
            out[fd.name] = [_value_json(fd, v) for v in value]
        elif fd.message_type is not None:
            if msg.HasField(fd.name):
                out[fd.name] = message_json(value)
        elif fd.containing_oneof is None or msg.WhichOneof(fd.containing_oneof.name) == fd.name:
            out[fd.name] = _value_json(fd, value)
    return out
