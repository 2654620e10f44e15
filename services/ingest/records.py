"""Parsing, validation and cleaning of incoming records (pure logic).

A record arrives as JSON (default) or as a protobuf ``cdl.v1.Record`` (when the
``content-type`` header says ``application/protobuf``). JSON records look like::

    {"dataset": "digits", "id": "r-1", "features": [0.0, 3.0, ...], "label": "7"}
    {"dataset": "reviews", "id": "r-2", "text": "great value", "label": "pos"}

``features`` is flat (``prod(input_shape)`` numbers) or nested in the shape;
``label`` is a string or an integer (compared as its string).

Hostile input is bounded by :class:`Limits` (record size, id, text and label
length): a record over a limit is rejected with its own reason before anything
proportional to it is built, whatever it holds.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from google.protobuf.message import DecodeError as ProtoDecodeError

from cdl.datasets import DatasetSpec, Task, holdout_member
from cdl.errors import InvalidInputError
from cdl.events import CONTENT_JSON, Headers, header_dict
from cdl.feedback import is_protobuf
from cdl.v1 import events_pb2

__all__ = [
    "CleanRecord",
    "Limits",
    "RawRecord",
    "Reason",
    "RecordError",
    "clean",
    "content_type_of",
    "is_protobuf",
    "parse",
]


class Reason(StrEnum):
    """Why a record was rejected (the dead-letter reason code and metric label)."""

    MALFORMED = "malformed"
    UNKNOWN_DATASET = "unknown_dataset"
    MISSING_ID = "missing_id"
    BAD_SHAPE = "bad_shape"
    BAD_DTYPE = "bad_dtype"
    NON_FINITE = "non_finite"
    UNKNOWN_LABEL = "unknown_label"
    BAD_LABEL = "bad_label"
    """a regression's label that is not a finite number"""
    UNLABELLED = "unlabelled"
    TEXT_TOO_SHORT = "text_too_short"
    DUPLICATE_ID = "duplicate_id"
    UNKNOWN_RECORD = "unknown_record"
    ALREADY_LABELLED = "already_labelled"
    RECORD_TOO_LARGE = "record_too_large"
    ID_TOO_LONG = "id_too_long"
    TEXT_TOO_LONG = "text_too_long"
    LABEL_TOO_LONG = "label_too_long"
    CLAIM_REFUSED = "claim_refused"
    CLAIM_MISSING = "claim_missing"


class RecordError(InvalidInputError):
    """A record that breaks its dataset's rules; ``reason`` is a :class:`Reason`."""

    def __init__(self, reason: Reason, message: str, **context: object) -> None:
        super().__init__(f"{reason.value}: {message}", **context)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    """The largest record ingest takes: a record over any limit is dead-lettered with its reason.

    The defaults are the service's (``IngestSettings``); a dataset may tighten
    them (``DatasetSpec.max_record_bytes`` and the like, 0 = the service's),
    never loosen them: the service's limits are what bounds its memory.
    """

    record_bytes: int = 1 << 20
    """Largest record value in bytes (``record_too_large``); checked before it is parsed."""
    id_bytes: int = 256
    """Longest record id in UTF-8 bytes (``id_too_long``); also bounds the shards' id column."""
    text_chars: int = 1 << 16
    """Longest text in characters, before cleaning (``text_too_long``)."""
    label_bytes: int = 256
    """Longest label in UTF-8 bytes (``label_too_long``; a dataset's labels are shorter)."""

    def for_spec(self, spec: DatasetSpec) -> Limits:
        """These limits, tightened by ``spec``'s own (0 there keeps a limit as it is)."""
        tighter = {
            "record_bytes": spec.max_record_bytes,
            "id_bytes": spec.max_id_bytes,
            "text_chars": spec.max_text_chars,
        }
        changes = {k: v for k, v in tighter.items() if 0 < v < getattr(self, k)}
        return replace(self, **changes) if changes else self

    def check_size(self, value: bytes | None) -> None:
        """:class:`RecordError` (RECORD_TOO_LARGE) when ``value`` is over ``record_bytes``."""
        if value is not None and len(value) > self.record_bytes:
            raise RecordError(
                Reason.RECORD_TOO_LARGE, f"record is {len(value)} bytes, the limit is {self.record_bytes}"
            )

    def check_id(self, rid: str) -> None:
        """:class:`RecordError` (ID_TOO_LONG) when ``rid`` is over ``id_bytes`` (UTF-8)."""
        # a character is at most 4 bytes: most ids are decided without encoding them
        if len(rid) * 4 > self.id_bytes and len(rid.encode()) > self.id_bytes:
            raise RecordError(
                Reason.ID_TOO_LONG, f"id is {len(rid.encode())} bytes, the limit is {self.id_bytes}", id=rid[:64]
            )

    def check_label(self, label: str) -> None:
        """:class:`RecordError` (LABEL_TOO_LONG) when ``label`` is over ``label_bytes`` (UTF-8)."""
        if len(label) * 4 > self.label_bytes and len(label.encode()) > self.label_bytes:
            raise RecordError(
                Reason.LABEL_TOO_LONG, f"label is {len(label.encode())} bytes, the limit is {self.label_bytes}"
            )


