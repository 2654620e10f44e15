"""The batch loop: :class:`TransactionalLoop` consumes a stream in batches and publishes, every
flush, what its processor returns together with the consumed offsets in one Kafka transaction
(ingest)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from confluent_kafka import Consumer as _Consumer
from confluent_kafka import Message, TopicPartition

from cdl.events import Headers, InBatch, OutRecord
from cdl.failure import FailurePolicy
from cdl.kafka.consumer import consumer_conf
from cdl.kafka.session import _consumer_error, _TransactionalBase
from cdl.kafka_native import NativeConsumer
from cdl.kafka_native import available as native_available
from cdl.logging import get_logger

__all__ = ["BatchProcessor", "TransactionalLoop"]

log = get_logger(__name__)


class BatchProcessor(Protocol):
    """What :class:`TransactionalLoop` drives (see ``services/ingest/processor.py``)."""

    def on_batch(self, batch: InBatch) -> None: ...

    def wants_flush(self) -> bool: ...

    def flush(self, now: float | None = None) -> list[OutRecord]: ...


class _BatchConsumer(_Consumer):
    """confluent-kafka's consumer, handing over batches as :class:`NativeConsumer` does
    (the loop's consumer where the columnar one is not available)."""

    group = ""

    def consume_batches(self, max_records: int, timeout_s: float) -> tuple[int, list[InBatch]]:
        """Up to ``max_records`` messages, one :class:`InBatch` per topic; and how many in all."""
        msgs = self.consume(max_records, timeout_s)
        return len(msgs), _columns(msgs, self.group)


class TransactionalLoop(_TransactionalBase[_BatchConsumer | NativeConsumer]):
    """Consume in batches; publish each flush's records and the input offsets in one transaction.

    Exactly-once from the consumer's point of view: after a crash the next
    instance (same ``transactional_id``) fences the old one, aborts its open
    transaction and resumes from the offsets of the last committed flush, whose
    records (dead letters, events, state snapshot) are all visible or none is.
    A failure inside the process (the processor raised, a transaction could
    not be committed, the broker went away for longer than the policy's
    ``transaction_retry_s``) does the same in place: ``on_restore`` must put
    the processor back to the last committed state.

    Several instances in one group share the topics' partitions. ``on_assigned``
    is told every assignment (``(topic, partition)`` pairs, the whole of it), after
    the rebalance and before any record of it is handed over, outside librdkafka's
    callback (so a long restore is watched against ``restore_deadline_s``);
    ``on_released`` is called when partitions are revoked, right after what was
    consumed from them was committed (ingest takes over and drops state there).

    Records arrive by column from :class:`~cdl.kafka_native.NativeConsumer`
    where it is available (``columnar``), else from confluent-kafka's consumer.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        group_id: str,
        topics: Sequence[str],
        transactional_id: str,
        processor: BatchProcessor,
        on_restore: Callable[[], None] | None = None,
        on_assigned: Callable[[list[tuple[str, int]]], None] | None = None,
        on_released: Callable[[], None] | None = None,
        flush_interval_s: float = 1.0,
        batch_size: int = 1000,
        consumer_config: dict[str, Any] | None = None,
        producer_config: dict[str, Any] | None = None,
        columnar: bool = True,
        policy: FailurePolicy | None = None,
    ) -> None:
        conf = consumer_conf(bootstrap, group_id, consumer_config)
        native = columnar and native_available()

        def make_consumer() -> _BatchConsumer | NativeConsumer:
            if native:
                return NativeConsumer(conf, batch_size)
            consumer = _BatchConsumer(conf)
            consumer.group = group_id
            return consumer

        super().__init__(
            make_consumer=make_consumer,
            bootstrap=bootstrap,
            group_id=group_id,
            topics=topics,
            transactional_id=transactional_id,
            producer_config=producer_config,
            policy=policy,
            on_restore=on_restore,
        )
        consumer = "NativeConsumer" if native else "Consumer"  # confluent-kafka's
        log.info("transactional loop", consumer=consumer, topics=list(topics))
        self._processor = processor
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._last_positions: dict[tuple[str, int], int] = {}
        self._on_assigned_cb = on_assigned
        self._on_released_cb = on_released
        #: the assignment the group gave and ``on_assigned`` has not been told yet
        self._new_assignment: list[tuple[str, int]] | None = None

    def _serve(self, until: Callable[[], bool] | None) -> None:
        last_flush = time.monotonic()
        while not self._stop.is_set() and not (until is not None and until()):
            # a short wait: consume() holds a partial batch until the timeout
            with self._step("consume", 0.05, self._rebalance_s):
                n, batches = self._consumer.consume_batches(self._batch_size, 0.05)
            self._tell_assignment()
            for batch in batches:
                batch.caught_up = n < self._batch_size
                self._processor.on_batch(batch)
            if self._processor.wants_flush() or time.monotonic() - last_flush >= self._flush_interval_s:
                self.commit()
                last_flush = time.monotonic()
        self.commit()

    def _reset_session(self) -> None:
        self._last_positions = {}
        self._new_assignment = None

    def _on_assigned(self, partitions: list[TopicPartition]) -> None:
        if self._on_assigned_cb is not None:
            self._new_assignment = [(str(tp.topic), int(tp.partition)) for tp in partitions]

    def _tell_assignment(self) -> None:
        """Hand a new assignment to ``on_assigned`` (before any record of it is handed over)."""
        if self._new_assignment is None or self._on_assigned_cb is None:
            return
        partitions, self._new_assignment = self._new_assignment, None
        with self._step("assigned", self._policy.restore_deadline_s):
            self._on_assigned_cb(partitions)

    def _on_revoked(self, partitions: list[TopicPartition]) -> None:
        self.commit()  # what was consumed from them, while they are still ours
        if self._on_released_cb is not None:
            self._on_released_cb()

    def commit(self) -> None:
        """Flush the processor and commit its records with the consumed offsets."""
        records = self._processor.flush()
        positions = self._positions()
        moved = any(self._last_positions.get((tp.topic, tp.partition)) != tp.offset for tp in positions)
        if not records and not moved:
            return
        self._transact(records, positions)
        self._last_positions = {(tp.topic, tp.partition): tp.offset for tp in positions}


def _columns(msgs: list[Message], group: str) -> list[InBatch]:
    """Consumed messages as one :class:`InBatch` per topic (errors logged, EOF events dropped).

    The hot path: a handful of list comprehensions, no Python object per record.
    """
    errors = [m.error() for m in msgs]
    if errors.count(None) != len(errors):
        for err in errors:
            if err is not None:
                _consumer_error(err, group)
        msgs = [m for m, err in zip(msgs, errors, strict=True) if err is None]
    if not msgs:
        return []
    topics = [m.topic() for m in msgs]
    groups = (
        [msgs]
        if topics.count(topics[0]) == len(topics)
        else [[m for m, t in zip(msgs, topics, strict=True) if t == topic] for topic in dict.fromkeys(topics)]
    )
    # a consumed message always has a partition and an offset; headers are a list of tuples
    return [
        InBatch.from_values(
            str(group[0].topic()),
            cast(list[int], [m.partition() for m in group]),
            cast(list[int], [m.offset() for m in group]),
            [m.key() for m in group],
            [m.value() for m in group],
            cast(list[Headers | None], [m.headers() for m in group]),
        )
        for group in groups
    ]
