"""Ingest's domain logic without servers: limits, the unknown-dataset cache, the bounded
state snapshot, compaction planning and the processor's in-place restore.

The processor runs here against a small in-memory stand-in for the object store
(pure logic only: what it stores is what it was given); tests/integration runs
the same code against MinIO and Kafka.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from cdl.datasets import (
    DATASETS_BUCKET,
    DatasetSpec,
    Shard,
    Task,
    check_dataset_name,
    decode_shard,
    load_version,
    valid_dataset_name,
)
from cdl.errors import ConflictError, InvalidInputError, NotFoundError
from cdl.events import InBatch, OutRecord
from services.ingest import fastscan
from services.ingest.commit import STATE_OVER
from services.ingest.compaction import CompactionPolicy, plan
from services.ingest.processor import STATE_KEY, IngestProcessor, StateTooLargeError
from services.ingest.records import Limits, RawRecord, Reason, RecordError, clean, parse
from services.ingest.registry import DatasetRegistry
from services.ingest.versioning import DatasetState, IngestState
from tests.fakes import MemoryStore

TAB = DatasetSpec(name="tab", task=Task.TABULAR, labels=("a", "b"), input_shape=(4,), min_new_records=30)
TXT = DatasetSpec(name="txt", task=Task.TEXT, labels=("a", "b"), min_new_records=1000)


class FakeStore(MemoryStore):
    """The shared in-memory store (tests/fakes.py) with what these tests look at: the keys read
    (``gets``) and the time each object was last written (``mtimes``; ingest's sweep reads it
    from ``client.list_objects``, as from MinIO's)."""

    def __init__(self) -> None:
        super().__init__()
        self.gets: list[str] = []
        self.mtimes: dict[str, float] = {}
        self.client = SimpleNamespace(list_objects=self._list_objects)

    def put_bytes(self, bucket: str, key: str, data: Any, content_type: str = "application/octet-stream") -> str:
        uri = super().put_bytes(bucket, key, data, content_type)
        self.mtimes[key] = time.time()
        return uri

    def get_bytes(self, bucket: str, key: str) -> bytes:
        self.gets.append(key)
        return super().get_bytes(bucket, key)

    def _list_objects(self, bucket: str, prefix: str = "", recursive: bool = True) -> Iterator[SimpleNamespace]:
        for obj in self.list(bucket, prefix, recursive):
            when = datetime.fromtimestamp(self.mtimes[obj.key], UTC)
            yield SimpleNamespace(object_name=obj.key, is_dir=False, last_modified=when)


def _processor(store: FakeStore, *specs: DatasetSpec, **kw: Any) -> IngestProcessor:
    registry = DatasetRegistry(store)
    for spec in specs:
        registry.register(spec)
    kw.setdefault("compaction", CompactionPolicy(min_shards=0, sweep_interval_s=0))
    return IngestProcessor(registry=registry, store=store, source="/test", state_topic="state", **kw)  # type: ignore[arg-type]


def _rec(rid: str, value: float = 1.0, label: str | None = "a", dataset: str = "tab") -> bytes:
    doc: dict[str, Any] = {"dataset": dataset, "id": rid, "features": [value, 2, 3, 4]}
    if label is not None:
        doc["label"] = label
    return json.dumps(doc).encode()


def _batch(values: list[bytes], first_offset: int, partition: int = 0, caught_up: bool = True) -> InBatch:
    n = len(values)
    batch = InBatch.from_values("data.raw", [partition] * n, range(first_offset, first_offset + n), None, values, None)
    batch.caught_up = caught_up
    return batch


def _by_topic(out: list[OutRecord]) -> dict[str, list[OutRecord]]:
    topics: dict[str, list[OutRecord]] = {}
    for rec in out:
        topics.setdefault(rec.topic, []).append(rec)
    return topics


def _snapshot(out: list[OutRecord]) -> bytes:
    [state] = [r for r in out if r.key == STATE_KEY]
    assert state.value is not None
    return state.value


# --------------------------------------------------------------------------- limits


def test_limits_reject_long_ids_labels_and_texts_with_their_reasons() -> None:
    lim = Limits(record_bytes=100, id_bytes=8, text_chars=10, label_bytes=4)
    with pytest.raises(RecordError) as info:
        lim.check_size(b"x" * 101)
    assert info.value.reason is Reason.RECORD_TOO_LARGE and "101 bytes" in str(info.value)
    lim.check_size(b"x" * 100)
    lim.check_size(None)
    with pytest.raises(RecordError) as info:
        lim.check_id("é" * 5)  # 5 characters, 10 UTF-8 bytes
    assert info.value.reason is Reason.ID_TOO_LONG
    lim.check_id("12345678")
    spec = DatasetSpec(name="t", task=Task.TEXT, labels=("ab", "cdefg"))
    with pytest.raises(RecordError) as info:
        clean(RawRecord("t", "r1", None, None, "short", "cdefg"), spec, limits=lim)
    assert info.value.reason is Reason.LABEL_TOO_LONG  # before unknown_label: the label is not echoed
    with pytest.raises(RecordError) as info:
        clean(RawRecord("t", "r1", None, None, "x" * 11, "ab"), spec, limits=lim)
    assert info.value.reason is Reason.TEXT_TOO_LONG
    assert clean(RawRecord("t", "r1", None, None, "x" * 10, "ab"), spec, limits=lim).text == "x" * 10
    with pytest.raises(RecordError) as info:  # the default limits apply without any given
        clean(RawRecord("t", "i" * 257, None, None, "text", "ab"), spec)
    assert info.value.reason is Reason.ID_TOO_LONG
    assert len(str(info.value)) < 400  # the id is not echoed whole


def test_a_dataset_may_tighten_limits_never_loosen_them() -> None:
    base = Limits(record_bytes=1000, id_bytes=64, text_chars=100)
    assert base.for_spec(TAB) is base
    spec = DatasetSpec(
        name="t", task=Task.TEXT, labels=("a", "b"), max_record_bytes=500, max_id_bytes=128, max_text_chars=10
    )
    assert base.for_spec(spec) == Limits(record_bytes=500, id_bytes=64, text_chars=10, label_bytes=256)
    with pytest.raises(InvalidInputError):
        DatasetSpec(name="t", task=Task.TEXT, labels=("a", "b"), max_id_bytes=-1)


def test_limits_are_not_part_of_the_schema_and_old_specs_still_load() -> None:
    old = {k: v for k, v in TAB.to_json().items() if not k.startswith("max_") or k == "max_interval_s"}
    assert DatasetSpec.from_json(old) == TAB
    assert DatasetSpec.from_json({**TAB.to_json(), "a_field_from_the_future": 1}) == TAB
    tight = DatasetSpec.from_json({**old, "max_id_bytes": 16})
    assert tight.max_id_bytes == 16 and tight.schema_hash == TAB.schema_hash


# --------------------------------------------------------------------------- the registry


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_unknown_dataset_names_are_remembered_for_a_while() -> None:
    store, clock = FakeStore(), _Clock()
    registry = DatasetRegistry(store, unknown_ttl_s=30.0, clock=clock)
    for _ in range(1000):
        assert registry.lookup("nope") is None
    assert store.gets == ["nope/dataset.json"]  # one read for the whole flood
    clock.t += 29.0
    assert registry.lookup("nope") is None and len(store.gets) == 1
    clock.t += 2.0  # past the TTL: asked again
    assert registry.lookup("nope") is None and len(store.gets) == 2
    for bad in ("", "a/b", "x" * 201, "sp ace", "nul\x00", "données", ".."):  # never a name: the store is not asked
        assert registry.lookup(bad) is None
    assert len(store.gets) == 2
    spec = DatasetSpec(name="nope", task=Task.TABULAR, labels=("a", "b"), input_shape=(2,))
    registry.register(spec)  # registering ends it at once
    assert registry.lookup("nope") == spec


def test_a_registration_during_a_miss_is_not_hidden_by_it() -> None:
    store, clock = FakeStore(), _Clock()
    registry = DatasetRegistry(store, clock=clock)
    spec = DatasetSpec(name="late", task=Task.TABULAR, labels=("a", "b"), input_shape=(2,))
    real_get = store.get_bytes
    raced: list[bool] = []

    def get_then_register(bucket: str, key: str) -> bytes:
        try:
            return real_get(bucket, key)
        finally:
            if not raced:
                raced.append(True)
                registry.register(spec)  # lands while the lookup's read is under way

    store.get_bytes = get_then_register  # type: ignore[method-assign]
    assert registry.lookup("late") == spec  # the registration wins, and no miss is remembered
    assert registry.lookup("late") == spec


def test_the_unknown_cache_is_bounded() -> None:
    store, clock = FakeStore(), _Clock()
    registry = DatasetRegistry(store, max_unknown=100, clock=clock)
    for i in range(1000):
        assert registry.lookup(f"n{i}") is None
    assert len(registry._unknown) <= 100
    assert "n999" in registry._unknown  # the newest are kept


# --------------------------------------------------------------------------- state


def _shard(key: str, records: int, partition: int = 0, first: int = 0) -> Shard:
    return Shard(f"d/shards/{key}", partition, first, first + records - 1, records, records, 0, {"a": records})


def test_the_snapshot_names_the_manifest_not_every_shard() -> None:
    manifests: dict[str, dict[str, Any]] = {}
    ds = DatasetState(version=0, last_version_at=1.0)
    for v in range(1, 101):  # 100 versions of 3 shards each
        ds.pending = [_shard(f"v{v}-{p}", 5, p, v * 10) for p in range(3)]
        manifests[f"d/versions/{v}.json"] = {"version": v, "shards": [{**s.to_json(), "new": True} for s in ds.shards]}
        ds.version, ds.versioned, ds.pending = v, ds.shards, []
    ds.pending = [_shard("p-0", 2)]
    state = IngestState(datasets={"d": ds})
    doc = json.loads(json.dumps(state.to_json()))
    assert len(json.dumps(doc)) < 1000  # 301 shards committed
    again = IngestState.from_json(doc, manifests.__getitem__)
    assert again.datasets["d"].versioned == ds.versioned and again.datasets["d"].pending == ds.pending
    manifests["d/versions/100.json"]["shards"].pop()  # a manifest that disagrees is not taken
    with pytest.raises(ConflictError):
        IngestState.from_json(doc, manifests.__getitem__)


def test_snapshots_of_the_first_format_still_load() -> None:
    shards = [_shard(f"s{i}", 4, first=i * 4) for i in range(5)]
    doc = {
        "datasets": {
            "d": {
                "version": 2,
                "last_version_at": 5.0,
                "versioned_shards": 3,
                "shards": [s.to_json() for s in shards],
                "unlabelled": [],
            }
        }
    }
    ds = IngestState.from_json(doc).datasets["d"]
    assert (ds.version, ds.versioned, ds.pending, ds.new_records) == (2, shards[:3], shards[3:], 8)


def test_compaction_plans_runs_of_small_shards_per_partition() -> None:
    shards = [_shard(f"a{i}", 10, 0, i * 10) for i in range(5)] + [_shard("big", 900, 0, 50)]
    shards += [_shard(f"b{i}", 10, 1, i * 10) for i in range(3)] + [_shard("a5", 10, 0, 950)]
    policy = CompactionPolicy(min_shards=4, target_records=1000)
    groups = [[s.key.rsplit("/", 1)[1] for s in g] for g in plan(shards, policy)]
    assert groups == [["a0", "a1", "a2", "a3", "a4"]]  # not across the big one; partition 1 has too few
    assert plan(shards, CompactionPolicy(min_shards=4, target_records=25))[0] == shards[0:2]
    assert plan(shards, CompactionPolicy(min_shards=0)) == []
    ds = DatasetState(versioned=list(shards))
    merged = _shard("m", 50)
    assert ds.replace_versioned([s.key for s in shards[:5]], merged)
    assert ds.versioned == [merged, *shards[5:]]
    assert not ds.replace_versioned([shards[0].key], merged)  # gone already: nothing changes


# --------------------------------------------------------------------------- the processor


def test_hostile_records_are_dead_lettered_within_bounded_memory() -> None:
    store = FakeStore()
    p = _processor(store, TAB, TXT, deadletter_max_value_bytes=50_000)
    p.recover(None)
    good = [_rec(f"g{i}", float(i)) for i in range(5000)]
    long_id = _rec("i" * 50_000)
    huge = b'{"dataset":"tab","id":"h","features":[' + b"1," * 1_000_000 + b'1],"label":"a"}'
    long_text = json.dumps({"dataset": "txt", "id": "t", "text": "w " * 40_000, "label": "a"}).encode()
    long_label = _rec("l", label="x" * 1000)
    unknown = _rec("u", dataset="n" * 150)
    values = [*good[:2500], long_id, huge, long_text, long_label, unknown, *good[2500:]]
    tracemalloc.start()
    try:
        p.on_batch(_batch(values, 0))
        out = p.flush()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the batch itself is ~2.5 MB; one 50 kB id in a 5000-record id column alone would be 1 GB
    assert peak < 60 << 20, peak
    dead = _by_topic(out)["data.deadletter"]
    reasons = {dict(d.headers)["cdl-error"].decode(): d for d in dead}
    assert set(reasons) == {"id_too_long", "record_too_large", "text_too_long", "label_too_long", "unknown_dataset"}
    big = reasons["record_too_large"]
    assert big.value == huge[:50_000]
    assert b"keeps the first 50000 of" in dict(big.headers)["cdl-reason"]
    assert all(len(dict(d.headers)["cdl-reason"]) < 1200 for d in dead)
    assert sum(s.records for s in p.state.datasets["tab"].shards) == 5000


def test_a_dataset_s_own_limits_apply_on_the_fast_path() -> None:
    spec = DatasetSpec(
        name="tight", task=Task.TABULAR, labels=("a", "b"), input_shape=(4,), max_id_bytes=4, max_record_bytes=80
    )
    p = _processor(FakeStore(), spec)
    p.recover(None)
    values = [_rec("ok1", dataset="tight"), _rec("toolong", dataset="tight"), _rec("ok2", 1.25, dataset="tight")]
    values.append(
        json.dumps({"dataset": "tight", "id": "big", "features": [1.5] * 4, "label": "a", "pad": "x" * 80}).encode()
    )
    p.on_batch(_batch(values, 0))
    dead = _by_topic(p.flush())["data.deadletter"]
    assert sorted(dict(d.headers)["cdl-error"].decode() for d in dead) == ["id_too_long", "record_too_large"]
    assert sum(s.records for s in p.state.datasets["tight"].shards) == 2


def test_dead_letters_waiting_are_bounded_by_bytes() -> None:
    p = _processor(FakeStore(), TAB, deadletter_flush_bytes=100_000)
    p.recover(None)
    p.on_batch(_batch([b"{not json" + b" " * 1000] * 50, 0))
    assert not p.wants_flush()
    p.on_batch(_batch([b"{not json" + b" " * 1000] * 100, 50))
    assert p.wants_flush()
    p.flush()
    assert not p.wants_flush()


def _feed(p: IngestProcessor, start: int, n: int, partition: int = 0) -> None:
    values = [_rec(f"r{i}", float(i), label=None if i % 7 == 0 else "ab"[i % 2]) for i in range(start, start + n)]
    values.append(b"{broken")
    p.on_batch(_batch(values, start, partition, caught_up=False))  # left in flight in the scan thread


def _comparable(out: list[OutRecord]) -> list[tuple[str, bytes | None, tuple[tuple[str, bytes], ...]]]:
    """What a flush publishes, less the event headers that name the moment (ce_time, traceparent)."""
    return [(r.topic, r.value, tuple(h for h in r.headers if h[0] not in ("ce_time", "traceparent"))) for r in out]


def test_restore_drops_what_was_not_committed_and_equals_a_fresh_recovery() -> None:
    store = FakeStore()
    p = _processor(store, TAB, shard_max_records=40)
    p.recover(None)
    _feed(p, 0, 50)
    committed = _snapshot(p.flush(now=100.0))
    # then work that never commits: a full shard written in the background, buffers, dead
    # letters, a label for a waiting record, a version written and a batch still in flight
    _feed(p, 51, 45)
    p.on_batch(
        InBatch.from_values("data.feedback", [0], [0], None, [b'{"dataset":"tab","record_id":"r7","label":"a"}'], None)
    )
    aborted = p.flush(now=101.0)
    assert any(r.topic == "data.updated" for r in aborted)
    _feed(p, 97, 30)
    assert p._inflight is not None
    p.restore(committed)

    fresh = _processor(store, TAB, shard_max_records=40)
    fresh.recover(committed)
    for proc in (p, fresh):
        _feed(proc, 51, 45)
        _feed(proc, 97, 30)
    a, b = p.flush(now=102.0), fresh.flush(now=102.0)
    assert _comparable(a) == _comparable(b)
    assert json.loads(committed)["datasets"]["tab"]["version"] == 1
    assert json.loads(_snapshot(a))["datasets"]["tab"]["version"] == 2  # the aborted version 2, made again
    assert len(p._seen["tab"]) == len(fresh._seen["tab"]) and p._labels.waiting.keys() == fresh._labels.waiting.keys()
    assert sorted(p._labels.waiting["tab"]) == sorted(fresh._labels.waiting["tab"])
    p.close()
    fresh.close()


def test_restore_after_a_failed_shard_write() -> None:
    store = FakeStore()
    p = _processor(store, TAB, shard_max_records=10)
    p.restore(None)  # restore works on a new processor too (the loop's first session)
    real_put = store.put_bytes

    def failing_put(bucket: str, key: str, data: Any, content_type: str = "") -> str:
        raise OSError("object store down")

    store.put_bytes = failing_put  # type: ignore[method-assign]
    _feed(p, 0, 25)
    with pytest.raises(OSError):
        p.flush()
    store.put_bytes = real_put  # type: ignore[method-assign]
    p.restore(None)
    _feed(p, 0, 25)
    out = p.flush()
    assert sum(s.records for s in p.state.datasets["tab"].shards) == 25 - 4  # 4 of them wait for labels
    assert len(_by_topic(out)["data.deadletter"]) == 1
    p.close()


def test_many_versions_keep_the_snapshot_small_and_compaction_keeps_their_content() -> None:
    store = FakeStore()
    spec = DatasetSpec(name="tab", task=Task.TABULAR, labels=("a", "b"), input_shape=(4,), min_new_records=6)
    p = _processor(store, spec, compaction=CompactionPolicy(min_shards=4, target_records=1000, sweep_interval_s=0))
    p.recover(None)
    sizes, offset = [], 0
    for _ in range(60):
        for partition in (0, 1):
            values = [_rec(f"r{offset + k}", float(offset + k), "ab"[k % 2]) for k in range(3)]
            p.on_batch(_batch(values, offset, partition))
            offset += 3
        out = p.flush()
        sizes.append(len(_snapshot(out)))
        if p._housekeeping.job is not None:
            p._housekeeping.job.result()
    assert p.state.datasets["tab"].version >= 55
    assert max(sizes) < 1200, sizes
    versions = p.state.datasets["tab"].version
    merged = [o.key for o in store.list(DATASETS_BUCKET) if "-m" in o.key]
    assert merged, "nothing was merged"
    latest = store.get_json(DATASETS_BUCKET, f"tab/versions/{versions}.json")
    assert len(latest["shards"]) < 30  # 120 flush shards, most of them merged
    seen: set[str] = set()
    for v in range(1, versions + 1):
        data = load_version(store, "tab", v)
        ids = [str(i) for i in data.ids]
        assert len(ids) == len(set(ids)) and seen <= set(ids)  # versions grow, nothing twice
        seen = set(ids)
        assert data.x is not None
        for rid, x, label in zip(ids, data.x, data.labels, strict=True):
            k = int(rid[1:])
            assert x[0] == float(k) and "ab"[label] == "ab"[k % 3 % 2]
    assert seen == {f"r{k}" for k in range(offset)}
    for key in merged:  # a merged shard holds exactly its inputs' records
        cols = decode_shard(store.get_bytes(DATASETS_BUCKET, key))
        assert len(cols["id"]) == len(set(cols["id"].tolist()))
    # recovery from the last snapshot reads the latest manifest, merged shards and all
    again = _processor(store, spec)
    again.recover(_snapshot(out))
    assert again.state.datasets["tab"].versioned == p.state.datasets["tab"].versioned
    assert len(again._seen["tab"]) == offset
    p.close()
    again.close()


def test_unlabelled_shards_whose_records_all_got_labels_leave_the_state() -> None:
    store = FakeStore()
    p = _processor(store, TAB)
    p.recover(None)
    p.on_batch(_batch([_rec("u1", label=None), _rec("u2", label=None), _rec("l1")], 0))
    p.flush()
    assert len(p.state.datasets["tab"].unlabelled) == 1
    fb = [json.dumps({"dataset": "tab", "record_id": r, "label": "b"}).encode() for r in ("u1", "u2")]
    p.on_batch(InBatch.from_values("data.feedback", [0, 0], [0, 1], None, list(fb), None))
    snap = _snapshot(p.flush())
    assert p.state.datasets["tab"].unlabelled == []
    assert json.loads(snap)["datasets"]["tab"]["unlabelled"] == []
    assert sum(s.records for s in p.state.datasets["tab"].shards) == 3
    p.close()


def test_the_id_set_is_not_fooled_by_a_rejected_long_id() -> None:
    """A record rejected for its size takes no id: a later good record with that id is kept."""
    spec = DatasetSpec(name="s", task=Task.TABULAR, labels=("a", "b"), input_shape=(4,), max_record_bytes=90)
    p = _processor(FakeStore(), spec)
    p.recover(None)
    big = json.dumps({"dataset": "s", "id": "same", "features": [1, 2, 3, 4], "label": "a", "x": "y" * 60}).encode()
    p.on_batch(_batch([big, _rec("same", dataset="s")], 0))
    p.flush()
    assert sum(s.records for s in p.state.datasets["s"].shards) == 1
    if fastscan.available():
        assert len(p._seen["s"]) == 1
    p.close()


# --------------------------------------------------------------------------- review fixes


def test_int64_features_are_range_checked_exactly() -> None:
    """Features are read as 64-bit floats (on both paths): 2**63 - 1 reads as 2**63, which
    int64 cannot hold; both were taken and wrapped to -2**63 by a float comparison."""
    spec = DatasetSpec(name="i64", task=Task.TABULAR, labels=("a", "b"), input_shape=(2,), dtype="int64")

    def careful(v: int) -> Any:
        return clean(RawRecord("i64", "r", [v, 0], None, None, "a"), spec).x

    for v in (2**63, 2**63 - 1, 2**64, -(2**63) - 4096):
        with pytest.raises(RecordError) as info:
            careful(v)
        assert info.value.reason is Reason.BAD_DTYPE, v
    assert careful(-(2**63)).tolist() == [-(2**63), 0]
    assert careful(2**63 - 1024).tolist() == [2**63 - 1024, 0]  # the largest float64 below 2**63
    u8 = DatasetSpec(name="u8", task=Task.TABULAR, labels=("a", "b"), input_shape=(2,), dtype="uint8")
    with pytest.raises(RecordError):
        clean(RawRecord("u8", "r", [256, 0], None, None, "a"), u8)
    assert clean(RawRecord("u8", "r", [255, 0], None, None, "a"), u8).x.tolist() == [255, 0]  # type: ignore[union-attr]
    # through the processor: the fast path leaves them undecided, the careful path rejects them
    p = _processor(FakeStore(), spec)
    p.recover(None)
    values = [
        b'{"dataset":"i64","id":"%d","features":[%d,1],"label":"a"}' % (i, v)
        for i, v in enumerate((2**63, 2**63 - 1, 2**63 - 1024, -(2**63)))
    ]
    p.on_batch(_batch(values, 0))
    dead = _by_topic(p.flush())["data.deadletter"]
    assert sorted(d.value for d in dead) == sorted(values[:2])  # type: ignore[type-var]
    assert {dict(d.headers)["cdl-error"] for d in dead} == {b"bad_dtype"}
    [shard] = p.state.datasets["i64"].pending
    cols = decode_shard(p._store.get_bytes(DATASETS_BUCKET, shard.key))
    assert sorted(cols["x"][:, 0].tolist()) == [-(2**63), 2**63 - 1024]
    p.close()


def test_one_dataset_name_rule_at_registration_and_lookup() -> None:
    for good in ("a", "digits", "a.b-c_D9", "x" * 200, "..a"):
        assert valid_dataset_name(good)
        check_dataset_name(good)
        DatasetSpec(name=good, task=Task.TEXT, labels=("a", "b"))
    for bad in ("", "données", "x" * 201, "a/b", "sp ace", ".", "..", "nul\x00", "\uff46ull"):
        assert not valid_dataset_name(bad)
        with pytest.raises(InvalidInputError) as info:
            DatasetSpec(name=bad, task=Task.TEXT, labels=("a", "b"))
        assert "ASCII" in str(info.value)
    store = FakeStore()
    registry = DatasetRegistry(store)
    # a dataset.json written under a name the rule refuses (before the rule) is never read
    store.put_json(DATASETS_BUCKET, "données/dataset.json", {**TXT.to_json(), "name": "données"})
    assert registry.lookup("données") is None and store.gets == []
    with pytest.raises(NotFoundError):
        registry.get("données")


def test_labels_over_the_label_limit_are_refused_at_registration() -> None:
    registry = DatasetRegistry(FakeStore(), max_label_bytes=8)
    with pytest.raises(InvalidInputError) as info:
        registry.register(DatasetSpec(name="l", task=Task.TEXT, labels=("short", "é" * 5)))  # 10 bytes
    assert "10 bytes" in str(info.value) and registry.lookup("l") is None
    registry.register(DatasetSpec(name="l", task=Task.TEXT, labels=("short", "é" * 4)))
    with pytest.raises(InvalidInputError):  # the default: the service's default label limit
        DatasetRegistry(FakeStore()).register(DatasetSpec(name="l", task=Task.TEXT, labels=("a", "b" * 257)))


def test_the_fast_path_rejects_a_registered_label_over_the_limit() -> None:
    """A label registered before the check (or under a looser limit) is dead-lettered on the
    fast path as on the careful one (label_too_long), the other records taken as before."""
    long = "l" * 40
    spec = DatasetSpec(name="tab", task=Task.TABULAR, labels=("a", long), input_shape=(4,), min_new_records=30)
    store = FakeStore()
    registry = DatasetRegistry(store, max_label_bytes=256)
    registry.register(spec)
    p = IngestProcessor(
        registry=registry,
        store=store,  # type: ignore[arg-type]
        source="/t",
        state_topic="state",
        limits=Limits(label_bytes=16),
        compaction=CompactionPolicy(min_shards=0, sweep_interval_s=0),
    )
    p.recover(None)
    values = [_rec(f"r{i}", float(i), label="a" if i % 3 else long) for i in range(30)]
    p.on_batch(_batch(values, 0))
    dead = _by_topic(p.flush())["data.deadletter"]
    assert sorted(int(json.loads(d.value or b"")["id"][1:]) for d in dead) == list(range(0, 30, 3))
    assert {dict(d.headers)["cdl-error"] for d in dead} == {b"label_too_long"}
    careful = p._limits  # the careful path's verdict is the same
    with pytest.raises(RecordError) as info:
        clean(parse(values[0], "application/json"), spec, limits=careful)
    assert info.value.reason is Reason.LABEL_TOO_LONG
    assert sum(s.records for s in p.state.datasets["tab"].shards) == 20
    p.close()


def test_late_labels_take_the_dataset_s_own_size_limit() -> None:
    spec = DatasetSpec(name="s", task=Task.TABULAR, labels=("a", "b"), input_shape=(4,), max_record_bytes=100)
    p = _processor(FakeStore(), spec)
    p.recover(None)
    p.on_batch(_batch([_rec("u", dataset="s", label=None)], 0))
    big = json.dumps({"dataset": "s", "record_id": "u", "label": "a", "pad": "x" * 100}).encode()
    p.on_batch(InBatch.from_values("data.feedback", [0], [0], None, [big], None))
    [dead] = _by_topic(p.flush())["data.deadletter"]
    assert dict(dead.headers)["cdl-error"] == b"record_too_large"
    assert "u" in p._labels.waiting["s"]  # still waiting: a label that fits may come
    p.close()


def _text(rid: str, text: str, label: str | None = "a") -> bytes:
    doc: dict[str, Any] = {"dataset": "txt", "id": rid, "text": text}
    if label is not None:
        doc["label"] = label
    return json.dumps(doc).encode()


def test_a_text_shard_s_column_stays_within_its_byte_bound() -> None:
    """A buffer is written before a text that would take its column (records x longest text x 4
    bytes, as a shard stores it) past shard_text_bytes; labelled, unlabelled and late-labelled
    alike. Before, 19,999 short texts and one of 65,536 characters made a 5.2 GB shard."""
    store = FakeStore()
    cap = 4000
    p = _processor(store, TXT, shard_text_bytes=cap, shard_max_records=1000)
    p.recover(None)
    long = "w" * 500  # 2,000 bytes a row
    values = [_text(f"s{i}", f"t{i}") for i in range(30)] + [_text("long", long)]
    values += [_text(f"z{i}", f"t{i}") for i in range(10)]
    values += [_text(f"u{i}", "short" if i != 5 else long, label=None) for i in range(12)]
    p.on_batch(_batch(values, 0))
    fb = [json.dumps({"dataset": "txt", "record_id": f"u{i}", "label": "b"}).encode() for i in range(12)]
    p.on_batch(InBatch.from_values("data.feedback", [0] * 12, range(12), None, list(fb), None))
    p.flush()
    ds = p.state.datasets["txt"]
    texts: dict[str, str] = {}
    for shard in [*ds.pending, *ds.unlabelled]:
        cols = decode_shard(store.get_bytes(DATASETS_BUCKET, shard.key))
        assert cols["text"].nbytes <= cap, (shard.key, cols["text"].dtype, len(cols["text"]))
        if "/shards/" in shard.key:
            texts.update(zip(cols["id"].tolist(), cols["text"].tolist(), strict=True))
    assert len(texts) == 30 + 1 + 10 + 12 and texts["long"] == long and texts["u5"] == long
    assert len(ds.pending) > 3  # the long text's neighbours were sealed around it
    # a version reads its texts as strings, not as a column padded to the longest
    registry = p._registry
    registry.register(DatasetSpec(name="txt", task=Task.TEXT, labels=("a", "b"), min_new_records=1))
    p.flush()
    data = load_version(store, "txt", 1)
    assert data.text is not None and data.text.dtype == object
    assert dict(zip(data.ids.tolist(), data.text.tolist(), strict=True)) == texts
    hold, _ = data.subset(holdout=True)
    assert all(type(t) is str for t in hold)
    p.close()


def test_unlabelled_buffers_are_sealed_by_count_too() -> None:
    p = _processor(FakeStore(), TAB, shard_max_records=5)
    p.recover(None)
    p.on_batch(_batch([_rec(f"u{i}", label=None) for i in range(12)], 0))
    assert [s.records for s in p.state.datasets["tab"].unlabelled] == [5, 5]  # written while the stream goes on
    p.flush()
    assert [s.records for s in p.state.datasets["tab"].unlabelled] == [5, 5, 2]
    fb = json.dumps({"dataset": "tab", "record_id": "u7", "label": "b"}).encode()
    p.on_batch(InBatch.from_values("data.feedback", [0], [0], None, [fb], None))
    p.flush()
    assert p._labels.waiting_in[p.state.datasets["tab"].unlabelled[1].key] == 4
    p.close()


def test_a_failed_shard_write_is_raised_only_once_every_write_ended() -> None:
    store = FakeStore()
    p = _processor(store, TAB)
    p.recover(None)
    real_put = store.put_bytes
    ended: list[str] = []

    def put(bucket: str, key: str, data: Any, content_type: str = "") -> str:
        if "/p000-" in key:
            raise OSError("object store down")
        time.sleep(0.3)
        try:
            return real_put(bucket, key, data, content_type)
        finally:
            ended.append(key)

    store.put_bytes = put  # type: ignore[method-assign]
    p.on_batch(_batch([_rec("a0")], 0, partition=0))
    p.on_batch(_batch([_rec("a1")], 0, partition=1))
    with pytest.raises(OSError):
        p.flush()
    assert len(ended) == 1 and p._shards.writes == []  # the slow write was waited for, not left untracked
    p.close()


def test_dead_letters_waiting_count_their_headers() -> None:
    p = _processor(FakeStore(), TAB, deadletter_flush_bytes=500_000)
    p.recover(None)
    headers = [("h", b"x" * 60_000)]  # kept on the dead letter: under 64 KiB
    n = 10
    batch = InBatch.from_values("data.raw", [0] * n, range(n), None, [b"{bad"] * n, [headers] * n)
    p.on_batch(batch)
    assert p.wants_flush()  # 600 kB of headers wait, though the values are 4 bytes each
    out = p.flush()
    assert all(dict(d.headers)["h"] == b"x" * 60_000 for d in _by_topic(out)["data.deadletter"])


def test_the_snapshot_stays_under_its_cap_on_a_trickle_over_many_partitions() -> None:
    """A count policy far away and a record per partition and flush: pending shards pile up
    (~213 bytes each in the snapshot); over state_max_bytes they are merged at once."""
    store = FakeStore()
    spec = DatasetSpec(name="tab", task=Task.TABULAR, labels=("a", "b"), input_shape=(4,), min_new_records=10**6)
    cap, parts = 8000, 12
    p = _processor(store, spec, state_max_bytes=cap)  # background compaction off: only the cap acts
    p.recover(None)
    merged_before = STATE_OVER.labels("merged")._value.get()
    sizes, n = [], 0
    for _ in range(20):
        for part in range(parts):
            p.on_batch(_batch([_rec(f"r{n}", float(n))], n, partition=part))
            n += 1
        sizes.append(len(snap := _snapshot(p.flush())))
    assert max(sizes) <= cap, sizes
    assert STATE_OVER.labels("merged")._value.get() > merged_before
    pending = p.state.datasets["tab"].pending
    assert len(pending) < 3 * parts and sum(s.records for s in pending) == n  # 240 shards written
    assert any("-m" in s.key for s in pending)
    # a new processor recovers from it; a version then holds every record once
    again = _processor(store, spec, state_max_bytes=cap)
    again.recover(snap)
    assert len(again._seen["tab"]) == n
    again._registry.register(
        DatasetSpec(name="tab", task=Task.TABULAR, labels=("a", "b"), input_shape=(4,), min_new_records=1)
    )
    again.flush()
    data = load_version(store, "tab", 1)
    assert data.x is not None
    assert sorted(zip(data.ids.tolist(), data.x[:, 0].tolist(), strict=True)) == sorted(
        (f"r{i}", float(i)) for i in range(n)
    )
    p.close()
    again.close()


def test_a_snapshot_that_merging_cannot_bring_under_its_cap_fails_loudly() -> None:
    spec = DatasetSpec(name="tab", task=Task.TABULAR, labels=("a", "b"), input_shape=(4,), min_new_records=10**6)
    p = _processor(FakeStore(), spec, state_max_bytes=1000)
    p.recover(None)
    failed_before = STATE_OVER.labels("failed")._value.get()
    for part in range(8):  # eight partitions: eight shards nothing can merge
        p.on_batch(_batch([_rec(f"r{part}")], part, partition=part))
    with pytest.raises(StateTooLargeError):
        p.flush()
    assert STATE_OVER.labels("failed")._value.get() == failed_before + 1
    p.close()


def test_pending_and_unlabelled_shards_are_merged_in_the_background() -> None:
    store = FakeStore()
    spec = DatasetSpec(name="tab", task=Task.TABULAR, labels=("a", "b"), input_shape=(4,), min_new_records=10**6)
    policy = CompactionPolicy(min_shards=4, target_records=1000, sweep_interval_s=0)
    p = _processor(store, spec, compaction=policy)
    p.recover(None)
    n = 0
    for _ in range(12):  # a labelled and an unlabelled record a flush
        p.on_batch(_batch([_rec(f"r{n}", float(n)), _rec(f"u{n}", label=None)], n))
        n += 2
        snap = _snapshot(p.flush())
        if p._housekeeping.job is not None:
            p._housekeeping.job.result()
    ds = p.state.datasets["tab"]
    assert len(ds.pending) < 6 and len(ds.unlabelled) < 6, (ds.pending, ds.unlabelled)
    assert sum(s.records for s in ds.pending) == 12 and sum(s.records for s in ds.unlabelled) == 12
    assert any("/unlabelled/" in s.key and "-m" in s.key for s in ds.unlabelled)
    assert len(json.loads(snap)["datasets"]["tab"]["pending"]) == len(ds.pending)
    # the waiting records follow their shard into the merge; recovery finds them there too
    again = _processor(store, spec, compaction=policy)
    again.recover(snap)
    waiting = sorted(f"u{i}" for i in range(0, n, 2))
    assert sorted(again._labels.waiting["tab"]) == sorted(p._labels.waiting["tab"]) == waiting
    for proc in (p, again):
        fb = [json.dumps({"dataset": "tab", "record_id": rid, "label": "b"}).encode() for rid in waiting]
        proc.on_batch(InBatch.from_values("data.feedback", [0] * len(fb), range(len(fb)), None, list(fb), None))
        proc.flush()
        assert proc.state.datasets["tab"].unlabelled == []  # every waiting record got its label
        assert sum(s.records for s in proc.state.datasets["tab"].pending) == 24
    p.close()
    again.close()


def test_the_sweep_keeps_a_merged_shard_its_own_job_found_already_written() -> None:
    """A merged shard left by a session whose merge never got into a version has an old time;
    the next session's job merges the same inputs, finds it there and must not sweep it."""
    store = FakeStore()
    spec = DatasetSpec(name="tab", task=Task.TABULAR, labels=("a", "b"), input_shape=(4,), min_new_records=3)
    lost = _processor(store, spec, compaction=CompactionPolicy(min_shards=4, target_records=1000, sweep_interval_s=0))
    lost.recover(None)
    for v in range(4):  # four versions of one small shard each: the job merges them
        lost.on_batch(_batch([_rec(f"r{3 * v + k}", float(k)) for k in range(3)], 3 * v))
        snap = _snapshot(lost.flush())
    assert lost._housekeeping.job is not None
    [m] = lost._housekeeping.job.result()[0]
    lost.close()  # gone before its next version: the merge is in no committed state
    store.mtimes[m.shard.key] = time.time() - 10_000  # written long ago
    policy = CompactionPolicy(min_shards=4, target_records=1000, grace_s=60, sweep_interval_s=1e-6)
    p = _processor(store, spec, compaction=policy)
    p.recover(snap)
    time.sleep(0.01)
    p.flush()  # merges the same inputs (the object is there: not written again) and sweeps
    assert p._housekeeping.job is not None
    [again] = p._housekeeping.job.result()[0]
    assert again.shard.key == m.shard.key and store.exists(DATASETS_BUCKET, m.shard.key)
    p.on_batch(_batch([_rec(f"r{k}", float(k)) for k in range(12, 15)], 12))
    p.flush()  # version 5 names the merged shard
    assert m.shard.key in {e["key"] for e in store.get_json(DATASETS_BUCKET, "tab/versions/5.json")["shards"]}
    assert sorted(load_version(store, "tab", 5).ids.tolist()) == sorted(f"r{k}" for k in range(15))
    p.close()


# --------------------------------------------------------------------------- the monitor's events


def test_feedback_for_served_requests_is_skipped_not_dead_lettered() -> None:
    """Labels of served requests (request_id, no record_id) are the monitor's: counted and skipped."""
    p = _processor(FakeStore(), TAB)
    p.recover(None)
    fb = [json.dumps({"request_id": f"r{i}", "label": "a"}).encode() for i in range(50)]
    neither = json.dumps({"dataset": "tab", "label": "a"}).encode()  # no record_id, no request_id
    p.on_batch(InBatch.from_values("data.feedback", [0] * 51, range(51), None, [*fb, neither], None))
    dead = _by_topic(p.flush()).get("data.deadletter", [])
    assert [dict(d.headers)["cdl-error"] for d in dead] == [b"malformed"]
    p.close()


def _drift_batch(dataset: str, offset: int) -> InBatch:
    from cdl.events import Event, encode
    from cdl.v1 import events_pb2

    alert = events_pb2.DriftDetected(model="m", version=1, dataset=dataset, test="mmd", statistic=0.5, threshold=0.01)
    key, value, headers = encode(Event(alert, source="/test", key="m"))
    return InBatch.from_values("drift.detected", [0], [offset], [key], [value], [headers])


def test_a_drift_alert_cuts_the_next_version_with_the_first_new_records_and_survives_a_restart() -> None:
    spec = DatasetSpec(name="d", task=Task.TABULAR, labels=("a", "b"), input_shape=(4,), min_new_records=10_000)
    store = FakeStore()
    p = _processor(store, spec)
    p.recover(None)
    p.on_batch(_batch([_rec(f"x{i}", dataset="d") for i in range(5)], 0))
    assert "data.updated" not in _by_topic(p.flush())  # 5 of 10,000: no version
    p.on_batch(_drift_batch("d", 0))
    [first] = _by_topic(p.flush())["data.updated"]  # the alert brings the 5 records forward
    assert first.key == b"d"
    assert p.state.datasets["d"].version == 1 and p.state.datasets["d"].drift_alert == ""
    # the alert was answered: new records wait for the count policy again
    p.on_batch(_batch([_rec(f"y{i}", dataset="d") for i in range(5)], 5))
    p.on_batch(_batch([_rec("y5", dataset="d")], 10))
    assert "data.updated" not in _by_topic(p.flush())
    p.on_batch(_drift_batch("d", 1))
    [second] = _by_topic(p.flush())["data.updated"]  # a second alert: the 6 records at once
    assert p.state.datasets["d"].version == 2 and second.key == b"d"
    p.close()
    # an alert that finds no new record stands until one comes, across a restart
    q = _processor(store, spec)
    q.recover(None)  # (a fresh state: the dataset is registered, no record seen yet)
    q.on_batch(_drift_batch("d", 2))
    snap = _snapshot(q.flush())
    assert json.loads(snap)["datasets"]["d"]["drift_alert"].startswith("m v1: mmd")
    q.close()
    r = _processor(store, spec)
    r.recover(snap)
    assert r.state.datasets["d"].drift_alert
    r.on_batch(_batch([_rec("z", dataset="d")], 0))
    [updated] = _by_topic(r.flush())["data.updated"]
    assert updated.key == b"d" and r.state.datasets["d"].drift_alert == ""
    r.close()


def test_a_drift_event_that_is_not_one_is_dead_lettered_and_the_stream_goes_on() -> None:
    p = _processor(FakeStore(), TAB)
    p.recover(None)
    p.on_batch(InBatch.from_values("drift.detected", [0], [0], None, [b"\xff garbage"], None))
    [dead] = _by_topic(p.flush())["data.deadletter"]
    assert dict(dead.headers)["cdl-error"] == b"malformed"
    p.close()


def test_a_replayed_labelled_served_request_is_a_no_op_and_other_duplicates_are_dead_letters() -> None:
    """The monitor sends a labelled served request again after a restart (same ``served-`` id):
    ingest already holds it, so it is counted as replayed, not dead-lettered; a user's record with
    an id the dataset holds is still a ``duplicate_id`` dead letter. On both paths: the fast scan
    (a batch of JSON records) and the careful one (a record it hands over)."""
    p = _processor(FakeStore(), TAB)
    p.recover(None)
    served = [_rec(f"served-req-{i}") for i in range(3)]
    p.on_batch(_batch([*served, _rec("u1")], 0))
    first = _by_topic(p.flush())
    assert "data.deadletter" not in first
    # the replay, in a batch of its own and mixed with a record the careful path takes (a text
    # field this tabular dataset refuses makes the fast path hand the batch over record by record)
    p.on_batch(_batch([*served, _rec("u1")], 4))
    odd = json.dumps({"dataset": "tab", "id": "served-req-0", "features": [1, 2, 3, 4], "label": "a", "n": None})
    p.on_batch(_batch([odd.encode()], 8))
    dead = _by_topic(p.flush()).get("data.deadletter", [])
    reasons = [dict(d.headers)["cdl-reason"] for d in dead]
    assert len(dead) == 1 and reasons[0].startswith(b"duplicate_id"), reasons
    assert sum(s.records for s in p.state.datasets["tab"].shards) == 4  # each record once
    p.close()


def test_tensors_as_bytes_keep_their_dtype_and_bad_bytes_get_reasons() -> None:
    """A tensor given as bytes (JSON ``features_b64``, protobuf ``Tensor.raw``): a uint8 image stays
    uint8; a wrong length, a bad dtype, non-base64 text and NaN bytes are rejected with reasons."""
    import base64

    import numpy as np

    from cdl.v1 import events_pb2

    spec = DatasetSpec(name="img", task=Task.IMAGE, labels=("a", "b"), input_shape=(1, 2, 2), dtype="uint8")
    pixels = np.array([0, 7, 200, 255], dtype=np.uint8)

    def doc(**fields: Any) -> bytes:
        return json.dumps({"dataset": "img", "id": "r", "label": "a", **fields}).encode()

    rec = clean(parse(doc(features_b64=base64.b64encode(pixels.tobytes()).decode()), "application/json"), spec)
    assert rec.x is not None and rec.x.dtype == np.uint8 and rec.x.reshape(-1).tolist() == [0, 7, 200, 255]
    proto = events_pb2.Record(dataset="img", id="p", label="b")
    proto.tensor.raw = pixels.tobytes()
    proto.tensor.shape.extend([1, 2, 2])
    rec = clean(parse(proto.SerializeToString(), "application/protobuf"), spec)
    assert rec.x is not None and rec.x.dtype == np.uint8 and rec.x.reshape(-1).tolist() == [0, 7, 200, 255]
    floats = np.array([0, 1.5, 2, 3], dtype=np.float32).tobytes()
    as_float = doc(features_b64=base64.b64encode(floats).decode(), dtype="float32")
    cases = {
        Reason.BAD_SHAPE: doc(features_b64=base64.b64encode(pixels.tobytes()[:3]).decode()),
        Reason.BAD_DTYPE: as_float,  # 1.5 is no uint8
        Reason.MALFORMED: doc(features_b64="not base64!"),
    }
    for reason, value in cases.items():
        with pytest.raises(RecordError) as err:
            clean(parse(value, "application/json"), spec)
        assert err.value.reason is reason, (reason, err.value)
    nan = np.array([np.nan, 0, 0, 0], dtype=np.float32).tobytes()
    fspec = DatasetSpec(name="img", task=Task.IMAGE, labels=("a", "b"), input_shape=(1, 2, 2))
    with pytest.raises(RecordError) as err:
        clean(parse(doc(features_b64=base64.b64encode(nan).decode()), "application/json"), fspec)
    assert err.value.reason is Reason.NON_FINITE
    # "features" decides when a record has both (as the fast path reads it)
    both = doc(features=[[[1, 2], [3, 4]]], features_b64=base64.b64encode(pixels.tobytes()).decode())
    rec = clean(parse(both, "application/json"), spec)
    assert rec.x is not None and rec.x.reshape(-1).tolist() == [1, 2, 3, 4]
