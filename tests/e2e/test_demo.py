"""The continuous loop end to end, as `scripts/run.sh` runs it: `cdl demo`, with no manual
step — stream → version → train (and tune) → compress → serve through the gateway →
feedback → drift → early version → retrain → the new version serves → a faulty candidate
rolled back with no failed client request — then the daily commands against the stack the
demo leaves running (`--keep`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from sklearn.datasets import load_digits
from tritonclient.utils import InferenceServerException

from cdl.events import decode
from tests.helpers import IN_CI, read_topic, run_cdl


def test_the_demo_runs_the_whole_loop_by_itself(tmp_path: Path) -> None:
    state_dir, report = tmp_path / "demo", tmp_path / "report"
    demo = run_cdl(
        "demo", "--keep", "--state-dir", str(state_dir), "--report", str(report), "--duration", "420",
        state_dir=state_dir, timeout=900,
    )  # fmt: skip
    if demo.returncode != 0 and "run scripts/setup.sh" in demo.stdout and not IN_CI:
        pytest.skip(demo.stdout)
    try:
        assert demo.returncode == 0, demo.stdout[-5000:] + demo.stderr[-5000:]
        summary = json.loads((report / "summary.json").read_text())
        phases = summary["phases"]
        assert phases["stream"] == "v1 serving through the gateway", phases
        assert re.fullmatch(r"v\d+ (promoted|rolled_back)", phases["traffic"]), phases
        assert "cut early" in phases["drift"] and "promoted" in phases["drift"], phases
        assert "rolled back: " in phases["bad"] and "candidate errors" in phases["bad"], phases
        assert summary["client"]["failed"] == 0 and summary["client"]["requests"] > 500
        models = {m["version"]: m for m in summary["models"]}
        assert models[1]["holdout_accuracy"] >= 0.9  # on images the model never trained on
        assert models[1]["feedback"] > 0 and models[1]["rollout"] == "promoted"
        # the version answering the drift was trained on the early version and serves the inverted images well
        answer = int(re.search(r"v(\d+) trained on it", phases["drift"]).group(1))  # type: ignore[union-attr]
        assert models[answer]["feedback"] >= 20 and (models[answer]["feedback_accuracy"] or 0) >= 0.6, models
        assert summary["client"]["accuracy_plain"] >= 0.9
        bad = int(re.search(r"v(\d+) rolled back", phases["bad"]).group(1))  # type: ignore[union-attr]
        assert models[bad]["rollout"] == "rolled_back" and summary["serving_version"] != bad
        assert summary["drift_alerts"] and summary["freshness"]
        text = (report / "report.md").read_text()
        for png in ("accuracy", "variants", "freshness", "traffic", "drift"):
            assert f"({png}.png)" in text and (report / f"{png}.png").stat().st_size > 5000

        # the stack the demo left running, through the daily commands
        state = json.loads((state_dir / "stack.json").read_text())
        assert set(state["services"]) == {"ingest", "trainer", "tuner", "compressor", "gateway", "monitor"}
        bootstrap = state["kafka"]["bootstrap"]
        tuned = [
            decode(r.key, r.value, list(r.headers.items())).payload
            for r in read_topic(bootstrap, "tuning.completed", expected=1, timeout_s=10)
        ]
        assert tuned and tuned[0].storage.startswith("postgresql")  # type: ignore[attr-defined]
        datasets = run_cdl("datasets", "--json", state_dir=state_dir)
        assert datasets.returncode == 0, datasets.stdout + datasets.stderr
        [digits_ds] = json.loads(datasets.stdout)["datasets"]
        assert digits_ds["spec"]["name"] == "digits" and int(digits_ds["latest_version"]) >= 3
        show = run_cdl("dataset", "show", "digits", state_dir=state_dir)
        assert show.returncode == 0 and "latest version" in show.stdout
        listed = run_cdl("models", "--json", state_dir=state_dir)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        serving = int(json.loads(listed.stdout)["models"][0]["serving_version"])
        assert serving == summary["serving_version"]

        digits = load_digits()
        sample = tmp_path / "x.json"
        sample.write_text(json.dumps(digits.data[0].tolist()))
        predict = run_cdl("predict", "digits", str(sample), "--json", state_dir=state_dir)
        assert predict.returncode == 0, predict.stdout + predict.stderr
        assert int(json.loads(predict.stdout)["version"]) == serving
        client = tgrpc.InferenceServerClient(state["services"]["gateway"]["grpc"])
        inp = tgrpc.InferInput("input", [1, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(digits.data[:1].reshape(1, 1, 8, 8).astype(np.float32))
        with pytest.raises(InferenceServerException) as denied:  # no key, no answer
            client.infer("digits", [inp])
        assert denied.value.status() == "StatusCode.UNAUTHENTICATED"

        # unknown models and bad input: one line with the status, a non-zero exit
        bad_input = tmp_path / "bad.json"
        bad_input.write_text(json.dumps([1.0] * 5))
        for args, expected in (
            (("predict", "nosuch", str(sample)), "NOT_FOUND"),
            (("predict", "digits", str(bad_input)), "INVALID_ARGUMENT"),
            (("models", "nosuch"), "NOT_FOUND"),
            (("dataset", "show", "nosuch"), "NOT_FOUND"),
            (("approve", "digits", "999"), ""),
            (("report", "nosuch", "--out", str(tmp_path / "none")), "nothing about 'nosuch'"),
        ):
            out = run_cdl(*args, state_dir=state_dir)
            assert out.returncode == 1 and expected in out.stdout, (args, out.stdout, out.stderr)
            assert "Traceback" not in out.stdout + out.stderr and len(out.stdout.strip().splitlines()) <= 2, args

        status = run_cdl("status", "--json", state_dir=state_dir)
        assert status.returncode == 0, status.stdout + status.stderr
        health = json.loads(status.stdout)
        assert any(r["model"] == "digits" and r["version"] == 1 and r["feedback"] for r in health["health"])
        assert any(a["state"].startswith("answered by") for a in health["alerts"])
        served = [r for r in read_topic(bootstrap, "data.raw", 10**6, timeout_s=5) if b'"served-' in r.value]
        assert served  # labelled served requests came back as training records
        # one trace per model version, across the services
        traced = run_cdl("trace", "digits", "1", "--json", state_dir=state_dir)
        assert traced.returncode == 0, traced.stdout + traced.stderr
        spans = json.loads(traced.stdout)["spans"]
        services = {s["service"] for s in spans}
        assert {"cdl-ingest", "cdl-trainer", "cdl-compressor", "cdl-gateway"} <= services, services
        assert any(s["name"] == "gateway rollout promoted" for s in spans), [s["name"] for s in spans]
        tree = run_cdl("trace", "digits", "1", state_dir=state_dir)
        assert tree.returncode == 0 and "ingest dataset version" in tree.stdout
        again = run_cdl("report", "digits", "--out", str(tmp_path / "again"), state_dir=state_dir)
        assert again.returncode == 0, again.stdout + again.stderr
        assert json.loads((tmp_path / "again" / "summary.json").read_text())["serving_version"] == serving
    finally:
        down = run_cdl("stack", "down", "--purge", state_dir=state_dir)
        assert down.returncode == 0, down.stdout
