"""Events and their envelope (CloudEvents Kafka binary binding).

An :class:`Event` is a protobuf payload plus its CloudEvents attributes. On
Kafka the payload is the record value and the attributes travel as headers:
``ce_id``, ``ce_type``, ``ce_source``, ``ce_time``, ``ce_specversion``,
``content-type`` and the W3C ``traceparent``. This module knows nothing of any
Kafka client: it turns events into ``(key, value, headers)`` and back.
"""

from __future__ import annotations

import os
import secrets
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

import numpy as np
import numpy.typing as npt
from google.protobuf import json_format
from google.protobuf.message import DecodeError as ProtoDecodeError
from google.protobuf.message import Message

from cdl.errors import DecodeError
from cdl.v1 import events_pb2

__all__ = [
    "CONTENT_JSON",
    "CONTENT_PROTOBUF",
    "EVENT_TYPES",
    "Event",
    "Headers",
    "InBatch",
    "InRecord",
    "OutRecord",
    "Topics",
    "dead_letter",
    "decode",
    "encode",
    "header_dict",
    "key_partition",
    "new_traceparent",
    "source_name",
]

CONTENT_PROTOBUF = "application/protobuf"
CONTENT_JSON = "application/json"
SPECVERSION = "1.0"

Headers = Sequence[tuple[str, bytes | str | None]]


def key_partition(key: str, partitions: int) -> int:
    """The partition a record keyed ``key`` goes to among ``partitions``: librdkafka's default
    partitioner (``consistent_random``: CRC-32 of the key modulo the count), as every producer of
    cdl's and any librdkafka-based one places it. (The Java client's default hashes with murmur2.)"""
    if partitions <= 0:
        raise ValueError("a topic has at least one partition")
    return zlib.crc32(key.encode()) % partitions


class Topics:
    """Kafka topic names."""

    DATA_RAW = "data.raw"
    DATA_DEADLETTER = "data.deadletter"
    DATA_UPDATED = "data.updated"
    DATA_FEEDBACK = "data.feedback"
    TUNING_COMPLETED = "tuning.completed"
    TUNING_REQUESTED = "tuning.requested"
    DRIFT_DETECTED = "drift.detected"
    MODEL_TRAINED = "model.trained"
    MODEL_COMPRESSED = "model.compressed"
    MODEL_DEPLOYED = "model.deployed"
    INFERENCE_LOGGED = "inference.logged"
    MODEL_HEALTH = "model.health"
    GATEWAY_COMMANDS = "gateway.commands"
    """ModelAdmin calls handed to the gateway instance that owns the model, and their results."""

    #: partitions per topic (provisioning creates them, and adds partitions to a topic that has
    #: fewer). Partitions are the unit of parallelism: a group's instances share its topics'
    #: partitions, so a topic's count is the ceiling of its consumers' replicas (docs/scaling.md).
    #: Each is keyed so that what must stay in order, or in one writer's hands, stays on one
    #: partition: data.raw and data.updated by dataset, the model topics by model; feedback by
    #: request id like inference.logged. Topics a group reads together have equal counts, so the
    #: range assignor gives one member the same partitions of each (co-partitioning): the trainer's
    #: data.updated and tuning.completed, the gateway's model.compressed and gateway.commands (a
    #: model's admin calls reach the instance that writes its rollout), the monitor's
    #: inference.logged and data.feedback.
    PARTITIONS: Mapping[str, int] = {
        DATA_RAW: 3,
        DATA_DEADLETTER: 1,
        DATA_UPDATED: 3,
        DATA_FEEDBACK: 3,
        TUNING_COMPLETED: 3,
        TUNING_REQUESTED: 3,
        DRIFT_DETECTED: 3,
        MODEL_TRAINED: 3,
        MODEL_COMPRESSED: 3,
        MODEL_DEPLOYED: 3,
        INFERENCE_LOGGED: 3,
        MODEL_HEALTH: 3,
        GATEWAY_COMMANDS: 3,
    }


#: ce_type of each payload (and back)
EVENT_TYPES: dict[str, type[Message]] = {
    "dev.cdl.record.v1": events_pb2.Record,
    "dev.cdl.feedback.v1": events_pb2.Feedback,
    "dev.cdl.data.updated.v1": events_pb2.DataUpdated,
    "dev.cdl.tuning.completed.v1": events_pb2.TuningCompleted,
    "dev.cdl.tuning.requested.v1": events_pb2.TuningRequested,
    "dev.cdl.drift.detected.v1": events_pb2.DriftDetected,
    "dev.cdl.model.trained.v1": events_pb2.ModelTrained,
    "dev.cdl.model.compressed.v1": events_pb2.ModelCompressed,
    "dev.cdl.model.deployed.v1": events_pb2.ModelDeployed,
    "dev.cdl.inference.logged.v1": events_pb2.InferenceLogged,
    "dev.cdl.inference.logged.batch.v1": events_pb2.InferenceLoggedBatch,
    "dev.cdl.model.health.v1": events_pb2.ModelHealth,
    "dev.cdl.gateway.command.v1": events_pb2.GatewayCommand,
    "dev.cdl.gateway.command.result.v1": events_pb2.GatewayCommandResult,
}
_TYPE_OF: dict[str, str] = {cls.DESCRIPTOR.full_name: t for t, cls in EVENT_TYPES.items()}


