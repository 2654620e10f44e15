"""What the transactional loops share: sessions, their failures, and one transaction that
publishes records together with consumer offsets.

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
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka import Producer as _Producer
from prometheus_client import Counter as PromCounter

from cdl.errors import UnavailableError
from cdl.events import OutRecord
from cdl.failure import DEFAULT_POLICY, FailurePolicy
from cdl.kafka.producer import _produce
from cdl.kafka.security import secured
from cdl.kafka.signals import _Stoppable
from cdl.liveness import WATCHDOG, LoopTracker
from cdl.logging import get_logger
from cdl.observability import count_consume_error

__all__ = ["FencedError"]

log = get_logger(__name__)

SESSIONS = PromCounter(
    "cdl_loop_sessions_restarted_total", "Loop sessions ended by a failure and started again in place", ["group"]
)
TXN_RETRIES = PromCounter("cdl_loop_transaction_retries_total", "Transactions tried again after a failure", ["group"])


class FencedError(UnavailableError):
    """Another instance with the same transactional id took over (repeatedly): this one must stop."""


class _SessionLostError(Exception):
    """The loop cannot go on with its consumer and producer: start a new session."""


def _consumer_error(err: KafkaError, group: str) -> None:
    """Log and count a consumer error (end-of-partition events are not errors)."""
    if err.code() == KafkaError._PARTITION_EOF:
        return
    count_consume_error(str(err.name()))
    log.warning("consumer error", error=str(err), group=group, fatal=err.fatal())
    if err.fatal():  # the consumer cannot go on: a new session makes a new one
        raise _SessionLostError(f"fatal consumer error: {err}")


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
        self._producer = _Producer(secured(self._pconf))
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
            self._producer = _Producer(secured(self._pconf))
            self._initialised = False
            self._consumer = self._make_consumer()

    def _assigned_cb(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.assigned.set()
        log.info("partitions assigned", partitions=[f"{tp.topic}[{tp.partition}]" for tp in partitions])
        self._on_assigned(partitions)

    def _on_assigned(self, partitions: list[TopicPartition]) -> None:
        """The group gave this member ``partitions`` (overridden by the loops)."""

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
                        _produce(self._producer, rec.topic, rec.value, rec.key, rec.headers, partition=rec.partition)
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