@dataclass(slots=True)
class RawRecord:
    dataset: str
    id: str
    features: Any  # list / nested list of numbers, or a numpy array (protobuf)
    shape: tuple[int, ...] | None  # given shape (protobuf Tensor), None for JSON
    text: str | None
    label: str
    #: the tensor as bytes (protobuf ``Tensor.raw``, JSON ``features_b64``, or a claim check's
    #: object once fetched): row-major, little-endian, of ``raw_dtype`` (empty: the dataset's)
    raw: bytes | None = None
    raw_dtype: str = ""
    #: a claim check (``s3://bucket/key``): ingest fetches it into ``raw`` before cleaning
    features_uri: str = ""


@dataclass(slots=True)
class CleanRecord:
    dataset: str
    id: str
    label: float
    """a class index (int; -1: none yet), or a regression's target (NaN: none yet)"""
    holdout: bool
    x: npt.NDArray[Any] | None
    text: str | None


def content_type_of(headers: Headers | None) -> str:
    """A record's ``content-type`` header; JSON when it has none."""
    return header_dict(headers).get("content-type", CONTENT_JSON) if headers else CONTENT_JSON


def parse(value: bytes | None, content_type: str) -> RawRecord:
    """Decode one record; :class:`RecordError` (MALFORMED) says why not."""
    if value is None:
        raise RecordError(Reason.MALFORMED, "empty record")
    if is_protobuf(content_type):
        return _parse_proto(value)
    return _parse_json(value)


