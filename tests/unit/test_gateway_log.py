"""The gateway's inference log (services/gateway/inference_log.py) with a fake producer.

Records are built from real ``ModelInferRequest`` / ``ModelInferResponse`` bytes and read back
through ``cdl.events.decode`` as the monitor reads them; sampling, the bounded queue (drops
counted while the producer is stuck) and unacknowledged records are checked.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from cdl.errors import InvalidInputError
from cdl.events import Event, decode, encode
from cdl.v1 import events_pb2
from cdl.v1 import open_inference_pb2 as pb
from services.gateway.inference_log import LOG_DROPPED, HttpExchange, InferenceLog, build_record, top_labels
from tests.fakes import RecordingProducer
from tests.helpers import wait_for


def _request(x: np.ndarray[Any, Any], request_id: str = "r1") -> bytes:
    req = pb.ModelInferRequest(model_name="affine", model_version="2", id=request_id)
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.astype("<f4").tobytes())
    return req.SerializeToString()


def _response(y: np.ndarray[Any, Any], datatype: str = "FP32", request_id: str = "r1") -> bytes:
    resp = pb.ModelInferResponse(model_name="affine", model_version="2", id=request_id)
    resp.outputs.add(name="output", datatype=datatype, shape=list(y.shape))
    resp.raw_output_contents.append(y.tobytes())
    return resp.SerializeToString()


def _wait(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    wait_for(cond, timeout_s, interval_s=0.005)


def _dropped(reason: str) -> float:
    return float(LOG_DROPPED.labels(reason=reason)._value.get())


def test_top_labels_of_a_real_response() -> None:
    y = np.array([[0.1, 0.7, 0.2], [3.0, -1.0, 2.5]], dtype="<f4")
    labels, scores = top_labels(_response(y)) or ([], [])
    assert labels == [1, 0]
    assert scores == pytest.approx([0.7, 3.0])
    # other numeric datatypes; a 1-d output is one row
    assert top_labels(_response(np.array([1, 9, 3], dtype="<i8"), "INT64")) == ([1], [9.0])
    assert top_labels(_response(np.array([[1, 2], [5, 0]], dtype="<f8"), "FP64")) == ([1, 0], [2.0, 5.0])
    assert top_labels(_response(np.array([[0.5, 0.25]], dtype="<f2"), "FP16")) == ([0], [0.5])
    # nothing numeric to decode
    assert top_labels(_response(np.array([1, 2], dtype="<f4"), "BYTES")) is None
    assert top_labels(pb.ModelInferResponse(model_name="m").SerializeToString()) is None
    assert top_labels(b"\x0a\x05ab") is None  # malformed
    odd = pb.ModelInferResponse()
    odd.outputs.add(name="o", datatype="FP32", shape=[2, 3])
    odd.raw_output_contents.append(b"\x00" * 7)  # not whole floats
    assert top_labels(odd.SerializeToString()) is None


def _numpy_top(y: np.ndarray[Any, Any]) -> tuple[list[int], list[float]]:
    rows = y.reshape(-1, y.shape[-1])
    idx = rows.argmax(axis=1)
    return [int(i) for i in idx], [float(rows[r, i]) for r, i in enumerate(idx)]


@pytest.mark.parametrize("dtype,datatype", [("<f4", "FP32"), ("<f8", "FP64"), ("<i4", "INT32"), ("<i8", "INT64")])
def test_top_labels_small_outputs_match_numpy(dtype: str, datatype: str) -> None:
    # the pure-Python path for small outputs answers what numpy's argmax answers: the first maximum
    rng = np.random.default_rng(3)
    cases = [rng.normal(size=(4, 10)) * 10, np.array([[1.0, 3.0, 3.0, 2.0]]), np.array([[5.0, 5.0]]), np.zeros((2, 3))]
    if datatype.startswith("FP"):
        cases += [
            np.array([[0.0, -0.0], [-0.0, 0.0]]),
            np.array([[1.0, np.nan, 2.0], [np.nan, 0.0, 1.0]]),
            np.array([[np.inf, -np.inf, 1.0], [-np.inf, -np.inf, -np.inf]]),
            rng.normal(size=(1, 300)),  # past the small path: numpy
        ]
    for case in cases:
        y = case.astype(dtype)
        got = top_labels(_response(y, datatype))
        assert got is not None
        want = _numpy_top(y)
        assert got[0] == want[0], y
        np.testing.assert_array_equal(np.array(got[1]), np.array(want[1]))
        assert [np.signbit(v) for v in got[1]] == [np.signbit(v) for v in want[1]]


def test_top_labels_and_digest_of_bytes_the_parser_refuses() -> None:
    # a response whose first output is well-formed but whose tail is not: the wire scan's answer
    y = np.array([[0.1, 0.9]], dtype="<f4")
    bad_tail = _response(y) + b"\x2a\x05\x0a"  # an output cut short
    assert top_labels(bad_tail) == top_labels(_response(y))
    # a request with an input name that is not UTF-8 (the parser refuses it; the scan skips it)
    x = np.ones((1, 2), dtype="<f4")
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 2])
    req.raw_input_contents.append(x.tobytes())
    data = req.SerializeToString().replace(b"input", b"inp\xffx")
    with pytest.raises(DecodeError):
        pb.ModelInferRequest.FromString(data)
    rec = build_record(("m", 1, "r", data, b"", 0.0, "OK", 0.0), 0)
    assert rec.inputs_digest == hashlib.sha256(x.tobytes()).hexdigest()


def test_event_ids_are_uuid4_and_traceparents() -> None:
    import re
    import uuid

    from services.gateway.inference_log import _ids

    seen = set()
    entropy = __import__("os").urandom(40 * 200).hex()
    for i in range(200):
        event_id, trace = _ids(entropy, i * 80)
        u = uuid.UUID(event_id)
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == event_id
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", trace)
        seen.add(event_id)
    assert len(seen) == 200


def test_record_fields() -> None:
    x = np.arange(8, dtype="<f4").reshape(2, 4)
    request = _request(x)
    response = _response(np.array([[0.0, 1.0], [2.0, 1.0]], dtype="<f4"))
    rec = build_record(("affine", 2, "r1", request, response, 0.0025, "OK", 1_700_000_000.5), 4096)
    assert rec.request_id == "r1" and rec.model == "affine" and rec.version == 2
    assert rec.inputs_digest == hashlib.sha256(x.tobytes()).hexdigest()
    assert rec.inputs_sample == request  # a self-describing ModelInferRequest
    sample = pb.ModelInferRequest.FromString(rec.inputs_sample)
    assert np.frombuffer(sample.raw_input_contents[0], "<f4").reshape(tuple(sample.inputs[0].shape)).tolist() == (
        x.tolist()
    )
    assert list(rec.predicted_labels) == ["1", "0"] and list(rec.scores) == [1.0, 2.0]
    assert rec.status == "OK"
    assert rec.latency_ms == pytest.approx(2.5)
    assert rec.time.seconds == 1_700_000_000 and rec.time.nanos == 500_000_000
    # large inputs: only the digest
    big = build_record(("affine", 2, "r2", request, response, 0.001, "OK", 0.0), len(request) - 1)
    assert big.inputs_sample == b"" and big.inputs_digest == rec.inputs_digest
    # a failed request has no predicted labels
    failed = build_record(("affine", 2, "r3", request, b"", 0.001, "UNAVAILABLE", 0.0), 4096)
    assert list(failed.predicted_labels) == [] and list(failed.scores) == []
    assert failed.status == "UNAVAILABLE"
    # typed contents (no raw inputs): the digest is of the whole request
    typed = pb.ModelInferRequest(model_name="affine")
    typed.inputs.add(name="input", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    data = typed.SerializeToString()
    assert build_record(("affine", 1, "", data, b"", 0, "OK", 0), 0).inputs_digest == hashlib.sha256(data).hexdigest()


def test_a_rest_exchange_is_logged_as_the_grpc_request_it_stands_for() -> None:
    """What the native lane served over REST (JSON or binary bodies) is read back in the log's
    thread into the same record as the gRPC request; bodies that are not read back raise."""
    x = np.arange(8, dtype="<f4").reshape(2, 4)
    y = np.array([[0.0, 1.0], [2.0, 1.0]], dtype="<f4")
    grpc_rec = build_record(("affine", 2, "r1", _request(x), _response(y), 0.002, "OK", 5.0), 4096)
    head = {"id": "r1", "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32"}]}
    answer = {"id": "r1", "model_name": "affine", "model_version": "2",
              "outputs": [{"name": "output", "shape": [2, 2], "datatype": "FP32"}]}  # fmt: skip
    json_req = json.dumps(head | {"inputs": [head["inputs"][0] | {"data": x.ravel().tolist()}]}).encode()
    json_resp = json.dumps(answer | {"outputs": [answer["outputs"][0] | {"data": y.ravel().tolist()}]}).encode()
    bin_head = json.dumps(
        head | {"inputs": [head["inputs"][0] | {"parameters": {"binary_data_size": x.nbytes}}]}
    ).encode()
    bin_resp = json.dumps(
        answer | {"outputs": [answer["outputs"][0] | {"parameters": {"binary_data_size": y.nbytes}}]}
    ).encode()
    for exchange in (
        HttpExchange(json_req, json_resp, None, None),
        HttpExchange(bin_head + x.tobytes(), bin_resp + y.tobytes(), len(bin_head), len(bin_resp)),
    ):
        rec = build_record(("affine", 2, "r1", exchange, b"", 0.002, "OK", 5.0), 4096)
        assert rec.inputs_digest == grpc_rec.inputs_digest
        assert list(rec.predicted_labels) == list(grpc_rec.predicted_labels) == ["1", "0"]
        assert list(rec.scores) == list(grpc_rec.scores)
        sample = pb.ModelInferRequest.FromString(rec.inputs_sample)
        assert sample.id == "r1" and sample.raw_input_contents[0] == x.tobytes()
    with pytest.raises(InvalidInputError):
        build_record(("affine", 2, "r1", HttpExchange(b"{", b"{}", None, None), b"", 0.0, "OK", 0.0), 4096)


def test_no_producer_means_off() -> None:
    logger = InferenceLog(None, "inference.logged")
    assert not logger.enabled
    logger.offer("m", 1, "r", b"x", b"y", 0.001, "OK")
    assert logger.pending() == 0
    logger.close()


def test_records_reach_the_producer_as_events() -> None:
    producer = RecordingProducer()
    logger = InferenceLog(producer, "inference.logged", source="/cdl/gateway/test")
    x = np.ones((1, 4), dtype="<f4")
    y = np.array([[0.0, 0.0, 5.0]], dtype="<f4")
    for i in range(20):
        logger.offer("affine", 2, f"r{i}", _request(x, f"r{i}"), _response(y, request_id=f"r{i}"), 0.001, "OK")
    _wait(lambda: len(producer.sent) == 20)
    logger.close()
    topic, value, key, headers = producer.sent[0]
    assert topic == "inference.logged" and key == b"affine"  # keyed by model, as a batch is
    event = decode(key, value, headers)
    assert event.type == "dev.cdl.inference.logged.v1" and event.source == "/cdl/gateway/test"
    assert isinstance(event.payload, events_pb2.InferenceLogged)
    assert event.payload.request_id == "r0" and list(event.payload.predicted_labels) == ["2"]
    # the headers are encode()'s: the same names, and ce_time is when the answer was sent
    assert {k for k, _ in headers} == {k for k, _ in encode(Event(event.payload, source="/x"))[2]}
    sent_at = event.payload.time.ToNanoseconds() / 1e9
    assert abs(event.time.timestamp() - sent_at) < 1e-5 and event.time.tzinfo is not None
    assert len({decode(k, v, h).id for _, v, k, h in producer.sent}) == 20  # one id each
    assert [decode(k, v, h).payload.request_id for _, v, k, h in producer.sent] == [f"r{i}" for i in range(20)]  # type: ignore[attr-defined]


def test_a_round_s_requests_go_out_in_batches_of_a_model_version_keyed_by_model() -> None:
    """With ``records_per_batch`` (the gateway's ``log_batch``), a round's requests of one model
    version travel together, that many at most in a record, in the order they were answered."""
    producer = RecordingProducer()
    logger = InferenceLog(producer, "inference.logged", source="/cdl/gateway/test", records_per_batch=8, batch=100)
    x = np.ones((1, 4), dtype="<f4")
    y = np.array([[0.0, 5.0, 0.0]], dtype="<f4")
    offered = [("a", 1)] * 12 + [("b", 3)] * 5 + [("a", 2)] * 3
    for i, (model, version) in enumerate(offered):
        logger.offer(model, version, f"r{i}", _request(x, f"r{i}"), _response(y, request_id=f"r{i}"), 0.001, "OK")
    _wait(lambda: sum(len(decode(k, v, h).payload.records) for _, v, k, h in producer.sent) == 20)  # type: ignore[attr-defined]
    logger.close()
    events = [decode(k, v, h) for _, v, k, h in producer.sent]
    assert {e.type for e in events} == {"dev.cdl.inference.logged.batch.v1"}
    batches = [
        (k, [(r.model, r.version, r.request_id) for r in e.payload.records])
        for (_, _, k, _), e in zip(producer.sent, events, strict=True)
    ]  # type: ignore[attr-defined]
    assert all(len(recs) <= 8 and {m for m, _, _ in recs} == {k.decode()} for k, recs in batches)
    assert all(len({v for _, v, _ in recs}) == 1 for _, recs in batches)  # one version a batch
    by_version: dict[tuple[str, int], list[str]] = {}
    for _, recs in batches:
        for m, v, rid in recs:
            by_version.setdefault((m, v), []).append(rid)
    assert by_version == {
        ("a", 1): [f"r{i}" for i in range(12)],
        ("b", 3): [f"r{i}" for i in range(12, 17)],
        ("a", 2): [f"r{i}" for i in range(17, 20)],
    }
    assert all(list(e.payload.records[0].predicted_labels) == ["1"] for e in events)  # type: ignore[attr-defined]
    assert len({e.id for e in events}) == len(events)


def test_sampling_is_even() -> None:
    producer = RecordingProducer()
    logger = InferenceLog(producer, "t", sample=0.25)
    for i in range(100):
        logger.offer("m", 1, str(i), b"", b"", 0.0, "OK")
    _wait(lambda: len(producer.sent) == 25)
    time.sleep(0.05)
    logger.close()
    assert len(producer.sent) == 25
    assert InferenceLog(producer, "t", sample=0.0).enabled is False


def test_full_queue_drops_and_counts_without_blocking() -> None:
    producer = RecordingProducer()
    producer.gate.clear()  # Kafka stuck: the thread blocks in send_raw
    logger = InferenceLog(producer, "t", queue_size=50)
    before = _dropped("full")
    start = time.perf_counter()
    for i in range(1000):
        logger.offer("m", 1, str(i), b"", b"", 0.0, "OK")
    assert time.perf_counter() - start < 0.5  # the hot path never waits for Kafka
    assert logger.pending() <= 50
    # one record may be in the thread's hands, blocked in send_raw
    assert 1000 - 51 <= _dropped("full") - before <= 1000 - 50
    producer.gate.set()
    _wait(lambda: logger.pending() == 0)
    logger.close()
    assert 50 <= len(producer.sent) <= 51


def test_unacknowledged_records_are_counted() -> None:
    producer = RecordingProducer(fail=True)
    logger = InferenceLog(producer, "t")
    before = _dropped("kafka")
    for i in range(10):
        logger.offer("m", 1, str(i), b"", b"", 0.0, "OK")
    _wait(lambda: _dropped("kafka") - before == 10)
    logger.close()


def test_a_bad_record_does_not_stop_the_log() -> None:
    producer = RecordingProducer()
    logger = InferenceLog(producer, "t")
    logger.offer("m", 1, "bad", b"\x0a\x05ab", b"\xff\xff", 0.0, "OK")  # malformed bytes: still logged
    logger.offer("m", 1, "\udfff", b"", b"", 0.0, "OK")  # not encodable: dropped, counted
    logger.offer("m", 1, "good", b"", b"", 0.0, "OK")
    _wait(lambda: len(producer.sent) == 2)
    logger.close()
    assert [decode(s[2], s[1], s[3]).payload.request_id for s in producer.sent] == ["bad", "good"]  # type: ignore[attr-defined]
