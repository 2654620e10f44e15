"""Kafka transport: an idempotent producer and an at-least-once consumer loop.

The loop decodes each record into an :class:`~cdl.events.Event`, skips events
whose ``ce_id`` its group already handled, calls the handler, produces the
events the handler returned, waits for the broker to acknowledge them, marks
the event handled and only then commits the offset. Retryable errors are
retried with exponential backoff; permanent failures and undecodable records go
to the dead-letter topic with the original key, value and headers plus a
``cdl-reason`` header. SIGTERM/SIGINT stop the loop after the current record.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Generic, Protocol, TypeVar, cast

from confluent_kafka import Consumer as _Consumer
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka import Producer as _Producer

from cdl.dedupe import MemoryProcessedStore, ProcessedStore
from cdl.errors import CdlError, DecodeError, UnavailableError
from cdl.events import Event, Headers, InBatch, OutRecord, Topics, dead_letter, decode, encode
from cdl.kafka_native import NativeConsumer
from cdl.kafka_native import available as native_available
from cdl.logging import get_logger
from cdl.observability import EVENTS, HANDLER_SECONDS

__all__ = [
    "ConsumerLoop",
    "Delivery",
    "JobLoop",
    "Outgoing",
    "Producer",
    "RecordContext",
    "TransactionalLoop",
    "consumer_conf",
    "ensure_topics",
    "read_latest",
]

log = get_logger(__name__)


def _produce(
    producer: _Producer,
    topic: str,
    value: bytes | None,
    key: bytes | None,
    headers: Sequence[tuple[str, bytes]] | None,
    on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
) -> None:
    """Produce, serving delivery callbacks while librdkafka's queue is full."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, headers=list(headers or []), on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.05)


def ensure_topics(
    bootstrap: str, partitions: Mapping[str, int], configs: Mapping[str, Mapping[str, str]] | None = None
) -> list[str]:
    """Create the topics of ``partitions`` that do not exist yet (replication 1); returns those created.

    ``configs`` gives topic settings such as ``cleanup.policy``. A topic that
    appears concurrently counts as existing; any other failure raises.
    """
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=10).topics)
    wanted = [
        NewTopic(t, num_partitions=n, replication_factor=1, config=dict((configs or {}).get(t, {})))
        for t, n in partitions.items()
        if t not in existing
    ]
    created = []
    for topic, fut in admin.create_topics(wanted, operation_timeout=30).items() if wanted else []:
        try:
            fut.result(timeout=30)
            created.append(topic)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise UnavailableError("creating topic failed", topic=topic, error=str(exc)) from exc
    return created


def consumer_conf(bootstrap: str, group_id: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Consumer settings every cdl loop uses: manual commits, read_committed, from the earliest offset."""
    return {
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


@dataclass(frozen=True)
class Delivery:
    topic: str
    partition: int
    offset: int


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
        self._producer = _Producer(conf)
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

    def publish(self, topic: str, event: Event, timeout_s: float = 30.0) -> Delivery:
        """Send one event and wait for the broker's acknowledgement."""
        result: list[Delivery | str] = []

        def done(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                result.append(str(err))
            else:
                result.append(Delivery(str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0)))

        key, value, headers = encode(event)
        self.send_raw(topic, value, key, headers, on_delivery=done)
        self._producer.flush(timeout_s)
        if not result:
            raise UnavailableError("broker did not acknowledge in time", topic=topic, ce_id=event.id)
        outcome = result[0]
        if isinstance(outcome, str):
            raise UnavailableError("produce failed", topic=topic, error=outcome)
        return outcome

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


@dataclass(frozen=True)
class Outgoing:
    """An event a handler wants published once its input is handled."""

    topic: str
    event: Event


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


Handler = Callable[[Event, RecordContext], Sequence[Outgoing] | None]


def _as_bytes(value: object) -> bytes | None:
    if value is None:
        return None
    return value if isinstance(value, bytes) else str(value).encode()


class _Stoppable:
    """Stop after the current record, on request or on SIGTERM/SIGINT."""

    group_id: str
    _stop: threading.Event

    def stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def _handler(signum: int, frame: FrameType | None) -> None:
            log.info("stopping on signal", signal=signum, group=self.group_id)
            self.stop()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)


