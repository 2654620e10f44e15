"""Protobuf wire-format scanning of Open Inference Protocol requests (pure logic).

The gateway forwards a request's bytes to Triton without parsing them. To
route it, it needs three strings of a ``ModelInferRequest`` (``model_name`` =
1, ``model_version`` = 2, ``id`` = 3) or two of a ``ModelReadyRequest`` /
``ModelMetadataRequest`` / ``ModelConfigRequest`` (``name`` = 1,
``version`` = 2). :func:`route_fields` and :func:`name_version` read them
by walking the top-level fields only: a length-delimited field (the input
tensors, their raw contents) is skipped in O(1) whatever its size, so the
cost is per field, not per byte.

The walk follows protobuf's (upb's) rules, so that whatever the scan reads is
what Triton will read:

- the *last* occurrence of a singular field wins, a string field sent with
  another wire type is an unknown field, unknown fields (groups too, up to
  protobuf's nesting limit of 100) are skipped;
- a tag is a varint of at most 5 bytes below 2**32 with a field number of at
  least 1; other varints have at most 10 bytes and wrap at 64 bits; a length
  must fit in what is left; wire types 6 and 7, and an end-group tag without
  its start, are errors; routing strings must be valid UTF-8 (proto3).

Malformed top-level framing raises :class:`~cdl.errors.InvalidInputError`
(INVALID_ARGUMENT). The scan does not look inside the nested messages it
skips: bytes it accepts may still be refused by a full parser (Triton's),
but bytes it refuses are always refused by one, and where a full parser
accepts the bytes the scan reads the same values.

:func:`with_fields` sets fields by appending them (one copy of the request):
appended occurrences are the last ones, so they win. :func:`inputs` reads the
inputs' names, datatypes, shapes and raw byte sizes for cheap validation;
:func:`input_problem` says what cannot be right about them, whatever the model.
"""

from __future__ import annotations

from typing import NamedTuple

from cdl.errors import InvalidInputError

__all__ = [
    "InputMeta",
    "encode_string_field",
    "first_output",
    "id_field",
    "input_problem",
    "inputs",
    "name_version",
    "raw_inputs",
    "route_fields",
    "stream_error",
    "stream_response",
    "version_field",
    "with_fields",
]

_MASK64 = (1 << 64) - 1
_MAX_GROUP_DEPTH = 100

# tags (field number << 3 | wire type) of the fields the gateway reads or writes
_VERSION_TAG = b"\x12"  # model_version = 2, length-delimited
_ID_TAG = b"\x1a"  # id = 3, length-delimited


class InputMeta(NamedTuple):
    """One input tensor of a ``ModelInferRequest``, as far as cheap validation needs it."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw_len: int | None
    """Size of the matching ``raw_input_contents`` entry (by position); None when there is none."""
    has_contents: bool
    """The tensor carries typed ``contents`` instead of (or beside) raw bytes."""


def _bad(reason: str, pos: int) -> InvalidInputError:
    return InvalidInputError(f"malformed request: {reason}", offset=pos)


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A varint at ``pos`` (at most 10 bytes, wrapping at 64 bits) and the position after it."""
    result = 0
    shift = 0
    while pos < end:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift == 70:
            raise _bad("varint longer than 10 bytes", pos)
    raise _bad("truncated varint", pos)


