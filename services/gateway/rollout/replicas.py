"""Several gateway instances: who writes each model's rollout, and answers awaited from the others
(pure logic; the Kafka transport is in ``app.py``).

Every instance routes every model; each model's rollout has one writer. The writer is the member
of the gateway's consumer group that holds the model's partition of ``model.compressed`` (and,
co-partitioned with it, of ``gateway.commands``): :class:`Ownership` tracks those partitions and
says which models they hold. Every cdl producer keys the model topics by model with librdkafka's
default partitioner (CRC32 of the key modulo the partition count, :func:`partition_of`), so every
instance computes the same owner from a model's name.

An admin call that changes a rollout, made on an instance that does not own the model, travels
to the owner as a command on ``gateway.commands`` and its result comes back on the same topic:
:class:`Replies` holds the callers' futures until then.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterable
from concurrent.futures import Future
from typing import Generic, TypeVar

from cdl.events import key_partition

__all__ = ["Ownership", "Replies", "partition_of"]

T = TypeVar("T")


def partition_of(model: str, partitions: int) -> int:
    """The partition a record keyed ``model`` goes to among ``partitions`` (librdkafka's default,
    ``consistent_random``: CRC32 of the key modulo the count)."""
    return key_partition(model, partitions)


class Ownership:
    """The partitions of the group's model-keyed topic this instance holds, and so its models."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: frozenset[int] = frozenset()
        self._count = 0

    def assign(self, partitions: Collection[int], count: int) -> None:
        """The group gave this instance ``partitions`` of a topic of ``count`` partitions (in
        addition to what it held: an incremental assignment adds)."""
        with self._lock:
            self._held = self._held | frozenset(partitions)
            self._count = count

    def revoke(self, partitions: Collection[int]) -> None:
        """``partitions`` went away (revoked or lost)."""
        with self._lock:
            self._held = self._held - frozenset(partitions)

    @property
    def partitions(self) -> frozenset[int]:
        return self._held

    def owns(self, model: str) -> bool:
        """Whether this instance writes ``model``'s rollout."""
        with self._lock:
            return self._count > 0 and partition_of(model, self._count) in self._held

    def owned(self, models: Iterable[str]) -> list[str]:
        """Those of ``models`` this instance writes."""
        return sorted(m for m in models if self.owns(m))


class Replies(Generic[T]):
    """Futures of calls answered elsewhere, by id: :meth:`expect` before sending, :meth:`resolve`
    when the answer is read, :meth:`forget` when the caller stopped waiting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, Future[T]] = {}

    def expect(self, call_id: str) -> Future[T]:
        fut: Future[T] = Future()
        with self._lock:
            if call_id in self._waiting:
                raise ValueError(f"call {call_id} is already awaited")
            self._waiting[call_id] = fut
        return fut

    def resolve(self, call_id: str, value: T) -> bool:
        """Hand ``value`` to the caller waiting for ``call_id``; False when none is (an answer to
        another instance, or to a caller that gave up)."""
        with self._lock:
            fut = self._waiting.pop(call_id, None)
        if fut is None or fut.done():
            return False
        fut.set_result(value)
        return True

    def forget(self, call_id: str) -> None:
        with self._lock:
            fut = self._waiting.pop(call_id, None)
        if fut is not None and not fut.done():
            fut.cancel()

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)
