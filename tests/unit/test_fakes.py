"""The shared test doubles (tests/fakes.py) behave as what they stand in for: MemoryStore as
cdl.store.ObjectStore on MinIO, RecordingProducer as cdl.kafka.Producer."""

from __future__ import annotations

import hashlib
import inspect
import json

import pytest

from cdl.errors import NotFoundError, UnavailableError
from cdl.events import Event
from cdl.store import BlobStore, ObjectStore
from cdl.v1 import events_pb2
from tests.fakes import MemoryStore, RecordingProducer

MEMBERS = sorted(n for n in vars(BlobStore) if not n.startswith("_"))


def test_the_protocol_names_what_cdl_calls_and_both_stores_take_the_same_arguments() -> None:
    assert MEMBERS == ["delete", "exists", "folders", "get_bytes", "get_json", "list", "put_bytes", "put_json", "size"]
    for name in MEMBERS:
        protocol = inspect.signature(getattr(BlobStore, name))
        real, fake = inspect.signature(getattr(ObjectStore, name)), inspect.signature(getattr(MemoryStore, name))
        assert list(fake.parameters) == list(real.parameters) == list(protocol.parameters), name
        assert fake == real, name  # the same defaults and annotations


def test_objects_read_back_as_written_and_json_as_object_store_writes_it() -> None:
    store = MemoryStore()
    assert store.put_bytes("cdl-models", "m/1/a.bin", [b"ab", bytearray(b"c"), memoryview(b"d")]) == (
        "s3://cdl-models/m/1/a.bin"
    )
    assert store.get_bytes("cdl-models", "m/1/a.bin") == b"abcd" and store.size("cdl-models", "m/1/a.bin") == 4
    doc = {"b": [1, 2], "a": {"z": None}}
    assert store.put_json("cdl-models", "m/doc.json", doc) == "s3://cdl-models/m/doc.json"
    assert store.get_bytes("cdl-models", "m/doc.json") == json.dumps(doc, indent=2, sort_keys=True).encode()
    assert store.get_json("cdl-models", "m/doc.json") == doc
    store.put_bytes("cdl-models", "m/1/a.bin", b"new")  # a write replaces
    assert store.get_bytes("cdl-models", "m/1/a.bin") == b"new"
    store.delete("cdl-models", "m/1/a.bin")
    store.delete("cdl-models", "m/1/a.bin")  # deleting what is not there is no error (S3's)
    assert not store.exists("cdl-models", "m/1/a.bin")


def test_what_is_missing_raises_what_object_store_raises() -> None:
    store = MemoryStore("cdl-models")
    with pytest.raises(NotFoundError, match="object not found") as exc:
        store.get_bytes("cdl-models", "nope.json")
    assert exc.value.context == {"uri": "s3://cdl-models/nope.json"}
    for call in (lambda: store.get_json("cdl-models", "nope"), lambda: store.size("cdl-models", "nope")):
        with pytest.raises(NotFoundError, match="object not found"):
            call()
    with pytest.raises(NotFoundError, match="object not found"):  # a missing bucket reads as a missing object
        store.get_bytes("cdl-datasets", "x")
    assert not store.exists("cdl-datasets", "x")
    with pytest.raises(NotFoundError, match="bucket not found"):
        store.put_json("cdl-datasets", "x", {})
    listing = store.list("cdl-datasets")  # raises when read, as ObjectStore's generator does
    with pytest.raises(NotFoundError, match="bucket not found"):
        next(listing)
    with pytest.raises(NotFoundError, match="bucket not found"):
        store.folders("cdl-datasets")
    store.ensure_buckets("cdl-datasets")
    assert store.put_json("cdl-datasets", "x", {}) == "s3://cdl-datasets/x"


def test_listings_follow_s3s_prefix_and_delimiter() -> None:
    store = MemoryStore()
    for key in ("m/2/claim.json", "m/10/claim.json", "m/champion.json", "m/claims/d1.json", "mx/a", "n/b"):
        store.put_bytes("cdl-models", key, key.encode())
    assert [o.key for o in store.list("cdl-models", prefix="m/")] == [
        "m/10/claim.json",
        "m/2/claim.json",
        "m/champion.json",
        "m/claims/d1.json",
    ]
    assert [o.key for o in store.list("cdl-models", prefix="m/", recursive=False)] == ["m/champion.json"]
    assert [o.key for o in store.list("cdl-models", prefix="m", recursive=False)] == []
    [info] = store.list("cdl-models", prefix="n/")
    assert (info.bucket, info.size, info.etag, info.uri) == (
        "cdl-models",
        3,
        hashlib.md5(b"n/b").hexdigest(),
        "s3://cdl-models/n/b",
    )
    assert store.folders("cdl-models") == ["m", "mx", "n"]
    assert store.folders("cdl-models", prefix="m/") == ["10", "2", "claims"]
    assert store.folders("cdl-models", prefix="m/10/") == []


def test_a_copy_changes_on_its_own() -> None:
    store = MemoryStore()
    store.put_bytes("cdl-models", "a", b"1")
    copy = store.copy()
    copy.put_bytes("cdl-models", "a", b"2")
    copy.put_bytes("cdl-models", "b", b"3")
    assert store.get_bytes("cdl-models", "a") == b"1" and not store.exists("cdl-models", "b")
    assert copy.get_bytes("cdl-models", "a") == b"2"


def test_the_recording_producer_keeps_records_as_sent_and_reports_deliveries() -> None:
    producer = RecordingProducer()
    event = Event(events_pb2.DataUpdated(dataset="d", version=3), source="/cdl/test", key="d")
    producer.send("data.updated", event)
    producer.send_raw("other", b"v", b"k", [("h", b"1")])
    [sent] = producer.events("data.updated")
    assert (sent.id, sent.key, sent.payload) == (event.id, "d", event.payload)
    assert producer.sent[1] == ("other", b"v", b"k", [("h", b"1")])
    producer.flush()

    failing = RecordingProducer(fail=True)
    reports: list[object] = []
    failing.send_raw("t", b"1", on_delivery=lambda err, record: reports.append(err))
    failing.send_raw("t", b"2")
    with pytest.raises(UnavailableError, match="produce failed") as exc:  # as Producer.flush: its own reports
        failing.flush()
    assert reports == ["MSG_TIMED_OUT"] and exc.value.context == {"errors": ["t: MSG_TIMED_OUT"]}
    failing.flush()  # reported once