def _tag(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A tag at ``pos`` (at most 5 bytes, below 2**32, field number >= 1) and the position after it."""
    tag = data[pos]
    if tag < 0x80:
        pos += 1
    else:
        tag = 0
        shift = 0
        while True:
            if pos >= end:
                raise _bad("truncated tag", pos)
            b = data[pos]
            pos += 1
            tag |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift == 35:
                raise _bad("tag longer than 5 bytes", pos)
        if tag >> 32:
            raise _bad("tag out of range", pos)
    if tag < 8:
        raise _bad("field number 0", pos)
    return tag, pos


def _length(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The span ``(start, stop)`` of a length-delimited value whose length varint is at ``pos``."""
    if pos < end and data[pos] < 0x80:
        start = pos + 1
        stop = start + data[pos]
    else:
        n, start = _varint(data, pos, end)
        stop = start + n
    if stop > end:
        raise _bad("length past the end of the message", pos)
    return start, stop


def _skip_group(data: bytes, pos: int, end: int, field: int, depth: int) -> int:
    """The position after the end-group tag that closes ``field``'s group."""
    if depth > _MAX_GROUP_DEPTH:
        raise _bad("groups nested too deeply", pos)
    while pos < end:
        tag, pos = _tag(data, pos, end)
        wire = tag & 7
        if wire == 4:
            if tag >> 3 != field:
                raise _bad("end-group tag does not match its group", pos)
            return pos
        pos = _skip(data, pos, end, tag, depth)
    raise _bad("unterminated group", pos)


def _skip(data: bytes, pos: int, end: int, tag: int, depth: int = 0) -> int:
    """The position after the value of a field with ``tag`` starting at ``pos``."""
    wire = tag & 7
    if wire == 2:
        return _length(data, pos, end)[1]
    if wire == 0:
        return _varint(data, pos, end)[1]
    if wire == 1:
        pos += 8
    elif wire == 5:
        pos += 4
    elif wire == 3:
        return _skip_group(data, pos, end, tag >> 3, depth + 1)
    else:
        raise _bad("end-group tag without a group" if wire == 4 else f"invalid wire type {wire}", pos)
    if pos > end:
        raise _bad("truncated fixed-width field", end)
    return pos


def _text(data: bytes, start: int, stop: int) -> str:
    try:
        return data[start:stop].decode()
    except UnicodeDecodeError as exc:
        raise _bad("string field is not valid UTF-8", start) from exc


def route_fields(data: bytes) -> tuple[str, str, str]:
    """``(model_name, model_version, id)`` of a serialized ``ModelInferRequest`` ("" when absent)."""
    name = version = request_id = ""
    end = len(data)
    pos = 0
    while pos < end:
        tag = data[pos]
        if tag < 0x80 and tag >= 8:
            pos += 1
        else:
            tag, pos = _tag(data, pos, end)
        if tag & 7 != 2:
            pos = _skip(data, pos, end, tag)
            continue
        # length-delimited: the routing strings, the inputs and their raw contents
        if pos < end and data[pos] < 0x80:
            start = pos + 1
            pos = start + data[pos]
        else:
            n, start = _varint(data, pos, end)
            pos = start + n
        if pos > end:
            raise _bad("length past the end of the message", start)
        if tag == 0x0A:
            name = _text(data, start, pos)
        elif tag == 0x12:
            version = _text(data, start, pos)
        elif tag == 0x1A:
            request_id = _text(data, start, pos)
    return name, version, request_id


def name_version(data: bytes) -> tuple[str, str]:
    """``(name, version)`` of a serialized ``ModelReadyRequest``, ``ModelMetadataRequest`` or
    ``ModelConfigRequest`` (fields 1 and 2; "" when absent)."""
    name = version = ""
    end = len(data)
    pos = 0
    while pos < end:
        tag, pos = _tag(data, pos, end)
        if tag == 0x0A or tag == 0x12:  # noqa: PLR1714 (ints: a tuple test is slower)
            start, pos = _length(data, pos, end)
            if tag == 0x0A:
                name = _text(data, start, pos)
            else:
                version = _text(data, start, pos)
        else:
            pos = _skip(data, pos, end, tag)
    return name, version


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_string_field(tag: bytes, value: str) -> bytes:
    """One length-delimited field (``tag`` already encoded, e.g. ``b"\\x12"`` for field 2)."""
    raw = value.encode()
    return tag + _encode_varint(len(raw)) + raw


def stream_response(response: bytes) -> bytes:
    """A ``ModelStreamInferResponse`` carrying a serialized ``ModelInferResponse`` (field 2)."""
    return b"\x12" + _encode_varint(len(response)) + response


def stream_error(message: str, request_id: str = "") -> bytes:
    """A ``ModelStreamInferResponse`` carrying ``error_message`` (field 1) and, as Triton does so
    that the client knows which request failed, a response with the request's ``id``."""
    out = encode_string_field(b"\x0a", message or "request failed")
    if request_id:
        inner = id_field(request_id)  # ModelInferResponse.id is field 3 too
        out += b"\x12" + _encode_varint(len(inner)) + inner
    return out


def version_field(version: str) -> bytes:
    """The encoded ``model_version`` (2) field for ``version`` (also the ``version`` of the
    metadata requests); callers cache it per version."""
    return encode_string_field(_VERSION_TAG, version)


def id_field(request_id: str) -> bytes:
    """The encoded ``id`` (3) field of a ``ModelInferRequest``."""
    return encode_string_field(_ID_TAG, request_id)


def with_fields(data: bytes, version: str | None = None, request_id: str | None = None) -> bytes:
    """``data`` with ``model_version`` and/or ``id`` set, by appending them (one copy)."""
    parts = [data]
    if version is not None:
        parts.append(version_field(version))
    if request_id is not None:
        parts.append(id_field(request_id))
    return b"".join(parts)


def _shape(data: bytes, start: int, stop: int, out: list[int]) -> None:
    """Append the packed int64 varints in ``data[start:stop]`` to ``out``."""
    pos = start
    while pos < stop:
        v, pos = _varint(data, pos, stop)
        out.append(v - (1 << 64) if v >> 63 else v)


def _tensor(data: bytes, pos: int, end: int) -> tuple[str, str, tuple[int, ...], bool]:
    """Name, datatype, shape and whether typed contents are present, of an ``InferInputTensor``."""
    name = datatype = ""
    shape: list[int] = []
    contents = False
    while pos < end:
        tag, pos = _tag(data, pos, end)
        if tag == 0x0A or tag == 0x12:  # noqa: PLR1714
            start, pos = _length(data, pos, end)
            if tag == 0x0A:
                name = _text(data, start, pos)
            else:
                datatype = _text(data, start, pos)
        elif tag == 0x1A:  # shape, packed
            start, pos = _length(data, pos, end)
            _shape(data, start, pos, shape)
        elif tag == 0x18:  # shape, one element
            v, pos = _varint(data, pos, end)
            shape.append(v - (1 << 64) if v >> 63 else v)
        elif tag == 0x2A:  # contents
            pos = _length(data, pos, end)[1]
            contents = True
        else:
            pos = _skip(data, pos, end, tag)
    return name, datatype, tuple(shape), contents


def inputs(data: bytes) -> list[InputMeta]:
    """The input tensors of a serialized ``ModelInferRequest``, in order, each with the size of
    the ``raw_input_contents`` entry at its position (None past the last one)."""
    tensors: list[tuple[str, str, tuple[int, ...], bool]] = []
    raw: list[int] = []
    end = len(data)
    pos = 0
    while pos < end:
        tag, pos = _tag(data, pos, end)
        if tag == 0x2A:  # inputs = 5
            start, pos = _length(data, pos, end)
            tensors.append(_tensor(data, start, pos))
        elif tag == 0x3A:  # raw_input_contents = 7
            start, pos = _length(data, pos, end)
            raw.append(pos - start)
        else:
            pos = _skip(data, pos, end, tag)
    return [
        InputMeta(name, dtype, shape, raw[i] if i < len(raw) else None, contents)
        for i, (name, dtype, shape, contents) in enumerate(tensors)
    ]


def raw_inputs(data: bytes) -> list[memoryview]:
    """The ``raw_input_contents`` entries of a serialized ``ModelInferRequest``, in order (views, no copy)."""
    view = memoryview(data)
    out: list[memoryview] = []
    end = len(data)
    pos = 0
    while pos < end:
        tag, pos = _tag(data, pos, end)
        if tag == 0x3A:
            start, pos = _length(data, pos, end)
            out.append(view[start:pos])
        else:
            pos = _skip(data, pos, end, tag)
    return out


def first_output(data: bytes) -> tuple[str, tuple[int, ...], memoryview] | None:
    """Datatype, shape and raw bytes (a view, no copy) of the first output of a serialized
    ``ModelInferResponse`` (``outputs`` = 5, ``raw_output_contents`` = 6); None when it has no
    output or no raw contents for it."""
    tensor: tuple[str, str, tuple[int, ...], bool] | None = None
    raw: tuple[int, int] | None = None
    end = len(data)
    pos = 0
    while pos < end and (tensor is None or raw is None):
        tag, pos = _tag(data, pos, end)
        if tag == 0x2A and tensor is None:
            start, pos = _length(data, pos, end)
            tensor = _tensor(data, start, pos)
        elif tag == 0x32 and raw is None:
            raw = _length(data, pos, end)
            pos = raw[1]
        else:
            pos = _skip(data, pos, end, tag)
    if tensor is None or raw is None:
        return None
    return tensor[1], tensor[2], memoryview(data)[raw[0] : raw[1]]


#: bytes per element of the fixed-size Open Inference Protocol datatypes (BYTES is variable)
ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
}


def input_problem(data: bytes) -> str | None:
    """What cannot be right about the inputs of a serialized ``ModelInferRequest`` whatever the
    model -- malformed framing, a negative dimension, raw contents whose size is not what the
    shape and datatype make -- or None."""
    try:
        metas = inputs(data)
    except InvalidInputError as exc:
        return str(exc)
    for m in metas:
        n = 1
        for d in m.shape:
            if d < 0:
                return f"input {m.name!r}: negative dimension in shape {list(m.shape)}"
            n *= d
        size = ITEMSIZE.get(m.datatype)
        if size is not None and m.raw_len is not None and n * size != m.raw_len:
            return (
                f"input {m.name!r}: shape {list(m.shape)} of {m.datatype} makes {n * size} bytes,"
                f" its raw contents have {m.raw_len}"
            )
    return None
