"""The ingest service as a real process against real Kafka and MinIO."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer as KProducer

from cdl.datasets import DATASETS_BUCKET, decode_shard, holdout_member, load_version
from cdl.events import decode
from cdl.kafka import ensure_topics
from cdl.kafka.security import secured
from cdl.store import ObjectStore
from cdl.v1 import events_pb2, ingest_pb2, ingest_pb2_grpc
from tests.helpers import metric_value, read_committed, read_topic, run_cdl, wait_committed

LABELS = ["a", "b", "c"]


def _register(svc: Any, name: str, **kw: Any) -> ingest_pb2.RegisterDatasetResponse:
    task = kw.pop("task", ingest_pb2.TASK_TABULAR_CLASSIFICATION)
    spec = ingest_pb2.DatasetSpec(
        name=name,
        task=task,
        input_shape=kw.pop("input_shape", [4] if task != ingest_pb2.TASK_TEXT_CLASSIFICATION else []),
        dtype="float32",
        labels=kw.pop("labels", LABELS),
        cleaning=ingest_pb2.CleaningRules(min_text_length=kw.pop("min_text_length", 0)),
        policy=ingest_pb2.RetrainPolicy(
            min_new_records=kw.pop("min_new_records", 10), max_interval_s=kw.pop("max_interval_s", 0.0)
        ),
        holdout_fraction=0.2,
    )
    with svc.channel() as ch:
        return ingest_pb2_grpc.IngestServiceStub(ch).RegisterDataset(ingest_pb2.RegisterDatasetRequest(spec=spec))


def _json(dataset: str, rid: str, features: Any, label: Any) -> bytes:
    return json.dumps({"dataset": dataset, "id": rid, "features": features, "label": label}).encode()


def _updates(bootstrap: str, topic: str, expected: int, timeout_s: float = 30) -> list[events_pb2.DataUpdated]:
    """What a consumer of ``data.updated`` sees: an aborted transaction's events left out."""
    recs = read_committed(bootstrap, topic, expected, timeout_s)
    return [decode(r.key, r.value, list(r.headers.items())).payload for r in recs]  # type: ignore[misc]


def _check_manifest(store: ObjectStore, dataset: str, version: int) -> dict[str, Any]:
    """A manifest agrees with its shards: counts, histogram, splits, offsets, unique ids."""
    manifest = store.get_json(DATASETS_BUCKET, f"{dataset}/versions/{version}.json")
    ids: list[str] = []
    hist: Counter[str] = Counter()
    train = holdout = 0
    for entry in manifest["shards"]:
        cols = decode_shard(store.get_bytes(DATASETS_BUCKET, entry["key"]))
        n = len(cols["id"])
        assert n == entry["records"]
        assert cols["offset"].min() == entry["first_offset"] and cols["offset"].max() == entry["last_offset"]
        assert int(cols["split"].sum()) == entry["holdout"]
        for rid, split in zip(cols["id"], cols["split"], strict=True):
            assert bool(split) == holdout_member(dataset, str(rid), 0.2)
        ids.extend(str(i) for i in cols["id"])
        hist.update(LABELS[i] for i in cols["label"])
        train += entry["train"]
        holdout += entry["holdout"]
    assert len(ids) == len(set(ids)) == manifest["total_records"]
    assert dict(hist) == manifest["label_histogram"]
    assert (train, holdout) == (manifest["train_records"], manifest["holdout_records"])
    assert manifest["new_records"] == sum(e["records"] for e in manifest["shards"] if e["new"])
    return dict(manifest)


