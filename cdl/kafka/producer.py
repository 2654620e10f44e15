"""An idempotent (``acks=all``) producer, and the produce call that waits out a full queue."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, Message
from confluent_kafka import Producer as _Producer

from cdl.errors import UnavailableError
from cdl.events import Event, encode
from cdl.kafka.security import secured

__all__ = ["Producer"]


def _produce(
    producer: _Producer,
    topic: str,
    value: bytes | None,
    key: bytes | None,
    headers: Sequence[tuple[str, bytes]] | None,
    on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    partition: int | None = None,
) -> None:
    """Produce (to ``partition``, or where the partitioner puts ``key``), serving delivery
    callbacks while librdkafka's queue is full."""
    while True:
        try:
            if partition is None:
                producer.produce(topic, value=value, key=key, headers=list(headers or []), on_delivery=on_delivery)
            else:
                producer.produce(
                    topic,
                    value=value,
                    key=key,
                    headers=list(headers or []),
                    on_delivery=on_delivery,
                    partition=partition,
                )
            return
        except BufferError:
            producer.poll(0.05)


class Producer:
    """Idempotent (``acks=all``) producer; ``flush`` raises when anything failed."""

    def __init__(self, bootstrap: str, client_id: str = "cdl", **config: Any) -> None:
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "client.id": client_id,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.timeout.ms": 30000,
        }
        conf.update(config)
        self._producer = _Producer(secured(conf))
        self._errors: list[str] = []
        self._lock = threading.Lock()

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            with self._lock:
                self._errors.append(f"{msg.topic()}: {err}")

    def send_raw(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        _produce(self._producer, topic, value, key, headers, on_delivery or self._on_delivery)

    def send(self, topic: str, event: Event) -> None:
        key, value, headers = encode(event)
        self.send_raw(topic, value, key, headers)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every sent record is acknowledged; raise if any was not."""
        remaining = self._producer.flush(timeout_s)
        with self._lock:
            errors, self._errors = self._errors, []
        if remaining:
            raise UnavailableError("records not acknowledged in time", remaining=remaining)
        if errors:
            raise UnavailableError("produce failed", errors=errors[:5])

    def poll(self, timeout_s: float = 0.0) -> None:
        self._producer.poll(timeout_s)
