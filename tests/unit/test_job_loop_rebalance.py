"""The job loop's partitions across a rebalance (pure: a recording consumer, no broker).

librdkafka keeps a partition's pause state across a rebalance. A job pauses the assignment while
it runs; when the job ends between the revoke and the next assignment, nothing was assigned to
resume, so the loop must set each newly assigned partition's state itself (a replica once stayed
paused for good that way: tests/integration/test_replicas.py).
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import TopicPartition

from cdl.kafka import JobLoop


class RecordingConsumer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.calls.append(("assign", [tp.partition for tp in partitions]))

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.calls.append(("pause", [tp.partition for tp in partitions]))

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.calls.append(("resume", [tp.partition for tp in partitions]))


def _loop() -> JobLoop:
    return JobLoop(
        bootstrap="127.0.0.1:1",  # never reached: no session runs
        group_id="g",
        topics=["t"],
        transactional_id="g-test",
        job=lambda event, ctx: [],
        key=lambda event: event.id,
    )


def test_assigned_partitions_consume_when_no_job_runs_and_stay_paused_while_one_does() -> None:
    loop = _loop()
    seen: list[Any] = []
    loop._on_assigned_hook = seen.append
    parts = [TopicPartition("t", 0), TopicPartition("t", 2)]
    idle = RecordingConsumer()
    loop._assigned_cb(idle, parts)
    # assigned first (the state is a partition's once assigned), then resumed: a pause left from
    # a job that ended during the rebalance does not survive it
    assert idle.calls == [("assign", [0, 2]), ("resume", [0, 2])]
    assert loop.assigned.is_set() and seen == [[("t", 0), ("t", 2)]]
    busy = RecordingConsumer()
    loop.busy.set()
    loop._assigned_cb(busy, parts)
    assert busy.calls == [("assign", [0, 2]), ("pause", [0, 2])]  # resumed when the job ends
    empty = RecordingConsumer()
    loop.busy.clear()
    loop._assigned_cb(empty, [])  # a standby: nothing to resume
    assert empty.calls == [("assign", [])]


def test_a_job_whose_partition_is_revoked_while_it_runs_is_marked_so_its_outputs_are_dropped() -> None:
    """The group may give a running job's partition to another member (which consumes the event
    again from the committed offset): the loop marks it, and drops the job's outputs instead of
    committing a second copy (tests/integration/test_replicas.py saw one committed twice)."""
    loop = _loop()
    loop._running = ("t", 1)
    loop._on_revoked([TopicPartition("t", 0)])
    assert not loop._running_revoked  # another partition went: the job's outputs commit
    loop._on_revoked([TopicPartition("t", 1), TopicPartition("t", 2)])
    assert loop._running_revoked


def test_a_running_job_s_partition_given_back_by_the_same_rebalance_keeps_its_outputs() -> None:
    """An eager rebalance revokes every partition and hands them out again: one that comes back to
    the member whose job runs on it was nobody else's meanwhile, so the job's outputs commit (a long
    training is not thrown away whenever a member joins); one that comes back only at a later
    rebalance may have been another member's in between, and stays dropped."""
    loop = _loop()
    loop._running = ("t", 1)
    loop._on_revoked([TopicPartition("t", 0), TopicPartition("t", 1)])
    loop._assigned_cb(RecordingConsumer(), [TopicPartition("t", 1)])
    assert not loop._running_revoked
    loop._on_revoked([TopicPartition("t", 1)])
    loop._assigned_cb(RecordingConsumer(), [TopicPartition("t", 0)])  # it went to another member
    loop._assigned_cb(RecordingConsumer(), [TopicPartition("t", 0), TopicPartition("t", 1)])  # and back
    assert loop._running_revoked