class ConsumerLoop(_Stoppable):
    """At-least-once, idempotent handling of one consumer group's topics."""

    def __init__(
        self,
        *,
        bootstrap: str,
        group_id: str,
        topics: Sequence[str],
        handler: Handler,
        producer: Producer,
        processed: ProcessedStore | None = None,
        deadletter_topic: str = Topics.DATA_DEADLETTER,
        max_retries: int = 5,
        backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        poll_timeout_s: float = 0.5,
        consumer_config: dict[str, Any] | None = None,
    ) -> None:
        conf = consumer_conf(bootstrap, group_id, {"max.poll.interval.ms": 600000, **(consumer_config or {})})
        self.group_id = group_id
        self.topics = list(topics)
        self._consumer = _Consumer(conf)
        self._handler = handler
        self._producer = producer
        self._processed = processed or MemoryProcessedStore()
        self._deadletter = deadletter_topic
        self._max_retries = max_retries
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._poll_timeout_s = poll_timeout_s
        self._stop = threading.Event()
        self.handled = 0
        self.deadlettered = 0
        self.skipped = 0

    def run(self, max_records: int | None = None, idle_timeout_s: float | None = None) -> None:
        """Consume until stopped (or ``max_records`` handled / idle for ``idle_timeout_s``)."""
        self._consumer.subscribe(self.topics)
        seen = 0
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                msg = self._consumer.poll(self._poll_timeout_s)
                if msg is None:
                    if idle_timeout_s is not None:
                        if not self._consumer.assignment():
                            last = time.monotonic()  # idle time counts once partitions are ours
                        elif time.monotonic() - last > idle_timeout_s:
                            return
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error", error=str(err), group=self.group_id)
                    continue
                self._process(msg)
                seen += 1
                last = time.monotonic()
                if max_records is not None and seen >= max_records:
                    return
        finally:
            self._consumer.close()

    # -------------------------------------------------------------- one record
    def _process(self, msg: Message) -> None:
        ctx = RecordContext.of(msg)
        try:
            event = decode(ctx.key, ctx.value, ctx.headers)
        except DecodeError as exc:
            self._dead_letter(ctx, exc, "undecodable")
            self._commit(msg)
            return
        if self._processed.seen(self.group_id, event.id):
            EVENTS.labels(ctx.topic, self.group_id, "duplicate").inc()
            self.skipped += 1
            log.info("duplicate event skipped", ce_id=event.id, topic=ctx.topic, group=self.group_id)
            self._commit(msg)
            return
        attempt = 0
        while True:
            try:
                with HANDLER_SECONDS.labels(self.group_id).time():
                    outputs = self._handler(event, ctx) or []
                    for out in outputs:
                        self._producer.send(out.topic, out.event)
                    self._producer.flush()
                break
            except CdlError as exc:
                if exc.retryable and attempt < self._max_retries and not self._stop.is_set():
                    attempt += 1
                    self._backoff(attempt, exc, event)
                    continue
                reason = "retries exhausted" if exc.retryable else "permanent failure"
                self._dead_letter(ctx, exc, reason)
                self._processed.mark(self.group_id, event.id)
                self._commit(msg)
                return
            except Exception as exc:  # noqa: BLE001 - a bug in a handler must not stop the stream
                if attempt < self._max_retries and not self._stop.is_set():
                    attempt += 1
                    self._backoff(attempt, exc, event)
                    continue
                self._dead_letter(ctx, exc, "handler crashed")
                self._processed.mark(self.group_id, event.id)
                self._commit(msg)
                return
        self._processed.mark(self.group_id, event.id)
        self._commit(msg)
        self.handled += 1
        EVENTS.labels(ctx.topic, self.group_id, "handled").inc()

    def _backoff(self, attempt: int, exc: BaseException, event: Event) -> None:
        delay = min(self._max_backoff_s, self._backoff_s * 2 ** (attempt - 1))
        EVENTS.labels("", self.group_id, "retried").inc()
        log.warning("handler failed, retrying", ce_id=event.id, attempt=attempt, delay_s=delay, error=str(exc))
        self._stop.wait(delay)

    def _dead_letter(self, ctx: RecordContext, exc: BaseException, reason: str) -> None:
        out = dead_letter(
            self._deadletter,
            ctx.value,
            ctx.key,
            ctx.headers,
            reason=f"{reason}: {exc}",
            error=type(exc).__name__,
            origin_topic=ctx.topic,
            partition=ctx.partition,
            offset=ctx.offset,
            group=self.group_id,
        )
        self._producer.send_raw(out.topic, out.value, out.key, out.headers)
        self._producer.flush()
        self.deadlettered += 1
        EVENTS.labels(ctx.topic, self.group_id, "deadlettered").inc()
        log.warning(
            "record dead-lettered",
            reason=reason,
            error=str(exc),
            topic=ctx.topic,
            partition=ctx.partition,
            offset=ctx.offset,
            group=self.group_id,
        )

    def _commit(self, msg: Message) -> None:
        tp = TopicPartition(str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0) + 1)
        for attempt in range(5):
            try:
                self._consumer.commit(offsets=[tp], asynchronous=False)
                return
            except KafkaException as exc:
                log.warning("offset commit failed", attempt=attempt, error=str(exc))
                time.sleep(0.2 * (attempt + 1))
        raise UnavailableError("offset commit failed", topic=tp.topic, partition=tp.partition)