@pytest.mark.parametrize("helpers", ["c-helpers", "pure-python"])
def test_json_and_protobuf_records_end_in_a_version(
    ingest_factory: Any, ingest_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore, helpers: str
) -> None:
    svc = ingest_factory()
    if helpers == "pure-python":  # what runs where no C compiler is at hand: same records, same version
        svc.env.update({"CDL_INGEST_NO_FASTSCAN": "1", "CDL_KAFKA_NO_NATIVE": "1"})
    svc.start()
    name = f"mixed-{uuid.uuid4().hex[:6]}"
    resp = _register(svc, name, min_new_records=10)
    assert resp.created and resp.dataset.latest_version == 0
    producer = KProducer(secured({"bootstrap.servers": kafka_bootstrap}))
    labels = ["a", "b", "c", "a", "a", "b", "c", "c", "c", "b"]
    for i, label in enumerate(labels[:6]):  # JSON, as kcat would send it (no headers at all)
        producer.produce(ingest_topics["raw"], _json(name, f"r{i}", [i, 1.5, -2, 0.25], label))
    for i, label in enumerate(labels[6:], start=6):  # protobuf with its content-type
        rec = events_pb2.Record(dataset=name, id=f"r{i}", label=label)
        rec.tensor.shape.extend([4])
        rec.tensor.values.extend([float(i), 1.5, -2.0, 0.25])
        producer.produce(
            ingest_topics["raw"], rec.SerializeToString(), headers=[("content-type", b"application/protobuf")]
        )
    producer.flush()

    [update] = _updates(kafka_bootstrap, ingest_topics["updated"], 1)
    assert (update.dataset, update.version, update.total_records, update.new_records) == (name, 1, 10, 10)
    assert dict(update.label_histogram) == {"a": 3, "b": 3, "c": 4}
    assert update.train_records + update.holdout_records == 10
    manifest = _check_manifest(object_store, name, 1)
    assert manifest["schema_hash"] == resp.dataset.schema_hash
    data = load_version(object_store, name, 1)
    order = np.argsort([int(i[1:]) for i in data.ids])
    assert data.x is not None
    np.testing.assert_allclose(data.x[order][:, 0], np.arange(10, dtype=np.float32))
    assert [LABELS[i] for i in data.labels[order]] == labels
    consumer = "Consumer" if helpers == "pure-python" else "NativeConsumer"
    assert f'"consumer": "{consumer}"' in svc.log_tail(200), svc.log_tail(200)


