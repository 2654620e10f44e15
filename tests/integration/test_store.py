from __future__ import annotations

import uuid

import pytest

from cdl.errors import NotFoundError
from cdl.store import BUCKETS, ObjectStore, parse_uri


def test_put_get_list_overwrite(object_store: ObjectStore) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    uri = object_store.put_bytes("cdl-datasets", f"{prefix}/shards/a.bin", b"first")
    assert uri == f"s3://cdl-datasets/{prefix}/shards/a.bin"
    assert parse_uri(uri) == ("cdl-datasets", f"{prefix}/shards/a.bin")
    object_store.put_json("cdl-datasets", f"{prefix}/versions/1.json", {"version": 1, "shards": ["a"]})

    assert object_store.get_bytes("cdl-datasets", f"{prefix}/shards/a.bin") == b"first"
    assert object_store.get_json("cdl-datasets", f"{prefix}/versions/1.json") == {"version": 1, "shards": ["a"]}

    listed = sorted(o.key for o in object_store.list("cdl-datasets", prefix=f"{prefix}/"))
    assert listed == [f"{prefix}/shards/a.bin", f"{prefix}/versions/1.json"]

    # overwrite (a replay rewrites the same object)
    object_store.put_bytes("cdl-datasets", f"{prefix}/shards/a.bin", b"second, longer")
    assert object_store.get_bytes("cdl-datasets", f"{prefix}/shards/a.bin") == b"second, longer"
    [info] = [o for o in object_store.list("cdl-datasets", prefix=f"{prefix}/shards/")]
    assert info.size == len(b"second, longer")
    assert object_store.exists("cdl-datasets", f"{prefix}/shards/a.bin")


def test_missing_objects_raise_not_found(object_store: ObjectStore) -> None:
    with pytest.raises(NotFoundError, match="object not found"):
        object_store.get_bytes("cdl-models", f"nope-{uuid.uuid4().hex}")
    assert not object_store.exists("cdl-models", f"nope-{uuid.uuid4().hex}")


def test_writes_to_a_missing_bucket_raise_not_found(object_store: ObjectStore) -> None:
    with pytest.raises(NotFoundError, match="bucket not found"):
        object_store.put_bytes(f"nope-{uuid.uuid4().hex[:8]}", "a.bin", b"x")


def test_large_objects_are_one_put(object_store: ObjectStore) -> None:
    data = bytes(range(256)) * (24 * 2**12)  # 24 MiB: minio-py alone would split it into parts
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    object_store.put_bytes("cdl-datasets", f"{prefix}/big.bin", data)
    [info] = object_store.list("cdl-datasets", prefix=f"{prefix}/")
    assert info.size == len(data)
    assert "-" not in info.etag  # a multipart upload's ETag ends in -<number of parts>
    assert object_store.get_bytes("cdl-datasets", f"{prefix}/big.bin") == data


def test_an_object_may_be_written_in_parts(object_store: ObjectStore) -> None:
    import numpy as np

    big = np.arange(100_000, dtype=np.int64)
    parts = [b"head", memoryview(big).cast("B"), bytearray(b"tail"), b""]
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    object_store.put_bytes("cdl-datasets", f"{prefix}/parts.bin", parts)
    assert object_store.get_bytes("cdl-datasets", f"{prefix}/parts.bin") == b"head" + big.tobytes() + b"tail"


def test_the_stack_created_the_layout_buckets(object_store: ObjectStore) -> None:
    for bucket in BUCKETS:
        assert object_store.client.bucket_exists(bucket)


def test_provision_creates_the_buckets_and_missing_topics_once(object_store: ObjectStore, kafka_bootstrap: str) -> None:
    from cdl.events import Topics
    from cdl.kafka import topic_partitions
    from cdl.provision import provision

    own, compacted = f"test.provision.{uuid.uuid4().hex[:8]}", f"test.provision-state.{uuid.uuid4().hex[:8]}"
    created = provision(
        kafka_bootstrap,
        object_store,
        {own: 2, compacted: 1, Topics.DATA_RAW: 1},  # cdl's own topic keeps cdl's count
        {compacted: {"cleanup.policy": "compact"}},
    )
    assert set(created) == {own, compacted}  # data.raw: the session's stack created it already
    assert topic_partitions(kafka_bootstrap, own) == 2
    assert topic_partitions(kafka_bootstrap, Topics.DATA_RAW) == Topics.PARTITIONS[Topics.DATA_RAW]
    assert not any(object_store.exists(b, "no-such-key") for b in BUCKETS)  # every bucket is there to ask
    assert provision(kafka_bootstrap, object_store, {own: 2}) == []  # idempotent
