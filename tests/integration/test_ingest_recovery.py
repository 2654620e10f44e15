"""Ingest's processor and its transactional loop, in this process, failing on purpose.

The real :class:`IngestProcessor` (C fast path, MinIO shards, manifests) under
the real :class:`TransactionalLoop`, with a failure injected once in the middle
of a batch after earlier flushes committed. The loop starts a new session and
restores the processor from the committed snapshot: every record is versioned
or dead-lettered exactly once.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import numpy as np
from confluent_kafka import Producer as KProducer

from cdl.datasets import DatasetSpec, Task, load_version
from cdl.events import InBatch, decode
from cdl.failure import FailurePolicy
from cdl.kafka import TransactionalLoop, read_latest
from cdl.kafka.security import secured
from cdl.store import ObjectStore
from services.ingest.processor import STATE_KEY, IngestProcessor
from services.ingest.registry import DatasetRegistry
from tests.helpers import read_committed


class _FailingOnce(IngestProcessor):
    """Raises in the middle of batch number ``fail_at`` (counted over the whole run), once."""

    def __init__(self, fail_at: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.fail_at = fail_at
        self.batches = 0

    def on_batch(self, batch: InBatch) -> None:
        self.batches += 1
        if self.batches == self.fail_at:
            super().on_batch(batch.select(np.arange(len(batch) // 2), batch.topic))  # half of it taken...
            raise RuntimeError("ingest crashed mid-batch")  # ...then a crash
        super().on_batch(batch)


def test_processor_failure_mid_batch_is_recovered_in_place_exactly_once(
    kafka_bootstrap: str, object_store: ObjectStore, topic_factory
) -> None:
    raw, dlq, updated, state = (
        topic_factory("rec-raw", partitions=2),
        topic_factory("rec-dlq"),
        topic_factory("rec-upd"),
        topic_factory("rec-state"),
    )
    name = f"rec-{uuid.uuid4().hex[:6]}"
    registry = DatasetRegistry(object_store)
    registry.register(
        DatasetSpec(
            name=name, task=Task.TABULAR, input_shape=(4,), labels=("a", "b"), min_new_records=400, max_interval_s=2.0
        )
    )
    total, bad_every = 3000, 50
    producer = KProducer(secured({"bootstrap.servers": kafka_bootstrap, "linger.ms": 10}))
    good_ids = []
    for i in range(total):
        if i % bad_every == 0:
            value = json.dumps({"dataset": name, "id": f"x{i}", "features": [1, 2, 3], "label": "a"})  # bad shape
        else:
            value = json.dumps({"dataset": name, "id": f"r{i}", "features": [i, 1, 2, 3], "label": "ab"[i % 2]})
            good_ids.append(f"r{i}")
        producer.produce(raw, value.encode(), partition=i % 2)
    producer.flush(30)
    bad = total // bad_every

    processor = _FailingOnce(
        fail_at=5,
        registry=registry,
        store=object_store,
        source="/cdl/test",
        state_topic=state,
        raw_topic=raw,
        deadletter_topic=dlq,
        updated_topic=updated,
        shard_max_records=300,
    )
    group = f"g-{uuid.uuid4().hex[:6]}"
    loop = TransactionalLoop(
        bootstrap=kafka_bootstrap,
        group_id=group,
        topics=[raw],
        transactional_id=f"tx-{group}",
        processor=processor,
        on_restore=lambda: processor.restore(read_latest(kafka_bootstrap, state, STATE_KEY)),
        flush_interval_s=0.3,
        batch_size=200,
        policy=FailurePolicy(backoff_s=0.05, transaction_retry_s=20),
    )
    runner = threading.Thread(target=loop.run, name="test-loop")
    runner.start()
    versions: list[Any] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            updates = read_committed(kafka_bootstrap, updated, expected=10**6, timeout_s=1)
            versions = [decode(r.key, r.value, list(r.headers.items())).payload for r in updates]
            if versions and versions[-1].total_records >= len(good_ids):
                break
            time.sleep(0.5)
    finally:
        loop.stop()
        runner.join(60)
        processor.close()
    assert loop.restarts == 1  # the injected failure ended one session; the next recovered
    numbers = [v.version for v in versions]
    assert numbers == list(range(1, len(numbers) + 1)), numbers  # each version once
    latest = load_version(object_store, name, numbers[-1])
    assert len(latest.ids) == len(set(latest.ids)) == len(good_ids)
    assert set(latest.ids) == set(good_ids)
    dead = read_committed(kafka_bootstrap, dlq, expected=bad, timeout_s=30)
    origins = [(d.headers["cdl-origin-partition"], d.headers["cdl-origin-offset"]) for d in dead]
    assert len(origins) == len(set(origins)) == bad
