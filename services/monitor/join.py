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
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from cdl.errors import DecodeError
from cdl.feedback import served_record_id
from cdl.tensors import first_input
from cdl.v1 import events_pb2

__all__ = ["PendingLabel", "Served", "inputs_rows", "record_id", "training_record"]

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

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "m": self.model,
                "v": self.version,
                "p": self.predicted,
                "t": self.time,
                "x": base64.b64encode(self.inputs).decode() if self.inputs else "",
                "s": None if math.isnan(self.value) else self.value,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Served:
        doc = orjson.loads(data)
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

    def to_bytes(self) -> bytes:
        return orjson.dumps({"l": self.label, "d": self.dataset, "t": self.time})

    @classmethod
    def from_bytes(cls, data: bytes) -> PendingLabel:
        doc = orjson.loads(data)
        return cls(str(doc["l"]), str(doc["d"]), float(doc["t"]))


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
