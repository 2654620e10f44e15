"""Reading state back: the newest committed value of a key in a (compacted state) topic."""

from __future__ import annotations

import os
import time

from confluent_kafka import Consumer as _Consumer
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from cdl.errors import UnavailableError
from cdl.kafka.consumer import _as_bytes
from cdl.kafka.security import secured
from cdl.logging import get_logger

__all__ = ["read_latest"]

log = get_logger(__name__)


def read_latest(bootstrap: str, topic: str, key: bytes, timeout_s: float = 60.0) -> bytes | None:
    """The newest committed value for ``key`` in ``topic``, read from the start to the end.

    "The end" is what the broker says it is: every partition is read until the
    consumer reports end-of-partition (for ``read_committed``, the last stable
    offset), never until "nothing came for a while" — right after a broker
    restart the first fetch may take seconds, and a snapshot read short would
    be an older state. Raises :class:`UnavailableError` when the broker cannot
    be reached or the end is not reached within ``timeout_s``.
    """
    consumer = _Consumer(
        secured(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"cdl-reader-{os.getpid()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
                "auto.offset.reset": "error",
            }
        )
    )
    try:
        try:
            meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None:
                return None
            tps = []
            for p in meta.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                if high > low:
                    tps.append(TopicPartition(topic, p, low))
        except KafkaException as exc:
            raise UnavailableError("cannot read the state topic", topic=topic, error=str(exc)) from exc
        if not tps:
            return None
        consumer.assign(tps)
        unfinished = {tp.partition for tp in tps}
        latest: bytes | None = None
        deadline = time.monotonic() + timeout_s
        while unfinished:
            if time.monotonic() > deadline:
                raise UnavailableError("timed out reading state topic", topic=topic, partitions=sorted(unfinished))
            for msg in consumer.consume(500, 0.5):
                err = msg.error()
                if err is None:
                    if msg.key() == key:
                        latest = _as_bytes(msg.value())
                elif err.code() == KafkaError._PARTITION_EOF:
                    unfinished.discard(int(msg.partition() or 0))
                elif err.fatal():
                    raise UnavailableError("reading the state topic failed", topic=topic, error=str(err))
                else:  # informational (the broker is reconnecting): the deadline decides
                    log.warning("reading the state topic", topic=topic, error=str(err))
        return latest
    finally:
        consumer.close()