class BatchProcessor(Protocol):
    """What :class:`TransactionalLoop` drives (see ``services/ingest/processor.py``)."""

    def on_batch(self, batch: InBatch) -> None: ...

    def wants_flush(self) -> bool: ...

    def flush(self, now: float | None = None) -> list[OutRecord]: ...


class _GroupConsumer(Protocol):
    """What a transaction needs of a consumer (confluent-kafka's, or :class:`NativeConsumer`)."""

    def assignment(self) -> list[TopicPartition]: ...

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]: ...

    def consumer_group_metadata(self) -> Any: ...

    def close(self) -> None: ...


_C = TypeVar("_C", bound=_GroupConsumer)


class _TransactionalBase(_Stoppable, Generic[_C]):
    """What the transactional loops share: a read_committed consumer without auto
    commit, a transactional producer, stop/signal handling, and one transaction
    that publishes records together with consumer offsets."""

    def __init__(
        self,
        *,
        consumer: _C,
        bootstrap: str,
        group_id: str,
        topics: Sequence[str],
        transactional_id: str,
        producer_config: dict[str, Any] | None = None,
    ) -> None:
        self._consumer = consumer
        pconf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "transactional.id": transactional_id,
            "linger.ms": 5,
            "compression.type": "lz4",
            "transaction.timeout.ms": 60000,
        }
        pconf.update(producer_config or {})
        self._producer = _Producer(pconf)
        self.group_id = group_id
        self._topics = list(topics)
        self._stop = threading.Event()
        self._initialised = False
        #: set while the group has given this loop its partitions
        self.assigned = threading.Event()

    def init(self) -> None:
        """Fence older instances with the same transactional id and abort their open transaction."""
        if not self._initialised:
            self._producer.init_transactions(30)
            self._initialised = True

    def _positions(self) -> list[TopicPartition]:
        assignment = self._consumer.assignment()
        return [tp for tp in self._consumer.position(assignment) if tp.offset >= 0] if assignment else []

    def _transact(self, records: Sequence[OutRecord], offsets: Sequence[TopicPartition]) -> None:
        """Publish ``records`` and commit ``offsets`` atomically; on failure the caller must restart."""
        self._producer.begin_transaction()
        try:
            for rec in records:
                _produce(self._producer, rec.topic, rec.value, rec.key, rec.headers)
            if offsets:
                self._producer.send_offsets_to_transaction(list(offsets), self._consumer.consumer_group_metadata(), 30)
            self._producer.commit_transaction(60)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if err is not None and hasattr(err, "txn_requires_abort") and err.txn_requires_abort():
                self._producer.abort_transaction(30)
            # in-memory state may be ahead of what Kafka holds: stop; a restart recovers
            raise UnavailableError("transaction failed; restart to recover", error=str(exc)) from exc


class _BatchConsumer(_Consumer):
    """confluent-kafka's consumer, handing over batches as :class:`NativeConsumer` does
    (the loop's consumer where the columnar one is not available)."""

    def consume_batches(self, max_records: int, timeout_s: float) -> tuple[int, list[InBatch]]:
        """Up to ``max_records`` messages, one :class:`InBatch` per topic; and how many in all."""
        msgs = self.consume(max_records, timeout_s)
        return len(msgs), _columns(msgs)


