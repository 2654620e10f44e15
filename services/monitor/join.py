"""What the monitor keeps of a served request, and what a label makes of it (no Kafka, no Faust).

A logged inference is kept (a Faust table keyed by request id) until its label
arrives on ``data.feedback`` or ``join_ttl_s`` passes. A label that comes first
waits the same time for its request. A joined pair counts towards the serving
version's accuracy and, with the request's inputs, becomes a labelled record on
``data.raw`` for the model's dataset, with an id derived from the request id
(``served-<request id>``): a redelivered join is a duplicate id, which ingest
drops, so each served request enters the dataset once.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import orjson

from cdl.errors import DecodeError
from cdl.feedback import served_record_id
from cdl.tensors import first_input
from cdl.v1 import events_pb2
from services.monitor.health import HealthWindow

__all__ = [
    "ROUTE_LABELS",
    "ROUTE_LOGGED",
    "ROUTE_OUTCOMES",
    "ROUTE_SERVED",
    "Outcome",
    "PendingLabel",
    "Routed",
    "Served",
    "inputs_rows",
    "parse_route",
    "record_id",
    "route_labels",
    "route_logged",
    "route_outcomes",
    "route_served",
    "training_record",
]

record_id = served_record_id


@dataclass(frozen=True, slots=True)
class Served:
    model: str
    version: int
    predicted: str
    """The top label's index of the request's first row (empty for a failed request)."""
    time: float
    inputs: bytes
    """The request (a serialized ``ModelInferRequest``) when the gateway logged it, else empty."""
    value: float = math.nan
    """The top label's score of the first row: a regression model's answer (NaN when none)."""

    @classmethod
    def from_log(cls, rec: events_pb2.InferenceLogged, now: float) -> Served:
        pred = rec.predicted_labels[0] if rec.predicted_labels else ""
        value = float(rec.scores[0]) if rec.scores else math.nan
        return cls(rec.model, int(rec.version), pred, now, bytes(rec.inputs_sample), value)

    def to_doc(self) -> dict[str, Any]:
        return {
            "m": self.model,
            "v": self.version,
            "p": self.predicted,
            "t": self.time,
            "x": base64.b64encode(self.inputs).decode() if self.inputs else "",
            "s": None if math.isnan(self.value) else self.value,
        }

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.to_doc())

    @classmethod
    def from_bytes(cls, data: bytes) -> Served:
        return cls.from_doc(orjson.loads(data))

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Served:
        x = doc.get("x") or ""
        value = doc.get("s")
        return cls(
            str(doc["m"]),
            int(doc["v"]),
            str(doc["p"]),
            float(doc["t"]),
            base64.b64decode(x) if x else b"",
            math.nan if value is None else float(value),
        )

    def correct(self, label: str, labels: list[str]) -> bool:
        """Whether the answer was ``label`` (the predicted index names one of the model's ``labels``;
        without them the index itself is compared)."""
        if not self.predicted:
            return False
        try:
            i = int(self.predicted)
        except ValueError:
            return self.predicted == label
        name = labels[i] if labels and 0 <= i < len(labels) else self.predicted
        return name == label


@dataclass(frozen=True, slots=True)
class PendingLabel:
    """A label that came before its request's log record."""

    label: str
    dataset: str
    time: float

    def to_doc(self) -> dict[str, Any]:
        return {"l": self.label, "d": self.dataset, "t": self.time}

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.to_doc())

    @classmethod
    def from_bytes(cls, data: bytes) -> PendingLabel:
        return cls.from_doc(orjson.loads(data))

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> PendingLabel:
        return cls(str(doc["l"]), str(doc["d"]), float(doc["t"]))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a joined label says of its request's answer: right or wrong (a classification), or the
    answer and its target (a regression). It counts in the health window of the request's model
    version, which the member holding the model's partition keeps."""

    model: str
    version: int
    correct: bool | None = None
    predicted: float = math.nan
    target: float = math.nan

    def count(self, window: HealthWindow) -> None:
        if self.correct is not None:
            window.labelled(self.correct)
        else:
            window.labelled_value(self.predicted, self.target)

    def to_doc(self) -> list[Any]:
        if self.correct is not None:
            return [self.model, self.version, self.correct]
        return [self.model, self.version, None, self.predicted, self.target]

    @classmethod
    def from_doc(cls, doc: list[Any]) -> Outcome:
        if doc[2] is not None:
            return cls(str(doc[0]), int(doc[1]), bool(doc[2]))
        return cls(str(doc[0]), int(doc[1]), None, float(doc[3]), float(doc[4]))


# --------------------------------------------------------------------------- routing
# With several monitors, a model's windows and drift state are kept by the member holding the
# model's partition, a request's join by the member holding the request id's partition
# (docs/monitor.md, "Replicas"). What one member reads for another goes to it on the monitor's
# route topic, at that partition: per kind and partition, records of at most ROUTE_MAX_BYTES,
# in one of these forms.

ROUTE_LOGGED = "logged"
"""Logged requests of models another member keeps (``InferenceLogged`` each)."""
ROUTE_SERVED = "served"
"""Served requests (request id, :class:`Served`) whose ids another member joins."""
ROUTE_LABELS = "labels"
"""Labels (request id, :class:`PendingLabel`) whose request ids another member joins."""
ROUTE_OUTCOMES = "outcomes"
"""Joined labels' :class:`Outcome` for models another member keeps."""


