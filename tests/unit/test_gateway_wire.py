"""The gateway's wire-format scan (services/gateway/dataplane/wire.py) against protobuf's own parser.

Generated requests -- real ``ModelInferRequest`` messages with random names, versions, ids,
inputs, parameters and raw contents, several serializations concatenated (protobuf merges
them: the last scalar wins), unknown fields of every wire type, groups -- and generated
garbage -- random bytes, truncations and byte flips of real requests, token streams with
overlong varints, bad wire types, field number 0, huge lengths, unbalanced groups -- are read
by the scan and by the generated parser (upb): where the parser accepts the bytes the scan
must read the same fields; where the scan refuses them (always with ``InvalidInputError``)
the parser must refuse them too. For the metadata requests (no nested messages) the scan
refuses exactly what the parser refuses. The generation is deterministic (derandomized, no
example database).
"""

from __future__ import annotations

import random

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdl.errors import InvalidInputError
from cdl.v1 import open_inference_pb2 as pb
from services.gateway.dataplane import wire

FUZZ = settings(
    max_examples=600,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _parsed(data: bytes) -> pb.ModelInferRequest | None:
    msg = pb.ModelInferRequest()
    try:
        msg.ParseFromString(data)
    except DecodeError:
        return None
    return msg


def _check_infer(data: bytes) -> None:
    """The property: agreement where protobuf accepts, refusal only where protobuf refuses."""
    msg = _parsed(data)
    try:
        got = wire.route_fields(data)
    except InvalidInputError:
        assert msg is None, f"scan refused bytes protobuf accepts: {data!r}"
        return
    if msg is not None:
        assert got == (msg.model_name, msg.model_version, msg.id), data
        metas = wire.inputs(data)
        assert [(m.name, m.datatype, m.shape) for m in metas] == [
            (t.name, t.datatype, tuple(t.shape)) for t in msg.inputs
        ]
        raw = [len(r) for r in msg.raw_input_contents]
        assert [m.raw_len for m in metas] == [raw[i] if i < len(raw) else None for i in range(len(metas))]
        assert [m.has_contents for m in metas] == [t.HasField("contents") for t in msg.inputs]


# --------------------------------------------------------------------------- strategies

_text = st.text(max_size=12)
_names = st.one_of(_text, st.sampled_from(["digits", "input", "FP32", "", "ünï©ødé", "a" * 300]))
_int64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
_dtypes = st.sampled_from(["FP32", "FP16", "INT64", "BYTES", "BOOL", "UINT8", "", "fp32", "X"])


@st.composite
def _param(draw: st.DrawFn) -> pb.InferParameter:
    p = pb.InferParameter()
    kind = draw(st.integers(0, 3))
    if kind == 0:
        p.bool_param = draw(st.booleans())
    elif kind == 1:
        p.int64_param = draw(_int64)
    elif kind == 2:
        p.string_param = draw(_text)
    return p


@st.composite
def _requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=draw(_names), model_version=draw(_names), id=draw(_names))
    for key in draw(st.lists(_text, max_size=2)):
        req.parameters[key].CopyFrom(draw(_param()))
    for _ in range(draw(st.integers(0, 3))):
        t = req.inputs.add(name=draw(_names), datatype=draw(_dtypes), shape=draw(st.lists(_int64, max_size=4)))
        if draw(st.booleans()):
            t.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32, allow_nan=False), max_size=4)))
            t.contents.int64_contents.extend(draw(st.lists(_int64, max_size=3)))
        if draw(st.booleans()):
            t.parameters["shared_memory_region"].string_param = draw(_text)
    for _ in range(draw(st.integers(0, 2))):
        req.outputs.add(name=draw(_names))
    for _ in range(draw(st.integers(0, 4))):
        req.raw_input_contents.append(draw(st.binary(max_size=64)))
    return req


@st.composite
def _unknown_field(draw: st.DrawFn) -> bytes:
    """A well-formed field the message does not know (or a known number with another wire type)."""
    field = draw(st.one_of(st.integers(1, 20), st.integers(1, (1 << 29) - 1)))
    wire_type = draw(st.sampled_from([0, 1, 2, 5, 3]))
    if wire_type == 2 and field <= 7:
        field += 8  # a known number with wire type 2 is that field, not an unknown one
    tag = _varint(field << 3 | wire_type)
    if wire_type == 0:
        return tag + _varint(draw(st.integers(0, (1 << 64) - 1)))
    if wire_type == 1:
        return tag + draw(st.binary(min_size=8, max_size=8))
    if wire_type == 5:
        return tag + draw(st.binary(min_size=4, max_size=4))
    if wire_type == 2:
        body = draw(st.binary(max_size=20))
        return tag + _varint(len(body)) + body
    inner = b"".join(draw(st.lists(_unknown_field_flat(), max_size=3)))
    return tag + inner + _varint(field << 3 | 4)


