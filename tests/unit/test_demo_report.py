"""The demo's honest data, its one-shot fault, and the loop report built from events."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from cdl.datasets import holdout_member
from cdl.v1 import events_pb2
from cdl_tools.demo import DIGITS, HOLDOUT_FRACTION, DigitsData
from cdl_tools.report import ClientSample, Freshness, LoopView, freshness, summary, write_report
from services.compressor.faults import failing_onnx, take_fault


def test_every_copy_of_an_image_is_in_the_image_split() -> None:
    data = DigitsData(run_id="t")
    assert 0.15 < data.holdout.mean() < 0.25  # about the holdout fraction
    for wave in (1, 2, 7):
        for j in range(0, len(data), 97):
            rid = data.record_id(wave, j)
            assert holdout_member(DIGITS, rid, HOLDOUT_FRACTION) == bool(data.holdout[j])
            shifted = data.record_id(wave, j, shifted=True)
            assert shifted != rid and holdout_member(DIGITS, shifted, HOLDOUT_FRACTION) == bool(data.holdout[j])
    doc = json.loads(data.record(3, 5, shifted=True))
    assert doc["features"] == [16.0 - v for v in data.x[5]] and doc["label"] == str(data.y[5])
    assert set(data.served()) == set(np.flatnonzero(data.holdout))  # clients send held-out images only


def test_the_failing_entry_loads_and_warms_on_zeros_but_fails_on_real_input() -> None:
    sess = ort.InferenceSession(failing_onnx((1, 8, 8), 10, "input", "logits"))
    out = sess.run(None, {"input": np.zeros((2, 1, 8, 8), np.float32)})[0]
    assert out.shape == (2, 10) and not out.any()
    with pytest.raises(Exception, match=r"(?i)out of bounds|indices"):
        sess.run(None, {"input": np.full((1, 1, 8, 8), 3.0, np.float32)})


def test_a_text_models_failing_entry_takes_token_ids() -> None:
    sess = ort.InferenceSession(failing_onnx((16,), 3, "input", "logits", integer_input=True))
    assert not sess.run(None, {"input": np.zeros((1, 16), np.int64)})[0].any()  # warm-up: empty texts
    with pytest.raises(Exception, match=r"(?i)out of bounds|indices"):
        sess.run(None, {"input": np.arange(16, dtype=np.int64).reshape(1, 16)})


def test_a_fault_is_taken_once(tmp_path: Path) -> None:
    assert take_fault("", "digits", 1) == ""
    assert take_fault(str(tmp_path), "digits", 1) == ""
    (tmp_path / "digits.failing").write_text("x")
    assert take_fault(str(tmp_path), "other", 2) == ""
    assert take_fault(str(tmp_path), "digits", 3) == "failing"
    assert take_fault(str(tmp_path), "digits", 4) == ""
    assert (tmp_path / "digits.failing.taken-v3").exists()
    assert take_fault(str(tmp_path), "digits", 3) == "failing"  # v3's job run again: it keeps its fault


def _ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def _view() -> LoopView:
    v = LoopView(start=1000.0)
    v.versions = [(1010.0, events_pb2.DataUpdated(dataset="digits", version=1, total_records=1797))]
    v.versions.append((1100.0, events_pb2.DataUpdated(dataset="digits", version=2, total_records=3594)))
    for mv, dv, acc in ((1, 1, 0.95), (2, 2, 0.97)):
        t = events_pb2.ModelTrained(model="digits", version=mv, verdict=events_pb2.VERDICT_ACCEPTED)
        t.metrics["holdout_accuracy"] = t.challenger_score = acc
        t.lineage.dataset_version = dv
        t.lineage.duration_s = 10.0
        v.trained[mv] = (1010.0 + 90 * (mv - 1) + 11, t)
        c = events_pb2.ModelCompressed(model="digits", version=mv, ok=True, chosen_variant="int8-static")
        c.variants.add(name="fp32", size_bytes=40000, latency_p50_ms_b32=0.5)
        c.variants.add(name="int8-static", size_bytes=12000, latency_p50_ms_b32=0.3)
        v.compressed[mv] = (1010.0 + 90 * (mv - 1) + 20, c)
        v.compress_s[mv] = 5.0
    promoted, canary = events_pb2.ROLLOUT_STATE_PROMOTED, events_pb2.ROLLOUT_STATE_CANARY
    v.deployed = [
        (1040.0, events_pb2.ModelDeployed(model="digits", version=1, state=promoted, traffic_fraction=1.0)),
        (1125.0, events_pb2.ModelDeployed(model="digits", version=2, state=canary, traffic_fraction=0.1)),
        (1140.0, events_pb2.ModelDeployed(model="digits", version=2, state=promoted, traffic_fraction=1.0)),
    ]
    for k in range(6):
        h = events_pb2.ModelHealth(model="digits", version=1, requests=100, feedback=20, score=0.9)
        h.window_end.CopyFrom(_ts(1050.0 + 10 * k))
        h.drift_statistic, h.drift_threshold = 0.01 * k, 0.03
        h.latency_p50_ms, h.latency_p99_ms = 1.5, 4.0
        v.health.append((1050.0 + 10 * k, h))
    alert = events_pb2.DriftDetected(model="digits", version=1, statistic=0.05, threshold=0.03, dataset="digits")
    alert.window_end.CopyFrom(_ts(1100.0))
    v.alerts.append((1100.0, alert))
    return v


def test_freshness_runs_from_the_firing_record_to_the_first_answer() -> None:
    view = _view()
    # defaults: the version's own event, and its first transition with traffic
    rows = freshness(view, {}, None)
    assert rows == [Freshness(1, 1, 30.0, 10.0, 5.0), Freshness(2, 2, 25.0, 10.0, 5.0)]
    assert rows[0].compute_s == 15.0 and rows[0].other_s == 15.0
    # the demo's: the wave's last record, and the first answer a client saw
    rows = freshness(view, {1: 1005.0}, {1: 1035.0})
    assert rows == [Freshness(1, 1, 30.0, 10.0, 5.0)]  # v2 never answered a client: no row


def test_the_report_has_its_plots_and_a_summary_that_adds_up(tmp_path: Path) -> None:
    view = _view()
    samples = [ClientSample(1050.0 + i, 1 if i < 50 else 2, True, 2.0, i % 10 != 0, i >= 80) for i in range(100)]
    samples.append(ClientSample(1200.0, 0, False, 10.0, False, False))
    path = write_report(view, tmp_path, samples, title="t", notes=["phase stream: v1 serving"])
    for png in ("accuracy", "variants", "freshness", "traffic", "drift"):
        blob = (tmp_path / f"{png}.png").read_bytes()
        assert blob.startswith(b"\x89PNG") and len(blob) > 5000, png
    text = path.read_text()
    assert "![drift](drift.png)" in text and "phase stream: v1 serving" in text and "| v2 | v2 |" in text
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["serving_version"] == 2 and data["dataset_versions"] == [1, 2]
    assert data["client"] == {"requests": 101, "failed": 1, "accuracy_plain": 0.9, "accuracy_shifted": 0.9}
    m1 = data["models"][0]
    assert m1["feedback"] == 120 and m1["feedback_accuracy"] == pytest.approx(0.9) and m1["size_bytes"] == 12000
    assert m1["rollout"] == "promoted" and m1["p99_ms"] == 4.0
    assert data["drift_alerts"] == [{"version": 1, "statistic": 0.05, "threshold": 0.03}]
    assert summary(LoopView(), [], [])["models"] == []  # an empty loop reports, too
