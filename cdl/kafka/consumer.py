"""What the consumers share: the settings every cdl loop uses, and where a consumed record came from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from confluent_kafka import Message

from cdl.kafka.security import secured

__all__ = ["RecordContext", "consumer_conf"]


def consumer_conf(bootstrap: str, group_id: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Consumer settings every cdl loop uses: manual commits, read_committed, from the earliest offset."""
    return secured(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 1000,
            # librdkafka pauses fetching for a whole second (the default) whenever its local
            # queue is over its threshold: a consumer that catches up would then idle
            "fetch.queue.backoff.ms": 20,
            **(extra or {}),
        }
    )


@dataclass(frozen=True)
class RecordContext:
    """Where the record being handled came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    @classmethod
    def of(cls, msg: Message) -> RecordContext:
        return cls(
            topic=str(msg.topic()),
            partition=int(msg.partition() or 0),
            offset=int(msg.offset() or 0),
            key=_as_bytes(msg.key()),
            value=_as_bytes(msg.value()),
            headers=[(str(k), v) for k, v in list(msg.headers() or []) if isinstance(v, bytes)],
        )


def _as_bytes(value: object) -> bytes | None:
    if value is None:
        return None
    return value if isinstance(value, bytes) else str(value).encode()
