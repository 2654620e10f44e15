"""The monitor's two mends to faust's rebalance handling (services/monitor/offsets.py): where a
partition is sought to, and when the agents' queues are cleared. (On the real broker they are
exercised by tests/integration/test_monitor_replicas.py.)"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

from mode.utils.queues import FlowControlEvent, FlowControlQueue

from services.monitor.offsets import keep_fetched_on_resume, seek_to_committed


class TP(NamedTuple):
    topic: str
    partition: int


class _Consumer:
    """What seek_to_committed calls of an AIOKafkaConsumer, recorded."""

    def __init__(self, committed: dict[TP, int | None], beginning: dict[TP, int], end: dict[TP, int]) -> None:
        self._committed, self._beginning, self._end = committed, beginning, end
        self.seeks: dict[TP, int] = {}

    def assignment(self) -> set[TP]:
        return set(self._committed)

    async def committed(self, tp: TP) -> int | None:
        return self._committed[tp]

    def seek(self, tp: TP, offset: int) -> None:
        self.seeks[tp] = offset

    async def beginning_offsets(self, tps: list[TP]) -> dict[TP, int]:
        return {tp: self._beginning[tp] for tp in tps}

    async def end_offsets(self, tps: list[TP]) -> dict[TP, int]:
        return {tp: self._end[tp] for tp in tps}


def test_every_stream_partition_is_sought_to_its_committed_offset_zero_and_none_included() -> None:
    log0, log1, log2, route, changelog = (
        TP("log", 0),
        TP("log", 1),
        TP("log", 2),
        TP("route", 0),
        TP("m-served-changelog", 0),
    )
    committed: dict[TP, int | None] = {log0: 17, log1: 0, log2: None, route: None, changelog: None}
    consumer = _Consumer(committed, beginning={log2: 0, route: 5}, end={log2: 40, route: 9})

    def is_changelog(tp: Any) -> bool:
        return bool(tp.topic.endswith("-changelog"))

    got = asyncio.run(seek_to_committed(consumer, is_changelog, earliest=True))
    assert got == committed  # what faust sets its read offsets from, as aiokafka returns it
    # aiokafka's own skips 0 and None: the fetcher stayed past what faust dropped
    assert consumer.seeks == {log0: 17, log1: 0, log2: 0, route: 5}  # a changelog is recovery's

    # latest: a partition with no commit stays where the fetcher is (as aiokafka leaves it)
    consumer = _Consumer(committed, beginning={log2: 0, route: 5}, end={log2: 40, route: 9})
    asyncio.run(seek_to_committed(consumer, is_changelog, earliest=False))
    assert consumer.seeks == {log0: 17, log1: 0}


def test_a_failed_look_up_of_the_beginnings_leaves_those_partitions_and_the_rebalance_goes_on() -> None:
    class _NoLeader(_Consumer):
        async def beginning_offsets(self, tps: list[TP]) -> dict[TP, int]:
            raise TimeoutError("no leader for partition")

    log0, log1 = TP("log", 0), TP("log", 1)
    consumer = _NoLeader({log0: 3, log1: None}, beginning={}, end={})
    got = asyncio.run(seek_to_committed(consumer, lambda tp: False, earliest=True))
    assert got == {log0: 3, log1: None} and consumer.seeks == {log0: 3}


def test_the_queues_are_cleared_on_a_resume_after_a_suspension_only() -> None:
    async def scenario() -> None:
        flow = FlowControlEvent(initially_suspended=True)
        keep_fetched_on_resume(flow)
        queue: FlowControlQueue[int] = FlowControlQueue(flow_control=flow, clear_on_resume=True)
        queue.put_nowait(1)  # fetched before the rebalance
        flow.resume()
        assert queue.empty()  # read again from the committed offsets
        queue.put_nowait(2)  # fetched after the seek
        flow.resume()  # faust's recovery resumes a running flow again
        assert queue.qsize() == 1  # kept: nothing would fetch it again
        flow.suspend()
        flow.resume()
        assert queue.empty()

    asyncio.run(scenario())


def test_without_the_mend_a_second_resume_drops_what_was_fetched() -> None:
    """What mode does on its own (the reason for the mend; if this fails, mode changed)."""

    async def scenario() -> None:
        flow = FlowControlEvent(initially_suspended=True)
        queue: FlowControlQueue[int] = FlowControlQueue(flow_control=flow, clear_on_resume=True)
        flow.resume()
        queue.put_nowait(2)
        flow.resume()
        assert queue.empty()

    asyncio.run(scenario())