def test_each_malformed_kind_is_dead_lettered_with_its_reason(
    ingest_factory: Any, ingest_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    svc = ingest_factory().start()
    tab, txt = f"tab-{uuid.uuid4().hex[:6]}", f"txt-{uuid.uuid4().hex[:6]}"
    _register(svc, tab, min_new_records=5)
    _register(svc, txt, task=ingest_pb2.TASK_TEXT_CLASSIFICATION, min_text_length=5, min_new_records=2)
    good = [_json(tab, f"g{i}", [1, 2, 3, 4], "a") for i in range(5)]
    bad = {
        "malformed": b"{not json",
        "unknown_dataset": _json("no-such-dataset", "x1", [1, 2, 3, 4], "a"),
        "bad_shape": _json(tab, "x2", [1, 2, 3], "a"),
        "bad_dtype": _json(tab, "x3", ["one", 2, 3, 4], "a"),
        "non_finite": b'{"dataset": "%s", "id": "x4", "features": [1, NaN, 3, 4], "label": "a"}' % tab.encode(),
        "unknown_label": _json(tab, "x5", [1, 2, 3, 4], "zebra"),
        "text_too_short": json.dumps({"dataset": txt, "id": "t1", "text": "hi", "label": "a"}).encode(),
        "duplicate_id": _json(tab, "g0", [9, 9, 9, 9], "b"),
    }
    producer = KProducer(secured({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"}))
    stream = [good[0], good[1], bad["malformed"], bad["unknown_dataset"], good[2], bad["bad_shape"]]
    stream += [bad["bad_dtype"], bad["non_finite"], good[3], bad["unknown_label"], bad["text_too_short"], good[4]]
    stream += [
        json.dumps({"dataset": txt, "id": f"t{i}", "text": "long enough text", "label": "b"}).encode() for i in (2, 3)
    ]
    for value in stream:
        producer.produce(ingest_topics["raw"], value, key=b"k")  # one partition keeps the order
    producer.flush()
    # the duplicate must come after its original is committed
    wait_committed(kafka_bootstrap, ingest_topics["group"], ingest_topics["raw"], len(stream))
    producer.produce(ingest_topics["raw"], bad["duplicate_id"], key=b"k")
    producer.flush()

    dead = read_committed(kafka_bootstrap, ingest_topics["deadletter"], expected=len(bad))
    reasons = {d.headers["cdl-error"].decode(): d for d in dead}
    assert set(reasons) == set(bad), sorted(reasons)
    for kind, value in bad.items():
        rec = reasons[kind]
        assert rec.value == value, kind  # original bytes kept
        assert rec.headers["cdl-reason"].decode().startswith(f"{kind}: "), rec.headers["cdl-reason"]
        assert rec.headers["cdl-origin-topic"].decode() == ingest_topics["raw"]
    updates = _updates(kafka_bootstrap, ingest_topics["updated"], 2)
    by_name = {u.dataset: u for u in updates}
    assert by_name[tab].total_records == 5 and by_name[txt].total_records == 2
    # the rejects are counted in Prometheus by reason
    for kind in bad:
        assert metric_value(f"http://{svc.metrics}/metrics", "cdl_ingest_rejected_total", reason=kind) == 1.0, kind


def test_policy_fires_on_count_and_on_time(
    ingest_factory: Any, ingest_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    svc = ingest_factory().start()
    by_count, by_time = f"count-{uuid.uuid4().hex[:6]}", f"time-{uuid.uuid4().hex[:6]}"
    _register(svc, by_count, min_new_records=20)
    _register(svc, by_time, min_new_records=0, max_interval_s=3.0)
    producer = KProducer(secured({"bootstrap.servers": kafka_bootstrap}))
    for i in range(15):
        producer.produce(ingest_topics["raw"], _json(by_count, f"c{i}", [i, 0, 0, 0], "a"))
    for i in range(3):
        producer.produce(ingest_topics["raw"], _json(by_time, f"t{i}", [i, 0, 0, 0], "b"))
    producer.flush()
    sent = time.monotonic()
    [first] = _updates(kafka_bootstrap, ingest_topics["updated"], 1)
    assert (first.dataset, first.version, first.total_records) == (by_time, 1, 3)
    assert time.monotonic() - sent >= 1.0  # waited for the interval, not fired on arrival
    for i in range(15, 20):  # reaching 20 new records fires the count policy
        producer.produce(ingest_topics["raw"], _json(by_count, f"c{i}", [i, 0, 0, 0], "c"))
    producer.flush()
    updates = _updates(kafka_bootstrap, ingest_topics["updated"], 2)
    counted = [u for u in updates if u.dataset == by_count]
    assert [(u.version, u.total_records) for u in counted] == [(1, 20)]
    assert len(updates) == 2  # no empty version of the time-based dataset


def test_grpc_ingest_rejects_the_bad_record_and_lands_the_rest(
    ingest_factory: Any, ingest_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    svc = ingest_factory().start()
    name = f"grpc-{uuid.uuid4().hex[:6]}"
    _register(svc, name, min_new_records=4)

    def rec(i: int, values: list[float], label: str = "a") -> events_pb2.Record:
        r = events_pb2.Record(dataset=name, id=f"g{i}", label=label)
        r.tensor.values.extend(values)
        return r

    batch = [rec(0, [1, 2, 3, 4]), rec(1, [1, 2, 3, 4], "b"), rec(2, [1, math.inf, 3, 4]), rec(3, [0, 0, 0, 0])]
    batch.append(rec(4, [5, 5, 5, 5], "c"))
    with svc.channel() as ch:
        resp = ingest_pb2_grpc.IngestServiceStub(ch).Ingest(iter(batch))
    assert (resp.accepted, resp.rejected) == (4, 1)
    bad = [a for a in resp.acks if not a.accepted]
    assert [(a.id, a.code) for a in bad] == [("g2", "INVALID_ARGUMENT")]
    assert bad[0].reason.startswith("non_finite:")
    assert all(a.offset >= 0 for a in resp.acks if a.accepted)
    [update] = _updates(kafka_bootstrap, ingest_topics["updated"], 1)
    assert update.total_records == 4


def test_unknown_dataset_lookup_and_conflicting_schema(ingest_factory: Any) -> None:
    import grpc

    svc = ingest_factory().start()
    name = f"reg-{uuid.uuid4().hex[:6]}"
    assert _register(svc, name).created
    assert not _register(svc, name).created  # same spec again: no-op
    with pytest.raises(grpc.RpcError) as info:
        _register(svc, name, labels=["x", "y"])
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as info:
        _register(svc, f"{name}-bad", labels=["only-one"])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with svc.channel() as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetDataset(ingest_pb2.GetDatasetRequest(name="does-not-exist"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        got = stub.GetDataset(ingest_pb2.GetDatasetRequest(name=name))
    assert list(got.dataset.spec.labels) == LABELS
    # registrations survive a restart
    svc.stop()
    again = ingest_factory().start()
    with again.channel() as ch:
        assert (
            ingest_pb2_grpc.IngestServiceStub(ch).GetDataset(ingest_pb2.GetDatasetRequest(name=name)).dataset.spec.name
            == name
        )


def test_kill_9_mid_stream_loses_nothing_and_duplicates_nothing(
    ingest_factory: Any, ingest_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    """20,000 records, ≥ 5 versions, a kill -9 in the middle: every record is in a
    version or dead-lettered, exactly once; every version is published once and
    its manifest agrees with its shards."""
    # a version holds at least min_new_records and at most about two batches more (the
    # batch that reached the count and the one scanned meanwhile): small batches, so that
    # 20,000 records make at least 5 versions
    settings = {"shard_max_records": "1500", "batch_size": "500"}
    svc = ingest_factory(**settings).start()
    name = f"kill-{uuid.uuid4().hex[:6]}"
    _register(svc, name, min_new_records=2500)
    total, bad_every = 20000, 97
    producer = KProducer(secured({"bootstrap.servers": kafka_bootstrap, "linger.ms": 20}))
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(total, 4)).round(3).tolist()
    expected_bad = 0
    for i in range(total):
        if i % bad_every == 0:
            producer.produce(ingest_topics["raw"], _json(name, f"r{i}", feats[i][:3], "a"))  # bad shape
            expected_bad += 1
        else:
            producer.produce(ingest_topics["raw"], _json(name, f"r{i}", feats[i], LABELS[i % 3]))
        if i == total // 3:
            producer.flush()
            # let some versions commit, then kill -9 mid-stream
            _updates(kafka_bootstrap, ingest_topics["updated"], 1, timeout_s=60)
            svc.kill()
        producer.poll(0)
    producer.flush()
    ingest_factory(**settings).start()
    good = total - expected_bad

    # wait until every good record is committed (in a version, or pending below the count policy)
    deadline = time.monotonic() + 120
    final: dict[str, Any] = {}

    def committed_records(ds: dict[str, Any]) -> int:  # the latest version's, and those pending
        return int(ds["versioned"]["records"]) + sum(s["records"] for s in ds["pending"]) if ds else 0

    while time.monotonic() < deadline:
        snapshots = read_committed(kafka_bootstrap, ingest_topics["state"], expected=10**6, timeout_s=2)
        final = json.loads(snapshots[-1].value)["datasets"][name] if snapshots else {}
        if committed_records(final) == good:
            break
    committed = committed_records(final)
    assert committed == good, (committed, good)
    versions = _updates(kafka_bootstrap, ingest_topics["updated"], expected=10**6, timeout_s=3)
    numbers = [v.version for v in versions]
    assert numbers == list(range(1, len(numbers) + 1)), numbers  # each version once, in order
    assert len(numbers) >= 5
    last = versions[-1]
    manifests = [_check_manifest(object_store, name, v) for v in numbers]
    totals = [m["total_records"] for m in manifests]
    assert totals == sorted(totals) and totals == [v.total_records for v in versions]
    dead = read_committed(kafka_bootstrap, ingest_topics["deadletter"], expected=expected_bad, timeout_s=30)
    dead_offsets = [(d.headers["cdl-origin-partition"], d.headers["cdl-origin-offset"]) for d in dead]
    assert len(dead_offsets) == len(set(dead_offsets)) == expected_bad  # each bad record dead-lettered once
    assert (
        final["versioned"]["records"] == last.total_records
        and final["manifest"] == f"{name}/versions/{last.version}.json"
    )
    assert last.total_records + sum(s["records"] for s in final["pending"]) == good


def test_late_labels_from_data_feedback(
    ingest_factory: Any, ingest_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    svc = ingest_factory().start()
    name = f"late-{uuid.uuid4().hex[:6]}"
    _register(svc, name, min_new_records=4)
    producer = KProducer(secured({"bootstrap.servers": kafka_bootstrap}))
    raw, feedback = ingest_topics["raw"], ingest_topics["feedback"]
    for i in range(3):
        producer.produce(raw, _json(name, f"l{i}", [i, 0, 0, 0], "a"))
    for i in range(2):  # unlabelled: they wait for a label
        producer.produce(raw, json.dumps({"dataset": name, "id": f"u{i}", "features": [9, 9, 9, i]}).encode())
    producer.flush()
    wait_committed(kafka_bootstrap, ingest_topics["group"], raw, 5)  # all five ingested first

    def label(rid: str, lab: str) -> None:
        producer.produce(feedback, json.dumps({"dataset": name, "record_id": rid, "label": lab}).encode())

    label("u0", "b")
    label("nope", "a")  # unknown record
    label("l1", "b")  # already labelled
    label("u1", "zebra")  # unknown label
    producer.flush()
    [first] = _updates(kafka_bootstrap, ingest_topics["updated"], 1)
    assert (first.total_records, dict(first.label_histogram)) == (4, {"a": 3, "b": 1})
    data = load_version(object_store, name, 1)
    assert "u0" in set(data.ids) and "u1" not in set(data.ids)
    dead = read_committed(kafka_bootstrap, ingest_topics["deadletter"], expected=3)
    assert sorted(d.headers["cdl-error"].decode() for d in dead) == [
        "already_labelled",
        "unknown_label",
        "unknown_record",
    ]
    assert all(d.headers["cdl-origin-topic"].decode() == feedback for d in dead)

    # the waiting record survives a restart and takes its label afterwards
    svc.stop()
    ingest_factory().start()
    label("u1", "c")
    for i in range(3, 6):
        producer.produce(raw, _json(name, f"l{i}", [i, 0, 0, 0], "a"))
    producer.flush()
    second = _updates(kafka_bootstrap, ingest_topics["updated"], 2)[1]
    assert (second.version, second.total_records) == (2, 8)
    assert dict(second.label_histogram) == {"a": 6, "b": 1, "c": 1}


def test_cdl_produce_sends_each_line_as_a_record(stack: dict[str, Any], kafka_bootstrap: str, tmp_path: Path) -> None:
    """`cdl produce FILE --dataset NAME`: each JSON line a record on the topic, the dataset filled in."""
    topic = f"test.produce.{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, {topic: 1})
    src = tmp_path / "records.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"p{i}", "features": [i, 0, 0, 0], "label": "a"}) + "\n" for i in range(5))
    )
    out = run_cdl(
        "produce", str(src), "--topic", topic, "--dataset", "tab", "--json", state_dir=Path(stack["state_dir"])
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout) == {"produced": 5, "topic": topic}
    docs = [json.loads(r.value) for r in read_topic(kafka_bootstrap, topic, expected=5, timeout_s=30)]
    assert [d["id"] for d in docs] == [f"p{i}" for i in range(5)] and {d["dataset"] for d in docs} == {"tab"}
