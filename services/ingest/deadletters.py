"""Dead letters: a rejected record as it came, cut down to what a Kafka record can carry.

Owns the dead letters waiting for the next flush and the bytes they hold (many waiting make
the loop flush sooner: :meth:`DeadLetters.full`). A dead letter keeps the record's key, value
and headers, each cut to a bound whatever the record held (the reason says what was cut),
and says why, where the record came from and which group rejected it.
"""

from __future__ import annotations

from prometheus_client import Counter as PromCounter

from cdl.events import InRecord, OutRecord, dead_letter
from services.ingest.records import RecordError

__all__ = ["DeadLetters"]

REJECTED = PromCounter("cdl_ingest_rejected_total", "Records dead-lettered by ingest, by reason", ["reason"])

#: what a dead letter keeps of a rejected record's key, and of its reason
_DEAD_KEY_BYTES = 1 << 12
_DEAD_REASON_CHARS = 1000
#: headers are kept on a dead letter up to this many bytes in all
_DEAD_HEADER_BYTES = 1 << 16


class DeadLetters:
    """The dead letters of rejected records, waiting for the next flush."""

    def __init__(self, *, topic: str, origin_topic: str, group: str, max_value_bytes: int, flush_bytes: int) -> None:
        self._topic = topic
        self._origin_topic = origin_topic
        self._group = group
        self._value_max = max_value_bytes
        self._flush_bytes = flush_bytes
        self.reset()

    def reset(self) -> None:
        """None waits."""
        self._dead: list[OutRecord] = []
        self._dead_bytes = 0

    def add(self, incoming: InRecord, exc: RecordError, origin: str | None = None) -> None:
        """Dead-letter a record (from ``origin``, by default the records' topic): its key, value
        and headers as they came, cut down to what a Kafka record can carry whatever the record
        held (the reason says what was cut)."""
        partition, offset, key, value, headers = incoming
        reason = str(exc)
        if len(reason) > _DEAD_REASON_CHARS:
            reason = reason[:_DEAD_REASON_CHARS] + "..."
        if value is not None and len(value) > self._value_max:
            reason += f" (the dead letter keeps the first {self._value_max} of {len(value)} bytes)"
            value = value[: self._value_max]
        if key is not None and len(key) > _DEAD_KEY_BYTES:
            reason += f" (the key is cut to {_DEAD_KEY_BYTES} of {len(key)} bytes)"
            key = key[:_DEAD_KEY_BYTES]
        header_bytes = sum(len(n) + len(v or b"") for n, v in headers) if headers else 0
        if header_bytes > _DEAD_HEADER_BYTES:
            reason += f" (its headers, over {_DEAD_HEADER_BYTES} bytes, are left out)"
            headers, header_bytes = None, 0
        # what the dead letter holds: value, key, the headers kept, the reason and cdl-* headers
        self._dead_bytes += len(value or b"") + len(key or b"") + header_bytes + len(reason) + 256
        self._dead.append(
            dead_letter(
                self._topic,
                value,
                key,
                headers,
                reason=reason,
                error=exc.reason.value,
                origin_topic=origin or self._origin_topic,
                partition=partition,
                offset=offset,
                group=self._group,
            )
        )
        REJECTED.labels(exc.reason.value).inc()

    def full(self) -> bool:
        """Many wait (10,000, or ``deadletter_flush_bytes``): flush now."""
        return len(self._dead) >= 10000 or self._dead_bytes >= self._flush_bytes

    def take(self) -> list[OutRecord]:
        """Every dead letter waiting (for the flush to publish); none waits afterwards."""
        out = list(self._dead)
        self._dead.clear()
        self._dead_bytes = 0
        return out