@dataclass(frozen=True, slots=True)
class Routed:
    """One route record: what it carries (one list per kind; the others empty)."""

    logged: list[events_pb2.InferenceLogged]
    served: list[tuple[str, Served]]
    labels: list[tuple[str, PendingLabel]]
    outcomes: list[Outcome]


#: the most bytes of one route record (a batch's worth is split over several): well under the
#: broker's default message.max.bytes (1 MiB)
ROUTE_MAX_BYTES = 512 * 1024


def _route_records(kind: str, entries: list[bytes], max_bytes: int) -> list[bytes]:
    """``entries`` (each already JSON) as route records of ``kind`` of at most ``max_bytes`` each
    (an entry larger than that alone in its record); none for no entries."""
    head, tail = b'{"k":' + orjson.dumps(kind) + b',"e":[', b"]}"
    records: list[bytes] = []
    part: list[bytes] = []
    size = len(head) + len(tail)
    for entry in entries:
        if part and size + len(entry) + 1 > max_bytes:
            records.append(head + b",".join(part) + tail)
            part, size = [], len(head) + len(tail)
        part.append(entry)
        size += len(entry) + 1
    if part:
        records.append(head + b",".join(part) + tail)
    return records


def route_logged(recs: list[events_pb2.InferenceLogged], max_bytes: int = ROUTE_MAX_BYTES) -> list[bytes]:
    """Log records for another member; one too large for a route record goes without its inputs
    (its health count and join are kept; its drift rows and training record are not)."""
    entries = []
    for rec in recs:
        entry = orjson.dumps(base64.b64encode(rec.SerializeToString()).decode())
        if len(entry) > max_bytes and rec.inputs_sample:
            bare = events_pb2.InferenceLogged()
            bare.CopyFrom(rec)
            bare.ClearField("inputs_sample")
            entry = orjson.dumps(base64.b64encode(bare.SerializeToString()).decode())
        entries.append(entry)
    return _route_records(ROUTE_LOGGED, entries, max_bytes)


def route_served(entries: list[tuple[str, Served]], max_bytes: int = ROUTE_MAX_BYTES) -> list[bytes]:
    """Served requests for another member; one too large for a route record goes without its
    inputs (its join counts; it makes no training record)."""
    encoded = []
    for rid, served in entries:
        entry = orjson.dumps([rid, served.to_doc()])
        if len(entry) > max_bytes and served.inputs:
            entry = orjson.dumps([rid, replace(served, inputs=b"").to_doc()])
        encoded.append(entry)
    return _route_records(ROUTE_SERVED, encoded, max_bytes)


def route_labels(entries: list[tuple[str, PendingLabel]], max_bytes: int = ROUTE_MAX_BYTES) -> list[bytes]:
    encoded = [orjson.dumps([rid, label.to_doc()]) for rid, label in entries]
    return _route_records(ROUTE_LABELS, encoded, max_bytes)


def route_outcomes(outcomes: list[Outcome], max_bytes: int = ROUTE_MAX_BYTES) -> list[bytes]:
    return _route_records(ROUTE_OUTCOMES, [orjson.dumps(o.to_doc()) for o in outcomes], max_bytes)


def parse_route(value: bytes | None) -> Routed:
    """A route record's contents; :class:`DecodeError` when it is not one (only monitors write
    the topic: a record that is not one is a bug, logged and skipped by the caller)."""
    try:
        doc = orjson.loads(value or b"")
        kind, entries = doc["k"], doc["e"]
        if kind == ROUTE_LOGGED:
            recs = [events_pb2.InferenceLogged.FromString(base64.b64decode(e)) for e in entries]
            return Routed(recs, [], [], [])
        if kind == ROUTE_SERVED:
            return Routed([], [(str(rid), Served.from_doc(d)) for rid, d in entries], [], [])
        if kind == ROUTE_LABELS:
            return Routed([], [], [(str(rid), PendingLabel.from_doc(d)) for rid, d in entries], [])
        if kind == ROUTE_OUTCOMES:
            return Routed([], [], [], [Outcome.from_doc(d) for d in entries])
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise DecodeError(f"not a monitor route record: {exc}") from exc
    raise DecodeError(f"not a monitor route record: kind {kind!r}")


def training_record(served: Served, request_id: str, label: str, dataset: str) -> bytes | None:
    """The ``data.raw`` record (JSON) of a labelled served request, None when its inputs were not
    logged (too large) or cannot be read: its first input's first row, as a record of ``dataset``."""
    if not served.inputs or not dataset:
        return None
    try:
        tensor = first_input(served.inputs)
    except DecodeError:
        return None
    doc: dict[str, Any] = {"dataset": dataset, "id": record_id(request_id), "label": label}
    if isinstance(tensor.values, list):
        if not tensor.values:
            return None
        doc["text"] = tensor.values[0].decode("utf-8", "replace")
    else:
        arr = tensor.values
        row = arr[0] if arr.ndim > 1 else arr
        doc["features"] = np.asarray(row, np.float64).reshape(-1).tolist()
    return orjson.dumps(doc)


def inputs_rows(served_inputs: bytes) -> np.ndarray[Any, Any] | list[bytes] | None:
    """Every row of a logged request's first input (for drift tests), None when unreadable."""
    if not served_inputs:
        return None
    try:
        tensor = first_input(served_inputs)
    except DecodeError:
        return None
    return tensor.values
