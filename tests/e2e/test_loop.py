"""The continuous loop end to end, as `scripts/run.sh` runs it: `cdl stack up`
with every built service, a dataset registered with `cdl dataset register`,
records produced to data.raw by a plain Kafka client, and then — by itself —
a dataset version, a trained and gated model, a study of it, its compressed
variants and a Triton repository entry that serves; then labels for served
requests, which the monitor joins: the version's health on model.health, and the
labelled requests back on data.raw."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from confluent_kafka import Producer
from sklearn.datasets import load_digits
from tritonclient.utils import InferenceServerException

from cdl.events import decode
from tests.helpers import IN_CI, read_topic, run_cdl


def test_records_become_a_served_model_by_themselves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state_dir = tmp_path / "stack"
    # the tuner studies the first version beside the trainer: a small study on the 2 cores
    monkeypatch.setenv("CDL_TUNER_N_TRIALS", "4")
    monkeypatch.setenv("CDL_TUNER_MAX_EPOCHS", "3")
    up = run_cdl("stack", "up", state_dir=state_dir)
    if up.returncode != 0 and "run scripts/setup.sh" in up.stdout and not IN_CI:
        pytest.skip(up.stdout)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((state_dir / "stack.json").read_text())
        assert set(state["services"]) == {"ingest", "trainer", "tuner", "compressor", "gateway", "monitor"}
        reg = run_cdl(
            "dataset", "register", "digits", "--task", "image", "--shape", "1,8,8",
            "--labels", ",".join(str(i) for i in range(10)), "--min-new-records", "1500",
            state_dir=state_dir,
        )  # fmt: skip
        assert reg.returncode == 0 and "registered digits" in reg.stdout, reg.stdout + reg.stderr

        digits = load_digits()
        producer = Producer({"bootstrap.servers": state["kafka"]["bootstrap"]})
        for i, (x, y) in enumerate(zip(digits.data, digits.target, strict=True)):
            doc = {"dataset": "digits", "id": f"d{i}", "features": x.tolist(), "label": int(y)}
            producer.produce("data.raw", json.dumps(doc).encode())
        producer.flush()

        bootstrap = state["kafka"]["bootstrap"]
        [compressed] = read_topic(bootstrap, "model.compressed", expected=1, timeout_s=240)
        done = decode(compressed.key, compressed.value, list(compressed.headers.items())).payload
        assert done.ok, done.reason  # type: ignore[attr-defined]
        [trained] = read_topic(bootstrap, "model.trained", expected=1, timeout_s=10)
        verdict = decode(trained.key, trained.value, list(trained.headers.items())).payload
        assert verdict.lineage.dataset_version == 1  # type: ignore[attr-defined]
        assert verdict.metrics["holdout_accuracy"] >= 0.9  # type: ignore[attr-defined]

        # the first version was tuned too, by the stack's tuner on its PostgreSQL
        [tuned] = read_topic(bootstrap, "tuning.completed", expected=1, timeout_s=240)
        study = decode(tuned.key, tuned.value, list(tuned.headers.items())).payload
        assert study.model == "digits" and study.storage.startswith("postgresql")  # type: ignore[attr-defined]
        assert study.trials + study.pruned_trials >= 4  # type: ignore[attr-defined]

        show = run_cdl("dataset", "show", "digits", state_dir=state_dir)
        assert show.returncode == 0 and "latest version" in show.stdout

        # the gateway rolled the first version out by itself: clients call the gateway, with the stack's key
        headers = {"authorization": f"Bearer {state['api_key']}"}
        client = tgrpc.InferenceServerClient(state["services"]["gateway"]["grpc"])
        x = digits.data[:64].reshape(-1, 1, 8, 8).astype(np.float32)
        inp = tgrpc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        deadline = time.monotonic() + 60
        while True:
            try:
                result = client.infer("digits", [inp], headers=headers)
                break
            except InferenceServerException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert result.get_response().model_version == "1"
        predicted = result.as_numpy("logits").argmax(1)
        assert (predicted == digits.target[:64]).mean() >= 0.9
        with pytest.raises(InferenceServerException) as denied:  # no key, no answer
            client.infer("digits", [inp])
        assert denied.value.status() == "StatusCode.UNAUTHENTICATED"

        models = run_cdl("models", "--json", state_dir=state_dir)
        assert models.returncode == 0, models.stdout + models.stderr
        assert json.loads(models.stdout)["models"][0]["serving_version"] in ("1", 1)
        sample = tmp_path / "x.json"
        sample.write_text(json.dumps(digits.data[0].tolist()))
        predict = run_cdl("predict", "digits", str(sample), "--json", state_dir=state_dir)
        assert predict.returncode == 0, predict.stdout + predict.stderr
        assert json.loads(predict.stdout)["predictions"][0]["class"] == int(digits.target[0])

        # labels for served requests: the monitor joins them to the gateway's log
        for i in range(30):
            one = tgrpc.InferInput("input", [1, 1, 8, 8], "FP32")
            one.set_data_from_numpy(digits.data[i].reshape(1, 1, 8, 8).astype(np.float32))
            client.infer("digits", [one], headers=headers, request_id=f"e2e-{i}")
            label = {"request_id": f"e2e-{i}", "label": str(digits.target[i])}
            producer.produce("data.feedback", json.dumps(label).encode())
        producer.flush()
        deadline = time.monotonic() + 90
        feedback, correct = 0, 0.0
        while feedback < 30 and time.monotonic() < deadline:
            health = [
                decode(r.key, r.value, list(r.headers.items())).payload
                for r in read_topic(bootstrap, "model.health", 10**6, timeout_s=2)
            ]
            mine = [h for h in health if h.model == "digits" and h.version == 1]  # type: ignore[attr-defined]
            feedback = sum(h.feedback for h in mine)  # type: ignore[attr-defined]
            correct = sum(h.accuracy * h.feedback for h in mine)  # type: ignore[attr-defined]
        assert feedback == 30 and correct / feedback >= 0.9, (feedback, correct)
        served = [r for r in read_topic(bootstrap, "data.raw", 10**6, timeout_s=2) if b'"served-e2e-' in r.value]
        assert len(served) == 30  # the labelled requests, back as training records
        status = run_cdl("status", "--json", state_dir=state_dir)
        assert status.returncode == 0, status.stdout + status.stderr
        assert any(r["model"] == "digits" and r["version"] == 1 for r in json.loads(status.stdout)["health"])
    finally:
        down = run_cdl("stack", "down", "--purge", state_dir=state_dir)
        assert down.returncode == 0, down.stdout
