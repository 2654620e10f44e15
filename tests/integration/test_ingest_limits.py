"""Hostile records against the ingest service (real Kafka and MinIO): each is dead-lettered
with its reason, the records around it are versioned, the service's memory stays bounded
and the stream goes on."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer as KProducer

from cdl.datasets import load_version
from cdl.kafka.security import secured
from cdl.store import ObjectStore
from cdl.v1 import ingest_pb2
from tests.helpers import read_topic
from tests.integration.test_ingest import _json, _register, _updates


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(rest.split()[0])
    return fields


def test_oversized_records_in_a_large_batch_are_dead_lettered_in_bounded_memory(
    ingest_factory: Any, ingest_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    svc = ingest_factory().start()
    assert svc.proc is not None
    tab, txt = f"lim-{uuid.uuid4().hex[:6]}", f"limtxt-{uuid.uuid4().hex[:6]}"
    good = 8000
    _register(svc, tab, min_new_records=good)
    _register(svc, txt, task=ingest_pb2.TASK_TEXT_CLASSIFICATION, min_new_records=2)
    before = _memory_kib(svc.proc.pid)
    bad = {
        "id_too_long": _json(tab, "i" * 50_000, [1, 2, 3, 4], "a"),
        # 3 MiB of features: compressed by the producer, so that the broker takes it
        "record_too_large": b'{"dataset":"%s","id":"big","features":[' % tab.encode() + b"1," * 1_500_000 + b"1]}",
        "text_too_long": json.dumps({"dataset": txt, "id": "t-long", "text": "word " * 20_000, "label": "a"}).encode(),
        "label_too_long": _json(tab, "l1", [1, 2, 3, 4], "x" * 5000),
    }
    producer = KProducer(
        secured({"bootstrap.servers": kafka_bootstrap, "compression.type": "lz4", "message.max.bytes": 16 << 20})
    )
    # one partition, so that the hostile records sit among thousands of good ones in one batch
    order = list(bad.values())
    for i in range(good):
        producer.produce(ingest_topics["raw"], _json(tab, f"g{i}", [i, 0.5, -1, 2], "abc"[i % 3]), key=b"k")
        if i % 2000 == 1000:
            producer.produce(ingest_topics["raw"], order.pop(0), key=b"k")
    for i in range(2):
        text = json.dumps({"dataset": txt, "id": f"t{i}", "text": "fine text", "label": "b"}).encode()
        producer.produce(ingest_topics["raw"], text, key=b"k")
    producer.flush()

    dead = read_topic(kafka_bootstrap, ingest_topics["deadletter"], expected=len(bad), timeout_s=60)
    reasons = {d.headers["cdl-error"].decode(): d for d in dead}
    assert set(reasons) == set(bad), sorted(reasons)
    for kind, d in reasons.items():
        assert d.headers["cdl-reason"].decode().startswith(f"{kind}: "), d.headers["cdl-reason"][:200]
        assert len(d.headers["cdl-reason"]) < 1500
    big = reasons["record_too_large"]
    assert big.value is not None and len(big.value) == 900_000  # what a Kafka record can carry
    assert big.value == bad["record_too_large"][:900_000]
    assert reasons["id_too_long"].value == bad["id_too_long"]

    updates = {u.dataset: u for u in _updates(kafka_bootstrap, ingest_topics["updated"], 2, timeout_s=60)}
    assert updates[tab].total_records == good and updates[txt].total_records == 2
    data = load_version(object_store, tab, 1)
    assert sorted(map(str, data.ids)) == sorted(f"g{i}" for i in range(good))
    assert data.ids.dtype.itemsize <= 4 * 16  # the id column is as wide as the longest good id

    # a 50 kB id among 8,000 records cost ~6 GB before the limit; now the peak stays close to the start's
    after = _memory_kib(svc.proc.pid)
    assert after["VmHWM"] < 1_000_000, (before, after)
    assert after["VmHWM"] - before["VmRSS"] < 600_000, (before, after)

    # the stream goes on
    for i in range(good, 2 * good):
        producer.produce(ingest_topics["raw"], _json(tab, f"g{i}", [i, 0, 0, 0], "a"), key=b"k")
    producer.flush()
    versions = _updates(kafka_bootstrap, ingest_topics["updated"], 3, timeout_s=60)
    assert max(u.total_records for u in versions if u.dataset == tab) == 2 * good
    assert svc.proc.poll() is None


def test_one_long_text_among_many_short_ones_keeps_every_text_shard_small(
    ingest_factory: Any, ingest_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    """19,999 short texts and one of 65,536 characters (the limit) on one partition: padded
    to the longest text, that was one 5.2 GB shard, read again at every recovery. Now a
    buffer is written before a text would take its text column past 64 MiB."""
    svc = ingest_factory().start()
    assert svc.proc is not None
    name = f"longtxt-{uuid.uuid4().hex[:6]}"
    n = 20_000
    _register(svc, name, task=ingest_pb2.TASK_TEXT_CLASSIFICATION, min_new_records=n)
    before = _memory_kib(svc.proc.pid)
    long = "w" * 65_536
    producer = KProducer(secured({"bootstrap.servers": kafka_bootstrap, "compression.type": "lz4"}))
    for i in range(n):
        text = long if i == n // 2 else f"short text {i}"
        value = json.dumps({"dataset": name, "id": f"t{i}", "text": text, "label": "abc"[i % 3]}).encode()
        producer.produce(ingest_topics["raw"], value, key=b"k")
    producer.flush()

    [update] = _updates(kafka_bootstrap, ingest_topics["updated"], 1, timeout_s=120)
    assert update.total_records == n
    manifest = object_store.get_json("cdl-datasets", f"{name}/versions/1.json")
    widths = []
    for entry in manifest["shards"]:
        text = np.load(io.BytesIO(object_store.get_bytes("cdl-datasets", entry["key"])))["text"]
        assert text.nbytes <= 64 << 20, (entry["key"], text.dtype, len(text))
        widths.append(text.dtype.itemsize // 4)
    assert max(widths) == len(long) and len(manifest["shards"]) >= 3  # the long text's shard is a small one
    data = load_version(object_store, name, 1)
    assert data.text is not None and data.text.dtype == object  # not padded to the longest either
    texts = dict(zip(data.ids.tolist(), data.text.tolist(), strict=True))
    assert len(texts) == n and texts[f"t{n // 2}"] == long and texts["t7"] == "short text 7"
    after = _memory_kib(svc.proc.pid)
    assert after["VmHWM"] - before["VmRSS"] < 600_000, (before, after)
    assert svc.proc.poll() is None
