"""Kafka transport: an idempotent producer and the two exactly-once loops.

- :class:`TransactionalLoop` consumes a stream in batches and publishes, every
  flush, what its processor returns together with the consumed offsets in one
  Kafka transaction (ingest).
- :class:`JobLoop` runs one long job per event (trainer, compressor) and
  commits the job's outputs with the event's offset in one transaction.

Failures follow one policy (:mod:`cdl.failure`). A transaction that fails is
retried in place with the same records and offsets (they are still exactly
what the loop's in-memory state accounts for); one that cannot be committed
— the broker stays away, the producer is fenced, the group took the
partitions away — ends the loop's *session*: the consumer is closed without
committing anything, a new consumer and producer are made, the transactional
id is initialised again (which aborts or completes whatever the broker still
holds open) and the loop's state is rebuilt from what Kafka committed
(``on_restore``), then it goes on from the committed offsets. No offset is
ever committed past a record whose effects were not committed with it: the
revoke hook that commits on a rebalance is disarmed before a failed session's
consumer is closed. See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Generic, Protocol, TypeVar, cast

from confluent_kafka import Consumer as _Consumer
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka import Producer as _Producer
from prometheus_client import Counter as PromCounter

from cdl import tracing
from cdl.dedupe import MemoryProcessedStore, ProcessedStore
from cdl.errors import DecodeError, NotFoundError, UnavailableError
from cdl.events import Event, Headers, InBatch, OutRecord, Topics, dead_letter, decode, encode
from cdl.failure import DEFAULT_POLICY, DeadLetterReason, FailurePolicy, Verdict
from cdl.kafka_native import NativeConsumer
from cdl.kafka_native import available as native_available
from cdl.liveness import WATCHDOG, LoopTracker
from cdl.logging import get_logger
from cdl.observability import EVENTS, HANDLER_SECONDS, count_consume_error

__all__ = [
    "BatchProcessor",
    "FencedError",
    "JobLoop",
    "Producer",
    "RecordContext",
    "TransactionalLoop",
    "consumer_conf",
    "ensure_topics",
    "read_latest",
    "topic_partitions",
]

log = get_logger(__name__)

SESSIONS = PromCounter(
    "cdl_loop_sessions_restarted_total", "Loop sessions ended by a failure and started again in place", ["group"]
)
TXN_RETRIES = PromCounter("cdl_loop_transaction_retries_total", "Transactions tried again after a failure", ["group"])


class FencedError(UnavailableError):
    """Another instance with the same transactional id took over (repeatedly): this one must stop."""


class _SessionLostError(Exception):
    """The loop cannot go on with its consumer and producer: start a new session."""


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


def topic_partitions(bootstrap: str, topic: str, timeout_s: float = 10.0) -> int:
    """How many partitions ``topic`` has (:class:`NotFoundError` when it does not exist)."""
    from confluent_kafka.admin import AdminClient

    meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic=topic, timeout=timeout_s)
    found = meta.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise NotFoundError("topic not found", topic=topic)
    return len(found.partitions)


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


def _processed_key(event: Event) -> str:
    """What a consumer group remembers of a handled event: its type and id. Ids are unique per
    kind of event only (ingest's ``data.updated`` of version 1 and the trainer's ``model.trained``
    of version 1 are both ``<name>/v1``), and a group that reads both must handle both."""
    return f"{event.type} {event.id}"


def _consumer_error(err: KafkaError, group: str) -> None:
    """Log and count a consumer error (end-of-partition events are not errors)."""
    if err.code() == KafkaError._PARTITION_EOF:
        return
    count_consume_error(str(err.name()))
    log.warning("consumer error", error=str(err), group=group, fatal=err.fatal())
    if err.fatal():  # the consumer cannot go on: a new session makes a new one
        raise _SessionLostError(f"fatal consumer error: {err}")


class BatchProcessor(Protocol):
    """What :class:`TransactionalLoop` drives (see ``services/ingest/processor.py``)."""

    def on_batch(self, batch: InBatch) -> None: ...

    def wants_flush(self) -> bool: ...

    def flush(self, now: float | None = None) -> list[OutRecord]: ...


class _GroupConsumer(Protocol):
    """What a session needs of a consumer (confluent-kafka's, or :class:`NativeConsumer`)."""

    def subscribe(
        self,
        topics: list[str],
        on_assign: Callable[[Any, list[TopicPartition]], None] = ...,
        on_revoke: Callable[[Any, list[TopicPartition]], None] = ...,
    ) -> None: ...

    def assignment(self) -> list[TopicPartition]: ...

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]: ...

    def consumer_group_metadata(self) -> Any: ...

    def close(self) -> None: ...


