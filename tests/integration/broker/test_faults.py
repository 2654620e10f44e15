"""Faults from outside, as an operator meets them: the broker killed (-9) and restarted, the
ingest service killed (-9) and restarted, the broker stopped cleanly and restarted — while a
plain Kafka client streams valid and malformed records into ``data.raw`` and the trainer and
compressor run behind ingest. Afterwards: records in = versioned + dead-lettered, each exactly
once; every dataset version and every model version published once.

Everything is read back ``read_committed``, as cdl's own consumers read.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from typing import Any

import numpy as np
from confluent_kafka import Producer as KProducer
from sklearn.datasets import load_digits

from cdl.datasets import load_version
from cdl.events import decode
from cdl.kafka.security import secured
from cdl.store import ObjectStore
from cdl.v1 import events_pb2
from tests.helpers import Rec, read_committed, register_digits, restart_broker

DIGITS = load_digits()


def _record(name: str, i: int) -> bytes:
    k = i % len(DIGITS.target)
    doc = {"dataset": name, "id": f"r{i}", "features": DIGITS.data[k].tolist(), "label": int(DIGITS.target[k])}
    return json.dumps(doc).encode()


def _payloads(recs: list[Rec]) -> list[Any]:
    return [decode(r.key, r.value, list(r.headers.items())).payload for r in recs]


def test_broker_and_ingest_faults_lose_nothing_and_duplicate_nothing(
    stack: dict[str, Any],
    kafka_bootstrap: str,
    object_store: ObjectStore,
    ingest_factory: Any,
    ingest_topics: dict[str, str],
    trainer_factory: Any,
    trainer_topics: dict[str, str],
    compressor_factory: Any,
    compressor_topics: dict[str, str],
) -> None:
    ingest_settings = {"shard_max_records": "1500", "batch_size": "500", "flush_interval_s": "0.5"}
    svc = ingest_factory(**ingest_settings).start()
    trainer_factory(updated_topic=ingest_topics["updated"], max_epochs="2").start()
    compressor_factory(trained_topic=trainer_topics["trained"]).start()
    name = f"faults-{uuid.uuid4().hex[:6]}"
    with svc.channel() as ch:
        register_digits(ch, name, min_new_records=2000, max_interval_s=4.0)

    # a plain client, as kcat would be: it waits out the broker's absence (idempotent, long timeout)
    producer = KProducer(
        secured({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "message.timeout.ms": 300000})
    )
    failed: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            failed.append(str(err))

    chunks, per_chunk, bad_per_chunk = 6, 1000, 20
    rng = np.random.default_rng(7)
    i = 0
    for chunk in range(chunks):
        bad_at = set(rng.choice(per_chunk, bad_per_chunk, replace=False).tolist())
        for j in range(per_chunk + bad_per_chunk):
            if j in bad_at:  # malformed: not JSON, or the wrong shape
                value = b'{"dataset": "' + name.encode() + b'", "id": "bad' if j % 2 else _record(name, 10**6 + i)[:-40]
                producer.produce(ingest_topics["raw"], value, on_delivery=delivered)
            else:
                producer.produce(ingest_topics["raw"], _record(name, i), on_delivery=delivered)
                i += 1
            producer.poll(0)
        if chunk == 1:
            restart_broker(stack, signal.SIGKILL)
        elif chunk == 2:
            svc.kill()
            svc = ingest_factory(**ingest_settings).start(timeout_s=120)
        elif chunk == 3:
            restart_broker(stack, signal.SIGTERM)
    assert producer.flush(120) == 0 and not failed, failed
    good, bad = chunks * per_chunk, chunks * bad_per_chunk

    # every valid record ends in a version (the time policy versions the last ones)
    deadline = time.monotonic() + 240
    latest = 0
    while time.monotonic() < deadline:
        updates = _payloads(read_committed(kafka_bootstrap, ingest_topics["updated"], expected=10**6, timeout_s=2))
        if updates and updates[-1].total_records >= good:
            latest = updates[-1].version
            break
        time.sleep(1)
    numbers = [u.version for u in updates]
    assert numbers == list(range(1, len(numbers) + 1)), numbers  # each version once, in order
    assert updates[-1].total_records == good, (updates[-1].total_records, good)
    ids = load_version(object_store, name, latest).ids
    assert len(ids) == len(set(ids)) == good  # no record lost, none twice
    assert set(ids) == {f"r{k}" for k in range(good)}

    dead = read_committed(kafka_bootstrap, ingest_topics["deadletter"], expected=bad, timeout_s=60)
    origins = [(d.headers["cdl-origin-partition"], d.headers["cdl-origin-offset"]) for d in dead]
    assert len(origins) == len(set(origins)) == bad  # each malformed record dead-lettered once

    # the trainer and compressor went on: each model version published once, each compressed once
    deadline = time.monotonic() + 300
    trained: list[Any] = []
    compressed: list[Any] = []
    while time.monotonic() < deadline:
        trained = _payloads(read_committed(kafka_bootstrap, trainer_topics["trained"], 10**6, timeout_s=2))
        compressed = _payloads(read_committed(kafka_bootstrap, compressor_topics["compressed"], 10**6, timeout_s=2))
        accepted = [t for t in trained if t.verdict == events_pb2.VERDICT_ACCEPTED]
        if trained and trained[-1].lineage.dataset_version == latest and len(compressed) >= len(accepted):
            break
        time.sleep(2)
    versions = [t.version for t in trained]
    assert versions and versions == sorted(set(versions)), versions  # no model version twice
    assert trained[-1].lineage.dataset_version == latest
    done = [(c.model, c.version) for c in compressed]
    assert len(done) == len(set(done)) == len([t for t in trained if t.verdict == events_pb2.VERDICT_ACCEPTED]), done
