"""Reading state back: the newest committed value of a key in a (compacted state) topic."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from confluent_kafka import Consumer as _Consumer
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from cdl.errors import UnavailableError
from cdl.kafka.consumer import _as_bytes
from cdl.kafka.security import secured
from cdl.logging import get_logger

__all__ = ["read_latest", "read_state"]

log = get_logger(__name__)


def read_state(bootstrap: str, topic: str, prefix: bytes = b"", timeout_s: float = 240.0) -> dict[bytes, bytes]:
    """The newest committed value of every key of ``topic`` that starts with ``prefix`` (a key
    whose newest value is a tombstone is left out), once every transaction that was open on the
    topic when the call began has ended.

    That wait is what makes a handover safe: an instance that takes partitions over from one
    that was killed in the middle of a transaction must not read the state as it stood before
    that transaction if the transaction still commits (its markers come after the commit call
    returned), and while a dead instance's transaction stays open (until
    ``transaction.timeout.ms``, or until a process with its transactional id fences it) no
    snapshot committed after it is visible to a ``read_committed`` reader: reading then would
    miss them. So this waits until the topic's last stable offset reaches the end the call saw
    first (bounded by ``timeout_s``, then :class:`UnavailableError`), then reads as
    :func:`read_latest` does.
    """
    uncommitted = _Consumer(_reader_conf(bootstrap, "read_uncommitted"))
    try:
        ends = _ends(uncommitted, topic)
    finally:
        uncommitted.close()
    if ends is None:
        return {}
    consumer = _Consumer(_reader_conf(bootstrap, "read_committed"))
    try:
        deadline = time.monotonic() + timeout_s
        waited = False
        while True:  # a read_committed consumer's high watermark is the last stable offset
            stable = _ends(consumer, topic) or {}
            open_before = sorted(p for p, (_, high) in ends.items() if stable.get(p, (0, 0))[1] < high)
            if not open_before:
                break
            if time.monotonic() > deadline:
                raise UnavailableError(
                    "a transaction on the state topic stays open", topic=topic, partitions=open_before
                )
            if not waited:
                log.info("waiting for transactions open on the state topic to end", topic=topic)
                waited = True
            time.sleep(0.2)
        return _read_to_end(consumer, topic, stable, lambda k: k.startswith(prefix), deadline)
    finally:
        consumer.close()


def _reader_conf(bootstrap: str, isolation: str) -> dict[str, object]:
    return secured(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"cdl-reader-{os.getpid()}",
            "enable.auto.commit": False,
            "isolation.level": isolation,
            "enable.partition.eof": True,
            "auto.offset.reset": "error",
        }
    )


def _ends(consumer: _Consumer, topic: str) -> dict[int, tuple[int, int]] | None:
    """Each partition's (low, high) watermarks (the high one as the consumer's isolation level
    sees it); None when the topic does not exist."""
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return None
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in meta.partitions}
    except KafkaException as exc:
        raise UnavailableError("cannot read the state topic", topic=topic, error=str(exc)) from exc


def _read_to_end(
    consumer: _Consumer,
    topic: str,
    ends: dict[int, tuple[int, int]],
    wanted: Callable[[bytes], bool],
    deadline: float,
) -> dict[bytes, bytes]:
    """The newest value of each ``wanted`` key, reading every partition from its start to the
    end the broker reports (end-of-partition: for ``read_committed``, the last stable offset)."""
    tps = [TopicPartition(topic, p, low) for p, (low, high) in ends.items() if high > low]
    if not tps:
        return {}
    consumer.assign(tps)
    unfinished = {tp.partition for tp in tps}
    latest: dict[bytes, bytes] = {}
    while unfinished:
        if time.monotonic() > deadline:
            raise UnavailableError("timed out reading state topic", topic=topic, partitions=sorted(unfinished))
        for msg in consumer.consume(500, 0.5):
            err = msg.error()
            if err is None:
                key = _as_bytes(msg.key())
                if key is not None and wanted(key):
                    value = _as_bytes(msg.value())
                    if value is None:
                        latest.pop(key, None)
                    else:
                        latest[key] = value
            elif err.code() == KafkaError._PARTITION_EOF:
                unfinished.discard(int(msg.partition() or 0))
            elif err.fatal():
                raise UnavailableError("reading the state topic failed", topic=topic, error=str(err))
            else:  # informational (the broker is reconnecting): the deadline decides
                log.warning("reading the state topic", topic=topic, error=str(err))
    return latest


def read_latest(bootstrap: str, topic: str, key: bytes, timeout_s: float = 60.0) -> bytes | None:
    """The newest committed value for ``key`` in ``topic``, read from the start to the end.

    "The end" is what the broker says it is: every partition is read until the
    consumer reports end-of-partition (for ``read_committed``, the last stable
    offset), never until "nothing came for a while" — right after a broker
    restart the first fetch may take seconds, and a snapshot read short would
    be an older state. Raises :class:`UnavailableError` when the broker cannot
    be reached or the end is not reached within ``timeout_s``.
    """
    consumer = _Consumer(_reader_conf(bootstrap, "read_committed"))
    try:
        ends = _ends(consumer, topic)
        if ends is None:
            return None
        values = _read_to_end(consumer, topic, ends, lambda k: k == key, time.monotonic() + timeout_s)
        return values.get(key)
    finally:
        consumer.close()
