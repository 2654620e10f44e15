"""The monitor's pure parts: health windows, the drift test and tracker, joins, tensors, feedback."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from cdl.errors import DecodeError, InvalidInputError
from cdl.feedback import parse_feedback
from cdl.latency import LatencyHistogram
from cdl.ml.drift import TEXT_BUCKETS, MMDTest, featurize, from_npy, reference_sample, to_npy
from cdl.tensors import first_input, split_bytes
from cdl.v1 import events_pb2
from cdl.v1 import open_inference_pb2 as pb
from services.monitor.drift import DriftTracker
from services.monitor.health import HealthWindow, window_key, window_model, window_start
from services.monitor.join import (
    Outcome,
    PendingLabel,
    Served,
    inputs_rows,
    parse_route,
    record_id,
    route_labels,
    route_logged,
    route_outcomes,
    route_served,
    training_record,
)


def _request(rows: np.ndarray, request_id: str = "r") -> bytes:
    req = pb.ModelInferRequest(model_name="m", id=request_id)
    inp = req.inputs.add()
    inp.name, inp.datatype = "input", "FP32"
    inp.shape.extend(rows.shape)
    req.raw_input_contents.append(rows.astype("<f4").tobytes())
    return bytes(req.SerializeToString())


def _text_request(texts: list[str]) -> bytes:
    req = pb.ModelInferRequest(model_name="t")
    inp = req.inputs.add()
    inp.name, inp.datatype = "text", "BYTES"
    inp.shape.extend([len(texts), 1])
    req.raw_input_contents.append(b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts))
    return bytes(req.SerializeToString())


# --------------------------------------------------------------------------- health


def test_a_health_window_round_trips_and_becomes_its_event() -> None:
    w = HealthWindow("m", 3, window_start(1234.5, 10.0))
    assert w.start == 1230.0 and w.key == window_key("m", 3, 1230.0)
    for ms in (1.0, 2.0, 2.0, 50.0):
        w.served(True, ms)
    w.served(False, 0.5)
    w.labelled(True)
    w.labelled(False)
    w.labelled(True)
    w.drift(0.02, 0.01)
    again = HealthWindow.from_json(json.loads(json.dumps(w.to_json())))
    assert again == w
    msg = again.event(10.0)
    assert (msg.requests, msg.errors, msg.feedback) == (5, 1, 3)
    assert msg.score == pytest.approx(2 / 3) and msg.metric == "accuracy"
    assert 1.8 < msg.latency_p50_ms < 2.2 and 45 < msg.latency_p99_ms < 55  # within the buckets' 4%
    assert msg.window_end.ToSeconds() - msg.window_start.ToSeconds() == 10
    assert (msg.drift_statistic, msg.drift_threshold) == (0.02, 0.01)


def test_latency_histograms_merge_and_keep_sparse_json() -> None:
    a, b = LatencyHistogram(), LatencyHistogram()
    a.add(0.001, 10)
    b.add(0.1, 10)
    a.merge(b)
    assert a.count == 20 and len(a.to_json()) == 2
    assert LatencyHistogram.from_json(a.to_json()).quantile(0.99) == a.quantile(0.99)
    assert LatencyHistogram().quantile(0.5) is None


# --------------------------------------------------------------------------- drift


def test_the_calibrated_test_keeps_its_false_alarm_rate_and_sees_a_shift() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(5000, 8)).astype(np.float32)
    test = MMDTest.calibrate(reference_sample(train, 2000), window=100, alpha=0.05, draws=400)
    same = [test.statistic(rng.normal(size=(100, 8)).astype(np.float32)) > test.threshold for _ in range(200)]
    assert 0.0 <= np.mean(same) <= 0.12  # ~alpha
    shifted = rng.normal(loc=0.7, size=(100, 8)).astype(np.float32)
    assert test.statistic(shifted) > 3 * test.threshold
    with pytest.raises(DecodeError):
        test.statistic(np.zeros((10, 3), np.float32))  # not the reference's features
    with pytest.raises(DecodeError):
        MMDTest.calibrate(train[:150], window=100)  # too few rows for the window


def test_reference_samples_are_bounded_seeded_and_travel_as_npy() -> None:
    x = np.arange(3000 * 4, dtype=np.float32).reshape(3000, 1, 2, 2)
    a, b = reference_sample(x, 500, seed=1), reference_sample(x, 500, seed=1)
    assert a.shape == (500, 4) and np.array_equal(a, b)
    assert reference_sample(x[:10], 500).shape == (10, 4)
    assert np.array_equal(from_npy(to_npy(a)), a)
    with pytest.raises(DecodeError):
        from_npy(b"not npy")


def test_texts_become_hashed_token_counts() -> None:
    rows = featurize(np.array(["Hello hello world", b"world"], dtype=object))
    assert rows.shape == (2, TEXT_BUCKETS)
    assert rows[0].sum() > rows[1].sum() > 0
    assert np.array_equal(featurize(["world"])[0], rows[1])


def test_the_tracker_alerts_once_after_persist_windows_in_a_row() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(2000, 4)).astype(np.float32)
    test = MMDTest.calibrate(ref, window=50, alpha=0.01, draws=300)
    t = DriftTracker(test, persist=3)
    shifted = rng.normal(loc=2.0, size=(50, 4)).astype(np.float32)
    same = rng.normal(size=(50, 4)).astype(np.float32)
    results = [r for rows in (shifted, shifted, same, shifted, shifted) for r in t.add(rows)]
    assert [r.over for r in results] == [True, True, False, True, True] and not any(r.alert for r in results)
    third = t.add(shifted)
    assert [r.alert for r in third] == [True] and t.alerted
    assert not any(r.alert for r in t.add(np.concatenate([shifted] * 4)))  # once per version
    # its state carries over (a restarted monitor does not alert again)
    again = DriftTracker(test, persist=3, state=t.state())
    assert again.alerted and again.windows == t.windows
    # rows that come in pieces fill windows across calls; a row already in the window is skipped
    u = DriftTracker(test, persist=1)
    assert u.add(shifted[:30]) == [] and u.add(shifted[:30]) == [] and u.repeats == 30
    assert len(u.add(shifted[30:50])) == 1  # 30 + 20 distinct rows: a window of 50
    assert u.add(np.zeros((5, 9), np.float32)) == []  # not the reference's features: ignored


# --------------------------------------------------------------------------- joins


def test_a_served_request_round_trips_and_judges_its_label() -> None:
    rec = events_pb2.InferenceLogged(
        request_id="r1", model="m", version=2, inputs_sample=_request(np.ones((1, 4))), predicted_labels=["1", "0"]
    )
    s = Served.from_log(rec, 100.0)
    assert Served.from_bytes(s.to_bytes()) == s
    assert s.correct("b", ["a", "b"]) and not s.correct("a", ["a", "b"])
    assert s.correct("1", [])  # no label names: the index itself
    assert not Served("m", 1, "", 0.0, b"").correct("a", ["a"])  # a failed request is never right
    assert PendingLabel.from_bytes(PendingLabel("x", "d", 5.0).to_bytes()) == PendingLabel("x", "d", 5.0)


def test_a_labelled_request_becomes_one_record_of_the_model_s_dataset() -> None:
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    s = Served("m", 1, "0", 0.0, _request(rows))
    doc = json.loads(training_record(s, "req-7", "b", "tab") or b"")
    assert doc == {"dataset": "tab", "id": record_id("req-7"), "label": "b", "features": [0.0, 1.0, 2.0, 3.0]}
    long_id = record_id("é" * 200)  # 400 bytes: hashed, not cut (two long ids stay two records)
    assert long_id.startswith("served-sha256-") and long_id != record_id("é" * 199 + "e")
    assert len(long_id.encode()) <= 256 and record_id("short") == "served-short"
    text = json.loads(training_record(Served("t", 1, "0", 0.0, _text_request(["a doc"])), "q", "a", "txt") or b"")
    assert text["text"] == "a doc" and "features" not in text
    assert training_record(Served("m", 1, "0", 0.0, b""), "r", "a", "tab") is None  # inputs not logged
    assert training_record(Served("m", 1, "0", 0.0, b"\xff\xff"), "r", "a", "tab") is None  # unreadable
    assert training_record(s, "r", "a", "") is None  # no dataset known
    got = inputs_rows(_request(rows))
    assert isinstance(got, np.ndarray) and got.shape == (2, 4)


def test_first_input_reads_raw_typed_and_bytes_contents_and_refuses_bad_ones() -> None:
    t = first_input(_request(np.ones((3, 2))))
    assert t.datatype == "FP32" and t.shape == (3, 2) and isinstance(t.values, np.ndarray)
    req = pb.ModelInferRequest()
    inp = req.inputs.add()
    inp.name, inp.datatype = "x", "INT64"
    inp.shape.extend([2])
    inp.contents.int64_contents.extend([4, 5])
    typed = first_input(req.SerializeToString()).values
    assert isinstance(typed, np.ndarray) and typed.tolist() == [4, 5]
    assert first_input(_text_request(["a", "bc"])).values == [b"a", b"bc"]
    assert split_bytes(struct.pack("<I", 2) + b"hi") == [b"hi"]
    with pytest.raises(DecodeError):
        split_bytes(struct.pack("<I", 9) + b"hi")
    inp.shape[:] = [3]
    with pytest.raises(DecodeError):
        first_input(req.SerializeToString())  # 2 values for a shape of 3
    with pytest.raises(DecodeError):
        first_input(pb.ModelInferRequest().SerializeToString())  # no inputs
    odd = pb.ModelInferRequest()
    spec = odd.inputs.add()
    spec.name, spec.datatype = "x", "FP32"
    spec.shape.extend([1])
    odd.raw_input_contents.append(b"\x00" * 5)  # not a whole number of floats
    with pytest.raises(DecodeError):
        first_input(odd.SerializeToString())


def test_feedback_parses_for_records_and_for_requests() -> None:
    rec = parse_feedback(json.dumps({"dataset": "d", "record_id": "x", "label": 3}).encode(), "")
    assert (rec.dataset, rec.record_id, rec.label, rec.request_id) == ("d", "x", "3", "")
    req = parse_feedback(json.dumps({"request_id": "r", "label": "a"}).encode(), "application/json")
    assert req.request_id == "r" and not req.record_id
    pbf = events_pb2.Feedback(request_id="r2", label="b").SerializeToString()
    assert parse_feedback(pbf, "application/protobuf").request_id == "r2"
    for bad in (
        b"[1]",
        b"{",
        json.dumps({"label": "a"}).encode(),
        json.dumps({"record_id": "x", "label": "a"}).encode(),
        json.dumps({"request_id": "r", "label": ""}).encode(),
        json.dumps({"request_id": 5, "label": "a"}).encode(),
    ):
        with pytest.raises(InvalidInputError):
            parse_feedback(bad, "")
    with pytest.raises(InvalidInputError):
        parse_feedback(None, "")


def test_route_records_carry_each_kind_whole() -> None:
    """What one monitor routes to another (docs/monitor.md, "Replicas") comes back as it was sent."""
    rec = events_pb2.InferenceLogged(request_id="r1", model="m", version=2, predicted_labels=["1"], latency_ms=3.0)
    [one] = route_logged([rec])
    assert parse_route(one).logged == [rec]
    served = Served("m", 2, "1", 10.5, b"\x00\x01raw", 0.25)
    [one] = route_served([("r1", served)])
    assert parse_route(one).served == [("r1", served)]
    label = PendingLabel("b", "ds", 11.0)
    [one] = route_labels([("r2", label)])
    routed = parse_route(one)
    assert routed.labels == [("r2", label)] and not routed.served and not routed.logged and not routed.outcomes
    outcomes = [Outcome("m", 2, True), Outcome("m", 2, False), Outcome("r", 1, None, 1.5, 2.0)]
    [one] = route_outcomes(outcomes)
    assert parse_route(one).outcomes == outcomes
    assert route_served([]) == []
    for bad in (b"", b"{}", b'{"k": "nope", "e": []}', b'{"k": "served", "e": [["r", {}]]}'):
        with pytest.raises(DecodeError):
            parse_route(bad)


def test_a_large_batch_is_routed_in_records_under_the_size_limit() -> None:
    """A batch's served requests (inputs and all) would outgrow a Kafka record: they are split
    over records of at most the limit, in order, none lost."""
    entries = [(f"r{i}", Served("m", 1, str(i % 10), 1.0, bytes(range(256)) * 4, float(i))) for i in range(3000)]
    records = route_served(entries, max_bytes=64 * 1024)
    assert len(records) > 1 and all(len(r) <= 64 * 1024 for r in records)
    assert [e for r in records for e in parse_route(r).served] == entries
    assert len(route_served(entries)) < len(records)  # (the default limit: 512 KiB)
    # an entry over the limit goes without its inputs (its count and join kept), in a record of its own
    big = events_pb2.InferenceLogged(request_id="x", model="m", inputs_sample=bytes(2000), predicted_labels=["3"])
    [one] = route_logged([big], max_bytes=200)
    assert len(one) <= 200
    [routed] = parse_route(one).logged
    assert routed.request_id == "x" and routed.predicted_labels == ["3"] and not routed.inputs_sample
    [one] = route_served([("y", Served("m", 1, "2", 1.0, bytes(4000), 0.5))], max_bytes=300)
    [(rid, served)] = parse_route(one).served
    assert rid == "y" and served == Served("m", 1, "2", 1.0, b"", 0.5)


def test_an_outcome_counts_in_its_window_as_a_direct_label_would() -> None:
    routed, direct = HealthWindow("m", 1, 0.0), HealthWindow("m", 1, 0.0)
    for outcome in (Outcome("m", 1, True), Outcome("m", 1, False), Outcome("m", 1, True)):
        outcome.count(routed)
    for correct in (True, False, True):
        direct.labelled(correct)
    assert routed.to_json() == direct.to_json()
    assert window_model(window_key("m/x", 1, 20.0)) == "m/x"
