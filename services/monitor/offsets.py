"""After a rebalance, every stream partition is read again from its committed offset -- also a
partition with no committed offset yet, or one committed at 0.

faust drops the records it fetched but had not handed to an agent when a rebalance starts, and
relies on seeking each partition to its committed offset afterwards to read them again
(``Consumer.perform_seek`` -> the aiokafka driver's ``seek_to_committed`` ->
``AIOKafkaConsumer.seek_to_committed``). aiokafka's seeks only ``if offset and offset > 0``: a
partition nobody has committed yet (a new group, or a member that took partitions over from one
killed before its first commit), or one committed at 0, keeps the fetcher's position, past the
records faust dropped. Seen with two monitors and one killed -9: a member taking over a route
partition read offset 0, then 3 (1 and 2 fetched, dropped at the rebalance, never read again),
so joins were lost. (faust-streaming 0.15.3, aiokafka 0.14.0.)

:func:`install` replaces the driver's ``seek_to_committed`` with one that seeks to the committed
offset whatever it is, and (with ``consumer_auto_offset_reset`` ``earliest``, the monitor's) a
stream partition with none to its beginning. Changelog partitions are left
as aiokafka leaves them: table recovery positions those itself. What it returns is what
aiokafka's returns (the committed offsets, None where there is none), so faust's read offsets
are set as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from cdl.logging import get_logger

__all__ = ["install", "keep_fetched_on_resume", "seek_to_committed"]

log = get_logger(__name__)


#: how long the look-up of where partitions with no commit begin may take (it runs inside
#: faust's recovery, whose own limit is longer)
LOOKUP_TIMEOUT_S = 10.0


async def seek_to_committed(
    consumer: Any, is_changelog: Callable[[Any], bool], earliest: bool
) -> Mapping[Any, int | None]:
    """Seek each assigned partition of ``consumer`` (an ``aiokafka.AIOKafkaConsumer``) to its
    committed offset (0 included); with ``earliest``, a stream partition without one to its
    beginning; changelog partitions (``is_changelog``) only when they have one. Returns the
    committed offsets. Where the beginnings cannot be looked up (a partition without a leader,
    within :data:`LOOKUP_TIMEOUT_S`), those partitions stay where they are, as aiokafka leaves
    them, and it is logged: the rebalance goes on."""
    committed: dict[Any, int | None] = {}
    unset = []
    for tp in consumer.assignment():
        offset = await consumer.committed(tp)
        committed[tp] = offset
        if offset is not None and offset >= 0:
            consumer.seek(tp, offset)
        elif earliest and not is_changelog(tp):  # (latest: where the fetcher is, as aiokafka does)
            unset.append(tp)
    if unset:
        # (a request of its own: aiokafka's seek_to_beginning waits on the fetcher, which does
        # not reset a partition faust has paused, as it has them all in a rebalance)
        try:
            begins = await asyncio.wait_for(consumer.beginning_offsets(unset), LOOKUP_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure: the partitions stay as aiokafka left them
            log.warning(
                "partitions with no commit not sought to their beginning", partitions=len(unset), error=repr(exc)
            )
            return committed
        for tp, offset in begins.items():
            consumer.seek(tp, offset)
    return committed


async def _driver_seek_to_committed(self: Any) -> Mapping[TP, int | None]:
    consumer = self._ensure_consumer()
    earliest = str(self.app.conf.consumer_auto_offset_reset) == "earliest"
    result: Mapping[TP, int | None] = await self.call_thread(
        seek_to_committed, consumer, self.consumer._is_changelog_tp, earliest
    )
    return result


def keep_fetched_on_resume(flow_control: Any) -> None:
    """Make ``flow_control`` (an app's ``mode.utils.queues.FlowControlEvent``) clear the agents'
    queues when it resumes after a suspension only, not on every ``resume()``.

    A rebalance suspends the flow and clears the queues (what was fetched before it is read again
    from the committed offsets). faust's recovery then resumes the flow more than once: with the
    stream partitions resumed and the flow already running, it seeks to the committed offsets
    and calls ``resume()`` again, which cleared records fetched meanwhile -- past the seek, so
    never fetched again (seen: a member that kept a route partition read 21 to 23 after a
    rebalance, then 30). Kept, they are handled; one fetched twice (before and after the seek)
    is handled twice, which at-least-once allows.
    """
    clear = flow_control.clear

    def resume() -> None:
        suspended = not flow_control.is_active()
        flow_control._suspend.clear()
        flow_control._resume.set()
        if suspended:
            clear()

    flow_control.resume = resume


def install() -> None:
    """Use :func:`seek_to_committed` in faust's aiokafka driver (idempotent)."""
    faust_aiokafka.AIOKafkaConsumerThread.seek_to_committed = _driver_seek_to_committed  # type: ignore[method-assign,assignment]
