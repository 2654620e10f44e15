"""The job loop: :class:`JobLoop` runs one long job per event (trainer, compressor) and commits
the job's outputs with the event's offset in one transaction."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer as _Consumer
from confluent_kafka import Message, TopicPartition

from cdl import tracing
from cdl.dedupe import MemoryProcessedStore, ProcessedStore
from cdl.errors import DecodeError
from cdl.events import Event, OutRecord, Topics, dead_letter, decode
from cdl.failure import DeadLetterReason, FailurePolicy, Verdict
from cdl.kafka.consumer import RecordContext, consumer_conf
from cdl.kafka.session import _consumer_error, _SessionLostError, _TransactionalBase
from cdl.liveness import WATCHDOG, LoopTracker
from cdl.logging import get_logger
from cdl.observability import EVENTS, HANDLER_SECONDS

__all__ = ["JobLoop"]

log = get_logger(__name__)


def _processed_key(event: Event) -> str:
    """What a consumer group remembers of a handled event: its type and id. Ids are unique per
    kind of event only (ingest's ``data.updated`` of version 1 and the trainer's ``model.trained``
    of version 1 are both ``<name>/v1``), and a group that reads both must handle both."""
    return f"{event.type} {event.id}"


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

    ``on_assigned`` and ``on_revoked`` are told of the partitions (topic, partition) the group
    gives and takes (revoked or lost, even in a failed session), in the loop's thread, before it
    consumes from them or after it stopped: a service whose instances split work by partition
    (the gateway's single writer per model) follows them. One that raises ends the session (a
    new one joins again).
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
        on_assigned: Callable[[list[tuple[str, int]]], None] | None = None,
        on_revoked: Callable[[list[tuple[str, int]]], None] | None = None,
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
        self._on_assigned_hook = on_assigned
        self._on_revoked_hook = on_revoked
        #: (topic, partition) of the event whose job runs, and whether the group took it meanwhile
        self._running: tuple[str, int] | None = None
        self._running_revoked = False
        self._reassign_pending = False  # the running job's partition was revoked; no assignment since
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
        if self._running in gone:  # so is the running job's event: its outputs must not commit...
            self._running_revoked = True
            self._reassign_pending = True
        self._pending = {k: p for k, p in self._pending.items() if (p.ctx.topic, p.ctx.partition) not in gone}
        self._dead = [(tp, rec) for tp, rec in self._dead if tp not in gone]

    def _assigned_cb(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # librdkafka keeps a partition's pause state across a rebalance: one paused for a job that
        # ended while the group rebalanced (between the revoke and this assignment, when there was
        # no assignment to resume) would stay paused for good. So each assigned partition's state
        # is set here, once assigned: paused while a job runs (until it ends), else consuming.
        consumer.assign(partitions)
        if self._reassign_pending:
            # ...unless the assignment that follows the revoke gives it back: an eager rebalance
            # takes every partition and hands them out again, and in between no other member held
            # it. Its offset goes back to the committed one, below the event: the commit never
            # passes it, and the event, consumed again, is skipped as processed (a job that took
            # minutes is not thrown away whenever a member joins or leaves)
            self._reassign_pending = False
            if self._running is not None and any((tp.topic, tp.partition) == self._running for tp in partitions):
                self._running_revoked = False
        if self.busy.is_set():
            consumer.pause(partitions)
        elif partitions:
            consumer.resume(partitions)
        if self._on_assigned_hook is not None:  # before the loop says it is assigned (readiness)
            self._on_assigned_hook([(tp.topic, tp.partition) for tp in partitions])
        super()._assigned_cb(consumer, partitions)

    def _revoked_cb(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        try:
            super()._revoked_cb(consumer, partitions)
        finally:  # revoked or lost: they are not this instance's any more, whatever the session's state
            if self._on_revoked_hook is not None:
                self._on_revoked_hook([(tp.topic, tp.partition) for tp in partitions])

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
        self._running, self._running_revoked = (item.ctx.topic, item.ctx.partition), False
        self._reassign_pending = False
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
        self._running = None
        if self._pending.get(key) is item:
            del self._pending[key]
        if self._running_revoked:
            # the group gave the event's partition to another member while the job ran (a
            # rebalance: a member joined or died): that member consumes the event again from the
            # committed offset, so these outputs would be a second copy. They are dropped (the
            # job's own effects are idempotent on their natural keys).
            EVENTS.labels(item.ctx.topic, self.group_id, "revoked").inc()
            log.warning("partition revoked while its job ran; its next owner handles the event", key=key)
            return
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