class TransactionalLoop(_TransactionalBase[_BatchConsumer | NativeConsumer]):
    """Consume in batches; publish each flush's records and the input offsets in one transaction.

    Exactly-once from the consumer's point of view: after a crash the next
    instance (same ``transactional_id``) fences the old one, aborts its open
    transaction and resumes from the offsets of the last committed flush, whose
    records (dead letters, events, state snapshot) are all visible or none is.

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
        flush_interval_s: float = 1.0,
        batch_size: int = 1000,
        consumer_config: dict[str, Any] | None = None,
        producer_config: dict[str, Any] | None = None,
        columnar: bool = True,
    ) -> None:
        conf = consumer_conf(bootstrap, group_id, consumer_config)
        super().__init__(
            consumer=NativeConsumer(conf, batch_size) if columnar and native_available() else _BatchConsumer(conf),
            bootstrap=bootstrap,
            group_id=group_id,
            topics=topics,
            transactional_id=transactional_id,
            producer_config=producer_config,
        )
        consumer = "NativeConsumer" if isinstance(self._consumer, NativeConsumer) else "Consumer"  # confluent-kafka's
        log.info("transactional loop", consumer=consumer, topics=list(topics))
        self._processor = processor
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._last_positions: dict[tuple[str, int], int] = {}
        self.transactions = 0

    def run(self, until: Callable[[], bool] | None = None) -> None:
        self.init()
        self._consumer.subscribe(self._topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        last_flush = time.monotonic()
        try:
            while not self._stop.is_set() and not (until is not None and until()):
                # a short wait: consume() holds a partial batch until the timeout
                n, batches = self._consumer.consume_batches(self._batch_size, 0.05)
                for batch in batches:
                    batch.caught_up = n < self._batch_size
                    self._processor.on_batch(batch)
                if self._processor.wants_flush() or time.monotonic() - last_flush >= self._flush_interval_s:
                    self.commit()
                    last_flush = time.monotonic()
            self.commit()
        finally:
            self._consumer.close()
            self._producer.flush(10)

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.assigned.set()
        log.info("partitions assigned", partitions=[f"{tp.topic}[{tp.partition}]" for tp in partitions])

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.assigned.clear()
        self.commit()

    def commit(self) -> None:
        """Flush the processor and commit its records with the consumed offsets."""
        records = self._processor.flush()
        positions = self._positions()
        moved = any(self._last_positions.get((tp.topic, tp.partition)) != tp.offset for tp in positions)
        if not records and not moved:
            return
        self._transact(records, positions)
        self._last_positions = {(tp.topic, tp.partition): tp.offset for tp in positions}
        self.transactions += 1


def _columns(msgs: list[Message]) -> list[InBatch]:
    """Consumed messages as one :class:`InBatch` per topic (errors logged, EOF events dropped).

    The hot path: a handful of list comprehensions, no Python object per record.
    """
    errors = [m.error() for m in msgs]
    if errors.count(None) != len(errors):
        for err in errors:
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error", error=str(err))
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


def read_latest(bootstrap: str, topic: str, key: bytes, timeout_s: float = 30.0) -> bytes | None:
    """The newest committed value for ``key`` in ``topic`` (read from start to end)."""
    consumer = _Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"cdl-reader-{os.getpid()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        md = consumer.list_topics(topic, timeout=10)
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None:
            return None
        latest: bytes | None = None
        tps = []
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                tps.append(TopicPartition(topic, p, low))
        if not tps:
            return None
        consumer.assign(tps)
        deadline = time.monotonic() + timeout_s
        quiet = 0
        # read until the partitions stay quiet: the last records of a transactional
        # topic are commit markers, never delivered, so positions stop below the end
        while quiet < 2:
            if time.monotonic() > deadline:
                raise UnavailableError("timed out reading state topic", topic=topic)
            batch = consumer.consume(500, 0.5)
            quiet = 0 if batch else quiet + 1
            for msg in batch:
                if msg.error() is None and msg.key() == key:
                    latest = _as_bytes(msg.value())
        return latest
    finally:
        consumer.close()


@dataclass
class _Pending:
    event: Event
    ctx: RecordContext


class JobLoop(_TransactionalBase[_Consumer]):
    """Long jobs from events, one at a time, exactly once.

    Events are decoded and coalesced by ``key(event)``: of several pending
    events with one key only the newest is handled (a backlog of dataset
    versions trains once, on the newest). While a job runs in a worker thread
    the loop pauses its partitions and keeps polling, so a long job causes no
    rebalance whatever ``max.poll.interval.ms`` is. When the job returns, its
    outputs and the consumed offsets (never past an event still pending) are
    committed in one transaction. Undecodable events and jobs that fail for
    good are dead-lettered in the same way.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        group_id: str,
        topics: Sequence[str],
        transactional_id: str,
        job: Callable[[Event, RecordContext], Sequence[OutRecord]],
        key: Callable[[Event], str],
        deadletter_topic: str = Topics.DATA_DEADLETTER,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        processed: ProcessedStore | None = None,
    ) -> None:
        super().__init__(
            consumer=_Consumer(consumer_conf(bootstrap, group_id)),
            bootstrap=bootstrap,
            group_id=group_id,
            topics=topics,
            transactional_id=transactional_id,
        )
        self._processed = processed or MemoryProcessedStore()
        self._job = job
        self._key = key
        self._deadletter = deadletter_topic
        self._max_retries = max_retries
        self._backoff_s = backoff_s
        self._pending: dict[str, _Pending] = {}
        self._dead: list[OutRecord] = []
        self.busy = threading.Event()
        self.jobs_done = 0
        self.coalesced = 0

    def run(self, until: Callable[[], bool] | None = None) -> None:
        self.init()
        self._consumer.subscribe(self._topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not self._stop.is_set() and not (until is not None and until()):
                for msg in self._consumer.consume(100, 0.3):
                    self._take(msg)
                if self._pending:
                    self._run_one()
                elif self._dead:
                    self._commit([])
        finally:
            self._consumer.close()

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.assigned.set()

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.assigned.clear()
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._pending = {k: p for k, p in self._pending.items() if (p.ctx.topic, p.ctx.partition) not in gone}

    def _take(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error", error=str(err))
            return
        ctx = RecordContext.of(msg)
        try:
            event = decode(ctx.key, ctx.value, ctx.headers)
        except DecodeError as exc:
            self._dead.append(self._dead_letter(ctx, f"undecodable: {exc}", type(exc).__name__))
            return
        if self._processed.seen(self.group_id, event.id):
            EVENTS.labels(ctx.topic, self.group_id, "duplicate").inc()
            log.info("duplicate event skipped", ce_id=event.id, topic=ctx.topic)
            return
        key = self._key(event)
        if key in self._pending:
            self.coalesced += 1
            log.info("event coalesced", key=key, dropped=self._pending[key].event.id, newest=event.id)
        self._pending[key] = _Pending(event, ctx)

    def _dead_letter(self, ctx: RecordContext, reason: str, error: str) -> OutRecord:
        EVENTS.labels(ctx.topic, self.group_id, "deadlettered").inc()
        return dead_letter(
            self._deadletter,
            ctx.value,
            ctx.key,
            ctx.headers,
            reason=reason,
            error=error,
            origin_topic=ctx.topic,
            partition=ctx.partition,
            offset=ctx.offset,
            group=self.group_id,
        )

    def _run_one(self) -> None:
        key = min(self._pending, key=lambda k: (self._pending[k].ctx.partition, self._pending[k].ctx.offset))
        item = self._pending[key]
        outputs: list[OutRecord] = []
        attempt = 0
        while True:
            error: BaseException | None = None
            try:
                outputs = list(self._in_worker(item))
            except BaseException as exc:  # noqa: BLE001 - decided below
                error = exc
            if error is None:
                break
            retryable = not isinstance(error, CdlError) or error.retryable
            if retryable and attempt < self._max_retries and not self._stop.is_set():
                attempt += 1
                log.warning("job failed, retrying", key=key, attempt=attempt, error=str(error))
                self._stop.wait(self._backoff_s * attempt)
                continue
            if self._stop.is_set() and retryable:
                return  # leave it uncommitted: the next run takes it again
            kind = "permanent failure" if not retryable else "retries exhausted"
            log.error("job failed", key=key, error=str(error))
            outputs = [self._dead_letter(item.ctx, f"{kind}: {error}", type(error).__name__)]
            break
        if self._pending.get(key) is item:
            del self._pending[key]
        self._commit(outputs)
        self._processed.mark(self.group_id, item.event.id)
        self.jobs_done += 1

    def _in_worker(self, item: _Pending) -> Sequence[OutRecord]:
        """Run the job in a thread; pause and keep polling meanwhile (no rebalance)."""
        result: list[Sequence[OutRecord]] = []
        failure: list[BaseException] = []

        def work() -> None:
            try:
                result.append(self._job(item.event, item.ctx))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the loop thread
                failure.append(exc)

        assignment = self._consumer.assignment()
        self._consumer.pause(assignment)
        self.busy.set()
        worker = threading.Thread(target=work, name="cdl-job", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                msg = self._consumer.poll(0.2)  # paused: serves the group, returns nothing
                if msg is not None:
                    self._take(msg)
                worker.join(0.05)
        finally:
            self.busy.clear()
            self._consumer.resume(self._consumer.assignment())
        if failure:
            raise failure[0]
        return result[0]

    def _commit(self, outputs: Sequence[OutRecord]) -> None:
        # never commit past an event that is still pending
        floor: dict[tuple[str, int], int] = {}
        for p in self._pending.values():
            k = (p.ctx.topic, p.ctx.partition)
            floor[k] = min(floor.get(k, p.ctx.offset), p.ctx.offset)
        offsets = [
            TopicPartition(tp.topic, tp.partition, min(tp.offset, floor.get((tp.topic, tp.partition), tp.offset)))
            for tp in self._positions()
        ]
        self._transact([*self._dead, *outputs], offsets)
        self._dead.clear()