@st.composite
def _unknown_field_flat(draw: st.DrawFn) -> bytes:
    field = draw(st.integers(1, 1000))
    body = draw(st.binary(max_size=8))
    return _varint(field << 3 | 2) + _varint(len(body)) + body


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    """Several requests' bytes concatenated with unknown fields between them."""
    parts: list[bytes] = []
    for _ in range(draw(st.integers(1, 3))):
        parts.append(draw(_requests()).SerializeToString())
        parts.extend(draw(st.lists(_unknown_field(), max_size=2)))
    return b"".join(parts)


@st.composite
def _tokens(draw: st.DrawFn) -> bytes:
    """Framing-level garbage: fields whose tags, lengths and varints are often wrong."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 8))):
        field = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 15, 16, 2047, (1 << 29) - 1, 1 << 29]))
        wire_type = draw(st.integers(0, 7))
        tag = field << 3 | wire_type
        tag_bytes = _varint(tag)
        style = draw(st.integers(0, 4))
        if style == 1:  # non-minimal tag
            tag_bytes = bytes(b | 0x80 for b in tag_bytes) + b"\x00"
        elif style == 2:  # overlong tag
            tag_bytes = bytes(b | 0x80 for b in tag_bytes) + b"\x80" * draw(st.integers(1, 6)) + b"\x00"
        out += tag_bytes
        kind = draw(st.integers(0, 5))
        if kind == 0:  # a length, right or wrong, with a body
            body = draw(st.binary(max_size=10))
            n = draw(st.one_of(st.just(len(body)), st.integers(0, 1 << 35)))
            out += _varint(n) + body
        elif kind == 1:  # a varint, maybe overlong or unterminated
            out += draw(st.binary(max_size=11).map(lambda b: bytes(x | 0x80 for x in b))) + draw(
                st.sampled_from([b"", b"\x00", b"\x01", b"\x7f"])
            )
        elif kind == 2:
            out += draw(st.binary(max_size=9))
        elif kind == 3:
            body = draw(
                st.sampled_from(["digits", "1", "\udfff", "é"]).map(lambda s: s.encode("utf-8", "surrogatepass"))
            )
            out += _varint(len(body)) + body
        elif kind == 4:  # a group's end, matching or not
            out += _varint(draw(st.sampled_from([field, field + 1, 0])) << 3 | 4)
    return bytes(out)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(_messages()))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.integers(0, 3))
        if op == 0:
            data[i] = draw(st.integers(0, 255))
        elif op == 1:
            del data[i:]
        elif op == 2:
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[i]
    return bytes(data)


# --------------------------------------------------------------------------- properties


@FUZZ
@given(data=_messages())
def test_valid_messages_read_as_protobuf_reads_them(data: bytes) -> None:
    msg = _parsed(data)
    assert msg is not None
    assert wire.route_fields(data) == (msg.model_name, msg.model_version, msg.id)
    _check_infer(data)


@FUZZ
@given(data=st.one_of(st.binary(max_size=64), _tokens(), _mutated()))
def test_garbage_is_refused_only_when_protobuf_refuses_it(data: bytes) -> None:
    _check_infer(data)


@FUZZ
@given(data=st.one_of(_tokens(), _mutated(), st.binary(max_size=32)))
def test_metadata_requests_refused_exactly_when_protobuf_refuses(data: bytes) -> None:
    for cls in (pb.ModelReadyRequest, pb.ModelMetadataRequest):
        msg = cls()
        try:
            msg.ParseFromString(data)
            expected: tuple[str, str] | None = (msg.name, msg.version)
        except DecodeError:
            expected = None
        try:
            got: tuple[str, str] | None = wire.name_version(data)
        except InvalidInputError:
            got = None
        assert got == expected, data


@FUZZ
@given(
    data=_messages(),
    version=st.one_of(st.none(), _names),
    request_id=st.one_of(st.none(), _names),
)
def test_appended_fields_win_and_change_nothing_else(data: bytes, version: str | None, request_id: str | None) -> None:
    before = _parsed(data)
    assert before is not None
    out = wire.with_fields(data, version=version, request_id=request_id)
    after = _parsed(out)
    assert after is not None
    if version is not None:
        before.model_version = version
    if request_id is not None:
        before.id = request_id
    assert after == before
    assert wire.route_fields(out) == (after.model_name, after.model_version, after.id)


def test_seeded_mutation_corpus() -> None:
    """Ten thousand single-byte edits of a real request, every position and value class."""
    req = pb.ModelInferRequest(model_name="digits", model_version="3", id="req-1")
    t = req.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    t.parameters["binary_data_size"].int64_param = 256
    req.outputs.add(name="output")
    req.raw_input_contents.append(bytes(range(256)))
    base = req.SerializeToString()
    rng = random.Random(12)
    for _ in range(10_000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.choice([0, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        _check_infer(bytes(data[: rng.randint(0, len(data))] if rng.random() < 0.2 else data))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x0a\x05abc", "length past the end"),
        (b"\x0a", "truncated varint"),
        (b"\x08" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
        (b"\x8a\x80\x80\x80\x80\x00\x01a", "tag longer than 5 bytes"),
        (b"\x80\x80\x80\x80\x10\x00", "tag out of range"),
        (b"\x02\x00", "field number 0"),
        (b"\x0e", "invalid wire type 6"),
        (b"\x0c", "end-group tag without a group"),
        (b"\x0b\x14", "does not match"),
        (b"\x0b", "unterminated group"),
        (b"\x0b" * 101 + b"\x0c" * 101, "nested too deeply"),
        (b"\x0d\x00\x00", "truncated fixed-width"),
        (b"\x0a\x01\xff", "not valid UTF-8"),
    ],
)
def test_malformed_framing_says_why(data: bytes, reason: str) -> None:
    assert _parsed(data) is None
    with pytest.raises(InvalidInputError, match=reason) as err:
        wire.route_fields(data)
    assert err.value.grpc_code == "INVALID_ARGUMENT"


def test_edges_protobuf_accepts() -> None:
    for data in [
        b"",
        b"\x0a\x01a\x0a\x01b",  # the last occurrence wins
        b"\x08\x05\x0a\x01a",  # field 1 as a varint: an unknown field
        b"\x8a\x80\x80\x80\x00\x01a",  # 5-byte tag
        b"\x0a\x81\x80\x80\x80\x80\x80\x80\x80\x80\x00a",  # 10-byte length
        b"\x0a\x81" + b"\x80" * 8 + b"\x02" + b"a",  # a length that wraps at 64 bits
        b"\x0b" * 100 + b"\x0c" * 100,  # groups at protobuf's nesting limit
        b"\x0b\x0a\x01a\x0c\x0a\x01z",  # a group holding a field 1 (skipped, not read)
        b"\xf8\xff\xff\xff\x0f\x00",  # the largest field number
    ]:
        msg = _parsed(data)
        assert msg is not None
        assert wire.route_fields(data) == (msg.model_name, msg.model_version, msg.id)


def test_inputs_of_a_tritonclient_request() -> None:
    import numpy as np
    import tritonclient.grpc as tgrpc
    from tritonclient.grpc import service_pb2

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    inp = tgrpc.InferInput("input", [3, 4], "FP32")
    inp.set_data_from_numpy(x)
    flag = tgrpc.InferInput("flag", [1], "BOOL")
    flag.set_data_from_numpy(np.array([True]))
    req = service_pb2.ModelInferRequest(model_name="affine", id="r1")
    req.inputs.extend([inp._get_tensor(), flag._get_tensor()])
    req.raw_input_contents.extend([inp._get_content(), flag._get_content()])
    data = req.SerializeToString()
    assert wire.route_fields(data) == ("affine", "", "r1")
    assert wire.inputs(data) == [
        wire.InputMeta("input", "FP32", (3, 4), 48, False),
        wire.InputMeta("flag", "BOOL", (1,), 1, False),
    ]
    out = wire.with_fields(data, version="2", request_id="gw-1")
    assert wire.route_fields(out) == ("affine", "2", "gw-1")
    assert wire.name_version(pb.ModelReadyRequest(name="affine", version="7").SerializeToString()) == ("affine", "7")


def test_input_problem() -> None:
    def req(shape: list[int], raw: int | None, datatype: str = "FP32") -> bytes:
        r = pb.ModelInferRequest(model_name="m")
        r.inputs.add(name="x", datatype=datatype, shape=shape)
        if raw is not None:
            r.raw_input_contents.append(b"\0" * raw)
        return r.SerializeToString()

    assert wire.input_problem(req([2, 4], 32)) is None
    assert wire.input_problem(req([2, 4], None)) is None  # typed contents or missing: Triton's to judge
    assert wire.input_problem(req([3], 5, "BYTES")) is None  # variable size
    assert wire.input_problem(req([0, 4], 0)) is None
    assert "negative dimension" in (wire.input_problem(req([-1, 4], 16)) or "")
    assert "makes 68719476736 bytes" in (wire.input_problem(req([1 << 32, 4], 16)) or "")
    assert "raw contents have 12" in (wire.input_problem(req([1, 4], 12)) or "")
    assert "INT64" in (wire.input_problem(req([1, 4], 16, "INT64")) or "")
    assert "malformed" in (wire.input_problem(b"\x2a\x05") or "")
