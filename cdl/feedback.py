"""``data.feedback`` records: a late label for an ingested record or for a served request.

One parser for both readers: ingest labels records that arrived unlabelled
(``record_id``); the monitor joins labels to logged inferences (``request_id``)
and skips the rest. JSON (``{"dataset", "record_id" | "request_id", "label"}``;
an integer label is read as its decimal string) or protobuf ``cdl.v1.Feedback``
when the ``content-type`` header says so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import orjson
from google.protobuf.message import DecodeError as ProtoDecodeError

from cdl.errors import InvalidInputError
from cdl.v1 import events_pb2

__all__ = ["Feedback", "is_protobuf", "is_served_record_id", "parse_feedback", "served_record_id"]

#: longest id ingest takes by default (its ``max_id_bytes``)
_ID_MAX = 256


def served_record_id(request_id: str) -> str:
    """The record id a labelled served request goes back to ``data.raw`` under (the monitor):
    ``served-<request id>``; a request id too long for a record id is replaced by its SHA-256
    (truncating could make two requests one record)."""
    rid = f"served-{request_id}"
    if len(rid.encode()) <= _ID_MAX:
        return rid
    return "served-sha256-" + hashlib.sha256(request_id.encode()).hexdigest()


def is_served_record_id(record_id: str) -> bool:
    """Whether ``record_id`` is one :func:`served_record_id` makes: a labelled served request, which
    the monitor may send again after a restart (a replay, not a conflicting record)."""
    return record_id.startswith("served-")


def is_protobuf(content_type: str) -> bool:
    """Whether a record's ``content-type`` header says protobuf (anything else is JSON)."""
    return content_type.startswith(("application/protobuf", "application/x-protobuf"))


@dataclass(frozen=True, slots=True)
class Feedback:
    label: str
    dataset: str = ""
    record_id: str = ""
    request_id: str = ""


def _text(doc: dict[str, object], name: str) -> str:
    v = doc.get(name)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise InvalidInputError(f"feedback field {name!r} must be a string")
    return v


def parse_feedback(value: bytes | None, content_type: str) -> Feedback:
    """The feedback in ``value``; :class:`InvalidInputError` says what is wrong with it.

    It needs a non-empty label and a ``record_id`` (with its ``dataset``) or a ``request_id``.
    """
    if value is None:
        raise InvalidInputError("empty feedback")
    if is_protobuf(content_type):
        pb = events_pb2.Feedback()
        try:
            pb.ParseFromString(value)
        except ProtoDecodeError as exc:
            raise InvalidInputError(f"not a cdl.v1.Feedback: {exc}") from exc
        fb = Feedback(pb.label, pb.dataset, pb.record_id, pb.request_id)
    else:
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise InvalidInputError(f"not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise InvalidInputError("feedback must be a JSON object")
        label = doc.get("label")
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(label, str):
            raise InvalidInputError("feedback needs a string 'label'")
        fb = Feedback(label, _text(doc, "dataset"), _text(doc, "record_id"), _text(doc, "request_id"))
    if not fb.label:
        raise InvalidInputError("feedback needs a non-empty 'label'")
    if not fb.request_id and not (fb.record_id and fb.dataset):
        raise InvalidInputError("feedback needs non-empty 'dataset' and 'record_id', or a 'request_id'")
    return fb