_C = TypeVar("_C", bound=_GroupConsumer)

#: producer errors that mean another producer with our transactional id took over
_FENCED_CODES = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH})
#: offset-commit errors that mean this member's generation is over (its partitions were lost)
_GROUP_GONE_CODES = frozenset(
    {KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID, KafkaError.FENCED_INSTANCE_ID}
)


def _kafka_error(exc: BaseException) -> KafkaError | None:
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return err if isinstance(err, KafkaError) else None


class _TransactionalBase(_Stoppable, Generic[_C]):
    """What the transactional loops share: sessions (a read_committed consumer without
    auto commit and a transactional producer), stop/signal handling, and one
    transaction that publishes records together with consumer offsets.

    A session starts with :meth:`init` (fence older instances, abort what they
    left open), then ``on_restore`` (rebuild in-memory state from what Kafka
    committed), then subscribes. A failure that the session cannot get past
    ends it and :meth:`run` starts a new one after a backoff; see the module
    docstring.
    """

    #: fenced this many times within ``_FENCE_WINDOW_S``: another live instance owns the id
    _FENCE_LIMIT, _FENCE_WINDOW_S = 3, 600.0

    def __init__(
        self,
        *,
        make_consumer: Callable[[], _C],
        bootstrap: str,
        group_id: str,
        topics: Sequence[str],
        transactional_id: str,
        producer_config: dict[str, Any] | None = None,
        policy: FailurePolicy | None = None,
        on_restore: Callable[[], None] | None = None,
    ) -> None:
        self._make_consumer = make_consumer
        self._pconf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "transactional.id": transactional_id,
            "linger.ms": 5,
            "compression.type": "lz4",
            # well above the policy's transaction_retry_s (60 s), so a transaction retried through
            # an outage is never timed out (and its producer fenced) by the coordinator meanwhile
            "transaction.timeout.ms": 180000,
            **(producer_config or {}),
        }
        self._consumer = make_consumer()
        self._producer = _Producer(self._pconf)
        self._policy = policy or DEFAULT_POLICY
        self._on_restore = on_restore
        self.group_id = group_id
        self._topics = list(topics)
        self._stop = threading.Event()
        self._initialised = False
        #: rebalance hooks may commit only while the session is healthy
        self._armed = False
        self._fenced_at: list[float] = []
        self._troubled = False
        #: set while the group has given this loop its partitions
        self.assigned = threading.Event()
        #: sessions ended by a failure and started again
        self.restarts = 0
        self.transactions = 0
        #: what the watchdog sees of this loop while it runs (cdl.liveness)
        self._live: LoopTracker | None = None

    # ------------------------------------------------------------------ liveness
    @property
    def _rebalance_s(self) -> float:
        """What a consume (or a close) may take beyond its own timeout: a rebalance callback runs
        inside it and may flush the processor (bounded by the progress deadline) and commit a
        transaction (retried for ``transaction_retry_s``, each call with its grace, backoff between)."""
        p = self._policy
        return p.progress_deadline_s + p.transaction_retry_s + p.max_backoff_s + 4 * p.call_grace_s

    @contextlib.contextmanager
    def _step(self, what: str, timeout_s: float = 0.0, extra_s: float = 0.0) -> Iterator[None]:
        """A call that can block: it must return within its own ``timeout_s``, the policy's
        grace and ``extra_s`` (what may run inside it, e.g. a rebalance callback's commit),
        or the watchdog declares the loop stuck (cdl.liveness)."""
        if self._live is None:
            yield
            return
        with self._live.step(what, timeout_s + self._policy.call_grace_s + extra_s):
            yield

    # ------------------------------------------------------------------ sessions
    def init(self) -> None:
        """Fence older instances with the same transactional id and abort their open transaction.

        Waits (with the policy's backoff) while the broker cannot be reached.
        """
        attempt = 0
        while not self._initialised:
            try:
                with self._step("init_transactions", 30):
                    self._producer.init_transactions(30)
                self._initialised = True
            except KafkaException as exc:
                err = _kafka_error(exc)
                if err is not None and err.fatal():
                    raise self._lost("initialising transactions failed", exc) from exc
                attempt += 1
                if self._stop.is_set():
                    raise UnavailableError("stopped while initialising transactions", error=str(exc)) from exc
                log.warning("initialising transactions failed, retrying", group=self.group_id, error=str(exc))
                self._stop.wait(self._policy.delay(attempt))

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Run sessions until stopped (or ``until()``); a failed session is followed by a new one."""
        self._live = WATCHDOG.track(self.group_id, self._policy.progress_deadline_s)
        try:
            self._run(until)
        finally:
            WATCHDOG.untrack(self._live)
            self._live = None

    def _run(self, until: Callable[[], bool] | None) -> None:
        failures = 0
        while True:
            done_before = self.transactions
            try:
                self.init()
                if self._on_restore is not None:
                    with self._step("restore", self._policy.restore_deadline_s):
                        self._on_restore()
                self._armed = True
                self._consumer.subscribe(self._topics, on_assign=self._assigned_cb, on_revoke=self._revoked_cb)
                self._serve(until)
                self._close()
                return
            except FencedError:
                self._abandon(rebuild=False)
                raise
            except Exception as exc:  # noqa: BLE001 - any failure ends the session; a new one recovers
                stopping = self._stop.is_set() or (until is not None and until())
                self._abandon(rebuild=not stopping)
                if stopping:
                    log.warning("stopped after a failure; what was not committed is consumed again", error=str(exc))
                    return
                failures = 1 if self.transactions > done_before else failures + 1
                delay = self._policy.delay(failures)
                self.restarts += 1
                SESSIONS.labels(self.group_id).inc()
                log.error(
                    "loop session failed; starting a new one from what Kafka committed",
                    group=self.group_id,
                    error=f"{type(exc).__name__}: {exc}",
                    attempt=failures,
                    delay_s=delay,
                )
                self._stop.wait(delay)

    def _serve(self, until: Callable[[], bool] | None) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        """A session's orderly end (stopped or ``until``)."""
        with self._step("close consumer", 10, self._rebalance_s):  # its revoke hook commits
            self._consumer.close()
        self._armed = False
        with self._step("flush", 10):
            self._producer.flush(10)

    def _reset_session(self) -> None:
        """Forget what the failed session held in memory (overridden by the loops)."""

    def _abandon(self, rebuild: bool) -> None:
        """End a failed session without committing anything; with ``rebuild``, make new clients."""
        self._armed = False  # first: closing the consumer runs the revoke hook
        self.assigned.clear()
        try:
            with self._step("close consumer", 10):
                self._consumer.close()
        except Exception as exc:  # noqa: BLE001 - the session is over either way
            log.warning("closing the consumer of a failed session", error=str(exc))
        try:  # what the old producer still holds is aborted by the next init_transactions
            with self._step("purge"):
                self._producer.purge()
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("purging the producer of a failed session", error=str(exc))
        self._reset_session()
        if rebuild:
            self._producer = _Producer(self._pconf)
            self._initialised = False
            self._consumer = self._make_consumer()

    def _assigned_cb(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.assigned.set()
        log.info("partitions assigned", partitions=[f"{tp.topic}[{tp.partition}]" for tp in partitions])

    def _revoked_cb(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.assigned.clear()
        if self._armed:
            try:
                self._on_revoked(partitions)
            except BaseException:
                self._armed = False  # the session is failing: nothing more may commit
                raise

    def _on_revoked(self, partitions: list[TopicPartition]) -> None:
        """Partitions are about to go to another member (overridden by the loops)."""

    # ------------------------------------------------------------------ transactions
    def _positions(self) -> list[TopicPartition]:
        assignment = self._consumer.assignment()
        return [tp for tp in self._consumer.position(assignment) if tp.offset >= 0] if assignment else []

    def _lost(self, what: str, exc: BaseException, troubled: bool = False) -> Exception:
        """The exception that ends this session (a :class:`FencedError` when fenced too often).

        A fence that follows failed tries of the same transaction (``troubled``) is the
        coordinator timing the transaction out during an outage, not another instance:
        it is not counted.
        """
        err = _kafka_error(exc)
        if err is not None and err.code() in _FENCED_CODES and not troubled:
            now = time.monotonic()
            self._fenced_at = [t for t in self._fenced_at if now - t < self._FENCE_WINDOW_S] + [now]
            if len(self._fenced_at) >= self._FENCE_LIMIT:
                return FencedError(
                    "fenced repeatedly: another instance uses this transactional id", group=self.group_id
                )
        return _SessionLostError(f"{what}: {exc}")

    def _retrying(self, what: str, call: Callable[[float], None], deadline: float) -> None:
        """``call(timeout)`` again while it fails with a retriable error (its outcome was unknown);
        each try's timeout ends at ``deadline`` at the latest."""
        attempt = 0
        while True:
            try:
                timeout = max(1.0, min(30.0, deadline - time.monotonic()))
                with self._step(what, timeout):
                    call(timeout)
                return
            except KafkaException as exc:
                err = _kafka_error(exc)
                if (
                    err is None
                    or err.code() in _GROUP_GONE_CODES
                    or not err.retriable()
                    or err.fatal()
                    or err.txn_requires_abort()
                    or time.monotonic() > deadline
                    or self._stop.is_set()
                ):
                    raise
                attempt += 1
                self._troubled = True
                TXN_RETRIES.labels(self.group_id).inc()
                log.warning("transaction step failed, retrying", group=self.group_id, error=str(err))
                self._stop.wait(self._policy.delay(attempt))

    def _transact(self, records: Sequence[OutRecord], offsets: Sequence[TopicPartition]) -> None:
        """Publish ``records`` and commit ``offsets`` atomically.

        Retried in place (the same records and offsets) while the failure is
        one Kafka lets a transaction recover from and the policy's
        ``transaction_retry_s`` has not run out; otherwise the session ends.
        """
        deadline = time.monotonic() + self._policy.transaction_retry_s
        attempt = 0
        self._troubled = False
        while True:
            try:
                with self._step("begin_transaction"):
                    self._producer.begin_transaction()
                # a full queue waits for deliveries, which the transaction's retry time bounds
                with self._step("produce", self._policy.transaction_retry_s):
                    for rec in records:
                        _produce(self._producer, rec.topic, rec.value, rec.key, rec.headers)
                if offsets:
                    metadata = self._consumer.consumer_group_metadata()
                    send = functools.partial(self._producer.send_offsets_to_transaction, list(offsets), metadata)
                    self._retrying("send_offsets_to_transaction", send, deadline)
                self._retrying("commit_transaction", self._producer.commit_transaction, deadline)
                self.transactions += 1  # (the commit step's end was this loop's progress)
                return
            except KafkaException as exc:
                err = _kafka_error(exc)
                if (
                    err is None
                    or err.code() in _GROUP_GONE_CODES  # the group moved on: these offsets can never commit
                    or not err.txn_requires_abort()
                    or time.monotonic() > deadline
                    or self._stop.is_set()
                ):
                    raise self._lost("transaction failed", exc, self._troubled) from exc
                attempt += 1
                self._troubled = True
                TXN_RETRIES.labels(self.group_id).inc()
                log.warning("transaction aborted, trying it again", group=self.group_id, error=str(err))
                try:
                    self._retrying("abort_transaction", self._producer.abort_transaction, deadline)
                except KafkaException as abort_exc:
                    raise self._lost("aborting a transaction failed", abort_exc, True) from abort_exc
                self._stop.wait(self._policy.delay(attempt))


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

    def _serve(self, until: Callable[[], bool] | None) -> None:
        last_flush = time.monotonic()
        while not self._stop.is_set() and not (until is not None and until()):
            # a short wait: consume() holds a partial batch until the timeout
            with self._step("consume", 0.05, self._rebalance_s):
                n, batches = self._consumer.consume_batches(self._batch_size, 0.05)
            for batch in batches:
                batch.caught_up = n < self._batch_size
                self._processor.on_batch(batch)
            if self._processor.wants_flush() or time.monotonic() - last_flush >= self._flush_interval_s:
                self.commit()
                last_flush = time.monotonic()
        self.commit()

    def _reset_session(self) -> None:
        self._last_positions = {}

    def _on_revoked(self, partitions: list[TopicPartition]) -> None:
        self.commit()  # what was consumed from them, while they are still ours

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
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"cdl-reader-{os.getpid()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "auto.offset.reset": "error",
        }
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
    committed in one transaction. A job that fails is tried again or
    dead-lettered as the failure policy says (:mod:`cdl.failure`); undecodable
    events are dead-lettered in the same transaction as the next commit.

    When a session fails, what it had consumed but not committed is consumed
    again by the next one, so a job may run twice: jobs are idempotent on
    their natural keys (a dataset version claims one model version), and the
    processed-id store skips events whose outputs were committed.
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
        policy: FailurePolicy | None = None,
        processed: ProcessedStore | None = None,
    ) -> None:
        conf = consumer_conf(bootstrap, group_id)
        super().__init__(
            make_consumer=lambda: _Consumer(conf),
            bootstrap=bootstrap,
            group_id=group_id,
            topics=topics,
            transactional_id=transactional_id,
            policy=policy,
        )
        self._processed = processed or MemoryProcessedStore()
        self._job = job
        self._key = key
        self._deadletter = deadletter_topic
        self._pending: dict[str, _Pending] = {}
        #: dead letters waiting for the next commit, with the partition they came from
        self._dead: list[tuple[tuple[str, int], OutRecord]] = []
        self.busy = threading.Event()
        self.jobs_done = 0
        self.coalesced = 0

    def _serve(self, until: Callable[[], bool] | None) -> None:
        while not self._stop.is_set() and not (until is not None and until()):
            # librdkafka's consume(n, t) waits the whole t unless n messages came: wait for the
            # first one only, then take what else has been fetched (an event starts at once)
            with self._step("consume", 0.3, self._rebalance_s):
                msgs = self._consumer.consume(1, 0.3)
                if msgs:
                    msgs += self._consumer.consume(99, 0)
            for msg in msgs:
                self._take(msg)
            if self._pending:
                self._run_one()
            elif self._dead:
                self._commit([])

    def _reset_session(self) -> None:
        self._pending.clear()
        self._dead.clear()

    def _on_revoked(self, partitions: list[TopicPartition]) -> None:
        # what came from them is consumed again by their next owner (offsets were not committed)
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._pending = {k: p for k, p in self._pending.items() if (p.ctx.topic, p.ctx.partition) not in gone}
        self._dead = [(tp, rec) for tp, rec in self._dead if tp not in gone]

    def _assigned_cb(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        super()._assigned_cb(consumer, partitions)
        if self.busy.is_set():  # assigned while a job runs: keep them paused until it ends
            self._consumer.pause(partitions)

    def _take(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            _consumer_error(err, self.group_id)
            return
        ctx = RecordContext.of(msg)
        try:
            event = decode(ctx.key, ctx.value, ctx.headers)
        except DecodeError as exc:
            reason = f"{DeadLetterReason.UNDECODABLE}: {exc}"
            self._dead.append(((ctx.topic, ctx.partition), self._dead_letter(ctx, reason, type(exc).__name__)))
            return
        if self._processed.seen(self.group_id, _processed_key(event)):
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
            attempt += 1
            try:
                with HANDLER_SECONDS.labels(self.group_id).time():
                    outputs = list(self._in_worker(item))
                EVENTS.labels(item.ctx.topic, self.group_id, "handled").inc()
                break
            except _SessionLostError:
                raise
            except Exception as exc:  # noqa: BLE001 - the policy decides
                if self._stop.is_set():
                    return  # left uncommitted: the next run takes it again
                verdict, reason = self._policy.verdict(exc, attempt)
                if verdict is Verdict.RETRY:
                    delay = self._policy.delay(attempt)
                    EVENTS.labels(item.ctx.topic, self.group_id, "retried").inc()
                    log.warning("job failed, retrying", key=key, attempt=attempt, delay_s=delay, error=str(exc))
                    self._stop.wait(delay)
                    continue
                log.error("job failed", key=key, attempt=attempt, reason=str(reason), error=str(exc))
                outputs = [self._dead_letter(item.ctx, f"{reason}: {exc}", type(exc).__name__)]
                break
        if self._pending.get(key) is item:
            del self._pending[key]
        self._commit(outputs)
        self._processed.mark(self.group_id, _processed_key(item.event))
        self.jobs_done += 1

    def _in_worker(self, item: _Pending) -> Sequence[OutRecord]:
        """Run the job in a thread; pause and keep polling meanwhile (no rebalance)."""
        result: list[Sequence[OutRecord]] = []
        failure: list[BaseException] = []

        def work() -> None:
            ev, ctx = item.event, item.ctx
            attributes = {
                "cdl.event.id": ev.id,
                "cdl.event.type": ev.type,
                "messaging.destination": ctx.topic,
                "messaging.kafka.partition": ctx.partition,
                "messaging.kafka.offset": ctx.offset,
                **{f"cdl.{k}": v for k in ("model", "dataset", "version") if (v := getattr(ev.payload, k, None))},
            }
            try:
                bound = (
                    job_live.step(f"job {ev.type}", self._policy.job_deadline_s)
                    if job_live is not None
                    else contextlib.nullcontext()
                )
                with bound, tracing.span(f"{self.group_id} {ev.type}", ev.traceparent, attributes):
                    result.append(self._job(ev, ctx))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the loop thread
                failure.append(exc)

        # the job is a thread of control of its own: its deadline is the policy's job_deadline_s
        job_live: LoopTracker | None = None
        worker = threading.Thread(target=work, name="cdl-job", daemon=True)
        try:
            if self._live is not None:
                job_live = WATCHDOG.track(f"{self.group_id}/job", self._policy.job_deadline_s)
            self._consumer.pause(self._consumer.assignment())
            self.busy.set()
            worker.start()
            while worker.is_alive():
                with self._step("poll", 0.2, self._rebalance_s):
                    msg = self._consumer.poll(0.2)  # paused: serves the group, returns nothing
                if msg is not None:
                    self._take(msg)
                worker.join(0.05)
        except BaseException as exc:
            # the session cannot go on; the job must not run twice at once: wait for it first
            if worker.is_alive():
                with self._step("wait for the job", self._policy.job_deadline_s):
                    worker.join()
            raise _SessionLostError(f"consuming during a job failed: {exc}") from exc
        finally:
            if job_live is not None:
                WATCHDOG.untrack(job_live)
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
        self._transact([*(rec for _, rec in self._dead), *outputs], offsets)
        self._dead.clear()