def new_traceparent() -> str:
    """A fresh W3C traceparent (version 00, sampled)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def _child_traceparent(parent: str) -> str:
    parts = parent.split("-")
    if len(parts) != 4:
        return new_traceparent()
    return f"00-{parts[1]}-{secrets.token_hex(8)}-{parts[3]}"


@dataclass(frozen=True)
class Event:
    """A payload with its CloudEvents attributes."""

    payload: Message
    source: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    type: str = ""
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    traceparent: str = field(default_factory=new_traceparent)
    key: str | None = None
    content_type: str = CONTENT_PROTOBUF

    def __post_init__(self) -> None:
        if not self.type:
            name = self.payload.DESCRIPTOR.full_name
            if name not in _TYPE_OF:
                raise ValueError(f"no ce_type registered for {name}")
            object.__setattr__(self, "type", _TYPE_OF[name])

    def caused(self, payload: Message, source: str, key: str | None = None, event_id: str | None = None) -> Event:
        """A follow-up event in the same trace (its id can be made deterministic): its parent is
        the span handling this event when one is recording (cdl.tracing), else this event."""
        from cdl.tracing import current_traceparent

        parent = current_traceparent()
        if parent is None or parent == self.traceparent:
            parent = _child_traceparent(self.traceparent)
        return Event(
            payload=payload,
            source=source,
            id=event_id or str(uuid.uuid4()),
            traceparent=parent,
            key=key,
        )


def encode(event: Event) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """``(key, value, headers)`` for a Kafka producer."""
    if event.content_type == CONTENT_JSON:
        value = json_format.MessageToJson(event.payload, preserving_proto_field_name=True).encode()
    else:
        value = event.payload.SerializeToString(deterministic=True)
    headers = [
        ("ce_specversion", SPECVERSION.encode()),
        ("ce_id", event.id.encode()),
        ("ce_type", event.type.encode()),
        ("ce_source", event.source.encode()),
        ("ce_time", event.time.isoformat().replace("+00:00", "Z").encode()),
        ("content-type", event.content_type.encode()),
        ("traceparent", event.traceparent.encode()),
    ]
    key = event.key.encode() if event.key is not None else None
    return key, value, headers


@dataclass(frozen=True)
class OutRecord:
    """A record to produce, already encoded (dead letters, state snapshots, events)."""

    topic: str
    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    #: the partition to produce to; None: the producer's partitioner picks it by the key
    partition: int | None = None

    @classmethod
    def of(cls, topic: str, event: Event) -> OutRecord:
        key, value, headers = encode(event)
        return cls(topic, value, key, tuple(headers))


#: one consumed record: partition, offset, key, value, headers
InRecord = tuple[int, int, bytes | None, bytes | None, Headers | None]


class InBatch:
    """Records consumed from one topic, by column: the stream's hot path makes no
    object per record (see :class:`cdl.kafka.TransactionalLoop`).

    Values are joined in one buffer, record ``i`` spanning
    ``data[bounds[i]:bounds[i + 1]]`` (``null_values[i]`` marks a record without
    a value); keys and headers are lists only when some record has them.
    """

    __slots__ = ("bounds", "caught_up", "data", "headers", "keys", "null_values", "offsets", "partitions", "topic")

    def __init__(
        self,
        topic: str,
        partitions: npt.NDArray[np.int32],
        offsets: npt.NDArray[np.int64],
        data: bytes,
        bounds: npt.NDArray[np.int64],
        *,
        null_values: npt.NDArray[np.bool_] | None = None,
        keys: list[bytes | None] | None = None,
        headers: list[Headers | None] | None = None,
        caught_up: bool = False,
    ) -> None:
        self.topic = topic
        self.partitions = partitions
        self.offsets = offsets
        self.data = data
        self.bounds = bounds
        self.null_values = null_values
        self.keys = keys
        self.headers = headers
        #: the consumer had nothing more to give: whoever defers work should do it now
        self.caught_up = caught_up

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def plain(self) -> bool:
        """Every record has a value and none has headers (as most producers send)."""
        return self.null_values is None and self.headers is None

    def value(self, i: int) -> bytes | None:
        if self.null_values is not None and self.null_values[i]:
            return None
        return self.data[self.bounds[i] : self.bounds[i + 1]]

    def header(self, i: int) -> Headers | None:
        return self.headers[i] if self.headers is not None else None

    def row(self, i: int) -> InRecord:
        key = self.keys[i] if self.keys is not None else None
        return int(self.partitions[i]), int(self.offsets[i]), key, self.value(i), self.header(i)

    def select(self, rows: npt.NDArray[np.int64], topic: str | None = None) -> InBatch:
        """The records ``rows`` as a batch of their own."""
        idx = rows.tolist()
        return InBatch.from_values(
            topic or self.topic,
            self.partitions[rows],
            self.offsets[rows],
            [self.keys[i] for i in idx] if self.keys is not None else None,
            [self.value(i) for i in idx],
            [self.headers[i] for i in idx] if self.headers is not None else None,
        )

    @classmethod
    def from_values(
        cls,
        topic: str,
        partitions: Sequence[int] | npt.NDArray[np.int32],
        offsets: Sequence[int] | npt.NDArray[np.int64],
        keys: list[bytes | None] | None,
        values: list[bytes | None],
        headers: list[Headers | None] | None,
    ) -> InBatch:
        """A batch from per-record columns (confluent-kafka's messages, tests, tools)."""
        n = len(values)
        nulls = values.count(None)
        data = b"".join(values if not nulls else [v or b"" for v in values])  # type: ignore[arg-type]
        bounds = np.zeros(n + 1, dtype=np.int64)
        lengths = map(len, cast(list[bytes], values)) if not nulls else (len(v) if v is not None else 0 for v in values)
        np.cumsum(np.fromiter(lengths, dtype=np.int64, count=n), out=bounds[1:])
        return cls(
            topic,
            np.asarray(partitions, dtype=np.int32),
            np.asarray(offsets, dtype=np.int64),
            data,
            bounds,
            null_values=np.fromiter((v is None for v in values), dtype=bool, count=n) if nulls else None,
            keys=keys if keys is not None and keys.count(None) != n else None,
            headers=headers if headers is not None and headers.count(None) != n else None,
        )

    @classmethod
    def of(cls, topic: str, rows: Sequence[InRecord]) -> InBatch:
        """A batch from records given one by one (tests, tools)."""
        return cls.from_values(
            topic,
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
            [r[4] for r in rows],
        )


def dead_letter(
    topic: str,
    value: bytes | None,
    key: bytes | None,
    headers: Headers | None,
    *,
    reason: str,
    error: str,
    origin_topic: str,
    partition: int,
    offset: int,
    group: str,
) -> OutRecord:
    """A dead letter: the original key, value and headers plus why and from where."""
    kept = tuple((n, v if isinstance(v, bytes) else str(v).encode()) for n, v in headers or () if v is not None)
    return OutRecord(
        topic,
        value,
        key,
        (
            *kept,
            ("cdl-reason", reason.encode()),
            ("cdl-error", error.encode()),
            ("cdl-origin-topic", origin_topic.encode()),
            ("cdl-origin-partition", str(partition).encode()),
            ("cdl-origin-offset", str(offset).encode()),
            ("cdl-group", group.encode()),
        ),
    )


def header_dict(headers: Headers | None) -> dict[str, str]:
    """Kafka headers as a dict of str (last one wins; undecodable values dropped)."""
    out: dict[str, str] = {}
    for name, raw in headers or ():
        if raw is None:
            continue
        try:
            out[name] = raw.decode() if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            continue
    return out


def _parse_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise DecodeError("ce_time is not RFC 3339", ce_time=text) from exc


def decode(key: bytes | None, value: bytes | None, headers: Headers | None) -> Event:
    """The :class:`Event` in a Kafka record; :class:`DecodeError` says why not."""
    h = header_dict(headers)
    missing = [n for n in ("ce_id", "ce_type", "ce_source", "ce_specversion") if not h.get(n)]
    if missing:
        raise DecodeError("missing CloudEvents headers", missing=missing)
    if h["ce_specversion"] != SPECVERSION:
        raise DecodeError("unsupported ce_specversion", ce_specversion=h["ce_specversion"])
    cls = EVENT_TYPES.get(h["ce_type"])
    if cls is None:
        raise DecodeError("unknown ce_type", ce_type=h["ce_type"])
    if value is None:
        raise DecodeError("empty record value", ce_id=h["ce_id"])
    content_type = h.get("content-type", CONTENT_PROTOBUF).split(";")[0].strip()
    payload = cls()
    try:
        if content_type == CONTENT_JSON:
            json_format.Parse(value.decode(), payload)
        elif content_type in (CONTENT_PROTOBUF, "application/x-protobuf"):
            payload.ParseFromString(value)
        else:
            raise DecodeError("unsupported content-type", content_type=content_type)
    except (ProtoDecodeError, json_format.ParseError, UnicodeDecodeError) as exc:
        raise DecodeError(f"payload is not a valid {cls.DESCRIPTOR.full_name}: {exc}", ce_id=h["ce_id"]) from exc
    return Event(
        payload=payload,
        source=h["ce_source"],
        id=h["ce_id"],
        type=h["ce_type"],
        time=_parse_time(h["ce_time"]) if h.get("ce_time") else datetime.now(UTC),
        traceparent=h.get("traceparent") or new_traceparent(),
        key=key.decode(errors="replace") if key is not None else None,
        content_type=content_type,
    )


def source_name(service: str) -> str:
    """The ce_source of a service instance (``/cdl/<service>/<host>``)."""
    return f"/cdl/{service}/{os.uname().nodename}"
