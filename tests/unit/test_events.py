from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from cdl.errors import DecodeError
from cdl.events import CONTENT_JSON, EVENT_TYPES, Event, decode, encode
from cdl.v1 import events_pb2


def _updated() -> events_pb2.DataUpdated:
    msg = events_pb2.DataUpdated(dataset="digits", version=3, total_records=10, new_records=4)
    msg.label_histogram["0"] = 6
    msg.label_histogram["1"] = 4
    return msg


def test_protobuf_round_trip_keeps_every_attribute() -> None:
    ev = Event(_updated(), source="/cdl/ingest/test", key="digits", time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    key, value, headers = encode(ev)
    names = [h for h, _ in headers]
    assert names == ["ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "content-type", "traceparent"]
    back = decode(key, value, headers)
    assert back.id == ev.id
    assert back.type == "dev.cdl.data.updated.v1"
    assert back.source == "/cdl/ingest/test"
    assert back.time == ev.time
    assert back.traceparent == ev.traceparent
    assert back.key == "digits"
    assert back.payload == ev.payload
    assert dict(headers)["ce_time"] == b"2026-01-02T03:04:05Z"


def test_json_content_type_round_trip() -> None:
    ev = Event(_updated(), source="s", content_type=CONTENT_JSON)
    key, value, headers = encode(ev)
    assert value.startswith(b"{")
    assert decode(key, value, headers).payload == ev.payload


def test_traceparent_is_w3c_and_children_share_the_trace() -> None:
    ev = Event(_updated(), source="s")
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", ev.traceparent)
    child = ev.caused(events_pb2.ModelTrained(model="m", version=1), source="t")
    assert child.traceparent.split("-")[1] == ev.traceparent.split("-")[1]
    assert child.traceparent != ev.traceparent
    assert child.type == "dev.cdl.model.trained.v1"


def test_every_registered_type_maps_back() -> None:
    for ce_type, cls in EVENT_TYPES.items():
        assert Event(cls(), source="s").type == ce_type


@pytest.mark.parametrize(
    ("headers", "value", "reason"),
    [
        ([], b"x", "missing CloudEvents headers"),
        (
            [("ce_id", b"1"), ("ce_type", b"nope"), ("ce_source", b"s"), ("ce_specversion", b"1.0")],
            b"x",
            "unknown ce_type",
        ),
        (
            [("ce_id", b"1"), ("ce_type", b"dev.cdl.data.updated.v1"), ("ce_source", b"s"), ("ce_specversion", b"0.3")],
            b"x",
            "unsupported ce_specversion",
        ),
        (
            [("ce_id", b"1"), ("ce_type", b"dev.cdl.data.updated.v1"), ("ce_source", b"s"), ("ce_specversion", b"1.0")],
            b"\xff\xff\xff",
            "payload is not a valid cdl.v1.DataUpdated",
        ),
        (
            [
                ("ce_id", b"1"),
                ("ce_type", b"dev.cdl.data.updated.v1"),
                ("ce_source", b"s"),
                ("ce_specversion", b"1.0"),
                ("content-type", b"text/csv"),
            ],
            b"a,b",
            "unsupported content-type",
        ),
    ],
)
def test_undecodable_records_say_why(headers: list[tuple[str, bytes]], value: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(None, value, headers)
    assert reason in str(info.value)