def _parse_json(value: bytes) -> RawRecord:
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        if b"NaN" in value or b"Infinity" in value:
            raise RecordError(Reason.NON_FINITE, "features contain NaN or infinity") from exc
        raise RecordError(Reason.MALFORMED, f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise RecordError(Reason.MALFORMED, "a record must be a JSON object")
    dataset, rid, label = doc.get("dataset"), doc.get("id"), doc.get("label", "")
    if not isinstance(dataset, str) or not dataset:
        raise RecordError(Reason.MALFORMED, "field 'dataset' must be a non-empty string")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not rid:
        raise RecordError(Reason.MISSING_ID, "field 'id' must be a non-empty string", dataset=dataset)
    if label is None:
        label = ""
    if isinstance(label, int | float) and not isinstance(label, bool):
        label = repr(label)  # a regression's target; a class named by a number
    if not isinstance(label, str):
        raise RecordError(Reason.MALFORMED, "field 'label' must be a string or a number", dataset=dataset)
    text = doc.get("text")
    if text is not None and not isinstance(text, str):
        raise RecordError(Reason.BAD_DTYPE, "field 'text' must be a string", dataset=dataset)
    features = doc.get("features")
    if features is not None:  # the fast path's rule: "features" decides whatever else the record holds
        return RawRecord(dataset, rid, features, None, text, label)
    dtype = doc.get("dtype", "")
    if not isinstance(dtype, str):
        raise RecordError(Reason.BAD_DTYPE, "field 'dtype' must be a string", dataset=dataset)
    b64, uri = doc.get("features_b64"), doc.get("features_uri")
    if b64 is not None:
        if not isinstance(b64, str):
            raise RecordError(Reason.MALFORMED, "field 'features_b64' must be a base64 string", dataset=dataset)
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RecordError(Reason.MALFORMED, "field 'features_b64' is not base64", dataset=dataset) from exc
        return RawRecord(dataset, rid, None, None, text, label, raw=raw, raw_dtype=dtype)
    if uri is not None:
        if not isinstance(uri, str) or not uri:
            raise RecordError(Reason.MALFORMED, "field 'features_uri' must be an s3:// URI", dataset=dataset)
        return RawRecord(dataset, rid, None, None, text, label, raw_dtype=dtype, features_uri=uri)
    return RawRecord(dataset, rid, None, None, text, label)


def _parse_proto(value: bytes) -> RawRecord:
    rec = events_pb2.Record()
    try:
        rec.ParseFromString(value)
    except ProtoDecodeError as exc:
        raise RecordError(Reason.MALFORMED, f"not a cdl.v1.Record: {exc}") from exc
    if not rec.dataset:
        raise RecordError(Reason.MALFORMED, "field 'dataset' is empty")
    if not rec.id:
        raise RecordError(Reason.MISSING_ID, "field 'id' is empty", dataset=rec.dataset)
    which = rec.WhichOneof("input")
    if which == "tensor" and rec.tensor.raw:
        shape = tuple(rec.tensor.shape)
        return RawRecord(
            rec.dataset, rec.id, None, shape, None, rec.label, raw=rec.tensor.raw, raw_dtype=rec.tensor.dtype
        )
    if which == "tensor":
        values = np.asarray(rec.tensor.values, dtype=np.float64)
        return RawRecord(rec.dataset, rec.id, values, tuple(rec.tensor.shape), None, rec.label)
    if which == "features_uri":
        return RawRecord(rec.dataset, rec.id, None, None, None, rec.label, features_uri=rec.features_uri)
    if which == "text":
        return RawRecord(rec.dataset, rec.id, None, None, rec.text, rec.label)
    return RawRecord(rec.dataset, rec.id, None, None, None, rec.label)


_DEFAULT_LIMITS = Limits()

#: integer dtypes: the smallest value and the first value past the largest, both exact as
#: float64 (features are read as 64-bit floats, here as in the fast path, so a value must be
#: in [lo, end) as a float: 2**63 - 1 reads as 2**63, which int64 cannot hold)
_INT_RANGES = {"uint8": (0.0, 256.0), "int64": (-(2.0**63), 2.0**63)}
#: dtypes a tensor given as bytes may have
_RAW_DTYPES = ("float32", "float64", "uint8", "int64")


def clean(
    raw: RawRecord, spec: DatasetSpec, allow_unlabelled: bool = False, limits: Limits | None = None
) -> CleanRecord:
    """Validate ``raw`` against ``spec`` and apply its cleaning rules.

    An unlabelled record (empty label) gets ``label = -1`` when
    ``allow_unlabelled``; its label may come later through ``data.feedback``.
    ``limits`` (default :class:`Limits`, tightened by ``spec``) bound the id,
    label and text; the record's size is the caller's to check, before parsing.
    """
    lim = (limits or _DEFAULT_LIMITS).for_spec(spec)
    lim.check_id(raw.id)
    lim.check_label(raw.label)
    ctx = {"dataset": raw.dataset, "id": raw.id}
    if not raw.label and not allow_unlabelled:
        raise RecordError(Reason.UNLABELLED, "record has no label", **ctx)
    label = label_value(spec, raw.label, ctx) if raw.label else spec.unlabelled
    holdout = holdout_member(spec.name, raw.id, spec.holdout_fraction)
    if spec.task is Task.TEXT:
        if raw.text is None:
            raise RecordError(Reason.BAD_DTYPE, "a text dataset needs field 'text'", **ctx)
        if len(raw.text) > lim.text_chars:
            raise RecordError(
                Reason.TEXT_TOO_LONG, f"text has {len(raw.text)} characters, the limit is {lim.text_chars}", **ctx
            )
        text = " ".join(raw.text.split())
        if spec.lowercase_text:
            text = text.lower()
        if len(text) < spec.min_text_length:
            raise RecordError(
                Reason.TEXT_TOO_SHORT, f"text has {len(text)} characters, needs {spec.min_text_length}", **ctx
            )
        return CleanRecord(raw.dataset, raw.id, label, holdout, None, text)
    return CleanRecord(raw.dataset, raw.id, label, holdout, _tensor(raw, spec, ctx), None)


def label_value(spec: DatasetSpec, label: str, ctx: dict[str, Any] | None = None) -> float:
    """The label column's value of ``label`` (:meth:`DatasetSpec.label_value`); a RecordError
    (``unknown_label``, or a regression's ``bad_label``) says why not."""
    try:
        return spec.label_value(label)
    except ValueError as exc:
        reason = Reason.BAD_LABEL if spec.task.regression else Reason.UNKNOWN_LABEL
        raise RecordError(reason, str(exc), **(ctx or {})) from None


def _from_bytes(raw: RawRecord, spec: DatasetSpec, ctx: dict[str, Any]) -> npt.NDArray[Any]:
    """The tensor of a record given as bytes, in the dataset's dtype and shape."""
    assert raw.raw is not None
    dtype = raw.raw_dtype or spec.dtype
    if dtype not in _RAW_DTYPES:
        raise RecordError(Reason.BAD_DTYPE, f"dtype must be one of {', '.join(_RAW_DTYPES)}", **ctx)
    item = np.dtype(dtype).itemsize
    size = math.prod(spec.input_shape)
    if raw.shape and tuple(raw.shape) != spec.input_shape:
        raise RecordError(Reason.BAD_SHAPE, f"shape {list(raw.shape)} != {list(spec.input_shape)}", **ctx)
    if len(raw.raw) != size * item:
        detail = f"{len(raw.raw)} bytes, expected {size} values of {dtype} ({size * item} bytes)"
        raise RecordError(Reason.BAD_SHAPE, detail, **ctx)
    arr = np.frombuffer(raw.raw, dtype=np.dtype(dtype).newbyteorder("<"))
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise RecordError(Reason.NON_FINITE, "features contain NaN or infinity", **ctx)
    if dtype == spec.dtype:  # exact: a uint8 image stays a uint8 image
        return arr.astype(spec.dtype).reshape(spec.input_shape)
    return _checked(arr.astype(np.float64), spec, ctx)


def _tensor(raw: RawRecord, spec: DatasetSpec, ctx: dict[str, Any]) -> npt.NDArray[Any]:
    if raw.features is None and raw.raw is not None:
        return _from_bytes(raw, spec, ctx)
    if raw.features is None:
        raise RecordError(Reason.BAD_SHAPE, "a tensor dataset needs field 'features'", **ctx)
    if isinstance(raw.features, np.ndarray):
        arr = raw.features
    else:
        if not isinstance(raw.features, list):
            raise RecordError(Reason.BAD_DTYPE, "field 'features' must be a list of numbers", **ctx)
        try:
            arr = np.asarray(raw.features, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            detail = str(exc).split("\n")[0]
            reason = Reason.BAD_SHAPE if "inhomogeneous" in detail else Reason.BAD_DTYPE
            raise RecordError(reason, f"features are not numbers of one shape: {detail}", **ctx) from exc
        if _has_bool(raw.features):
            raise RecordError(Reason.BAD_DTYPE, "features must be numbers, not booleans", **ctx)
    size = math.prod(spec.input_shape)
    if raw.shape is not None and raw.shape and tuple(raw.shape) != spec.input_shape:
        raise RecordError(Reason.BAD_SHAPE, f"shape {list(raw.shape)} != {list(spec.input_shape)}", **ctx)
    if arr.ndim > 1 and arr.shape != spec.input_shape:
        raise RecordError(Reason.BAD_SHAPE, f"shape {list(arr.shape)} != {list(spec.input_shape)}", **ctx)
    if arr.size != size:
        raise RecordError(Reason.BAD_SHAPE, f"{arr.size} values, expected {size} {list(spec.input_shape)}", **ctx)
    return _checked(arr, spec, ctx)


def _checked(arr: npt.NDArray[Any], spec: DatasetSpec, ctx: dict[str, Any]) -> npt.NDArray[Any]:
    """64-bit float values as the dataset's dtype and shape, range and finiteness checked."""
    if not np.all(np.isfinite(arr)):
        raise RecordError(Reason.NON_FINITE, "features contain NaN or infinity", **ctx)
    if spec.dtype in _INT_RANGES:
        lo, end = _INT_RANGES[spec.dtype]
        if not np.all(arr == np.round(arr)) or arr.min() < lo or arr.max() >= end:
            raise RecordError(
                Reason.BAD_DTYPE,
                f"features must be {spec.dtype} integers, read as 64-bit floats in [{lo:.0f}, {end:.0f})",
                **ctx,
            )
    with np.errstate(over="ignore"):  # an overflow is reported below, as a reason
        out = arr.reshape(spec.input_shape).astype(spec.dtype)
    if out.dtype.kind == "f" and not np.all(np.isfinite(out)):
        raise RecordError(Reason.NON_FINITE, f"features overflow {spec.dtype}", **ctx)
    return out


def _has_bool(values: Any) -> bool:
    if isinstance(values, bool):
        return True
    if isinstance(values, list):
        return any(_has_bool(v) for v in values)
    return False
