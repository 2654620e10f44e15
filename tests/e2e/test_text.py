"""The second use case end to end: text classification through the same loop. Docstring
paragraphs of installed packages (cdl_tools/textdata.py), registered with `cdl dataset register
--task text`, produced with `cdl produce`; by itself a version, a trained text model, its
compressed variants and a Triton entry that takes texts; clients send texts through the
gateway, and the monitor watches the version like any other."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from cdl.datasets import holdout_member
from cdl.events import decode
from cdl_tools.stack import use_stack_identity
from cdl_tools.textdata import PACKAGES, doc_paragraphs
from tests.helpers import IN_CI, read_topic, run_cdl


def _monitor_diagnosis(state_dir: Path, health: list[Any]) -> str:
    """What the monitor counted and logged, for a failure's message (its stack is purged after)."""
    state = json.loads((state_dir / "stack.json").read_text())
    monitor = state["services"]["monitor"]
    try:
        text = urllib.request.urlopen(f"http://{monitor['metrics']}/metrics", timeout=5).read().decode()
        counted = [
            line
            for line in text.splitlines()
            if line.startswith(("cdl_monitor_feedback_total", "cdl_monitor_events_total"))
        ]
    except OSError as e:
        counted = [f"metrics unreadable: {e}"]
    log = state_dir / "monitor" / "monitor.log"
    tail = log.read_text(errors="replace").splitlines()[-40:] if log.is_file() else ["(no log)"]
    windows = [(h.version, h.requests, h.feedback) for h in health]
    return "\n".join([f"health windows (version, requests, feedback): {windows}", *counted, *tail])


def test_texts_become_a_served_text_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state_dir = tmp_path / "stack"
    monkeypatch.setenv("CDL_STACK_SERVICES", json.dumps(["ingest", "trainer", "compressor", "gateway", "monitor"]))
    monkeypatch.setenv("CDL_COMPRESSOR_LATENCY_RUNS", "30")
    pairs = doc_paragraphs(per_package=400)
    up = run_cdl("stack", "up", state_dir=state_dir)
    if up.returncode != 0 and "run scripts/setup.sh" in up.stdout and not IN_CI:
        pytest.skip(up.stdout)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((state_dir / "stack.json").read_text())
        use_stack_identity(state)  # this process: the stack's admin towards its broker
        reg = run_cdl(
            "dataset", "register", "docs", "--task", "text", "--labels", ",".join(PACKAGES),
            "--min-new-records", str(len(pairs)), state_dir=state_dir,
        )  # fmt: skip
        assert reg.returncode == 0 and "registered docs" in reg.stdout, reg.stdout + reg.stderr
        records = tmp_path / "docs.jsonl"
        with records.open("w") as f:
            for i, (text, package) in enumerate(pairs):
                f.write(json.dumps({"dataset": "docs", "id": f"doc-{i}", "text": text, "label": package}) + "\n")
        produced = run_cdl("produce", str(records), state_dir=state_dir)
        assert produced.returncode == 0, produced.stdout + produced.stderr

        bootstrap = state["kafka"]["bootstrap"]
        [compressed] = read_topic(bootstrap, "model.compressed", expected=1, timeout_s=300)
        done = decode(compressed.key, compressed.value, list(compressed.headers.items())).payload
        assert done.ok, done.reason  # type: ignore[attr-defined]
        [trained] = read_topic(bootstrap, "model.trained", expected=1, timeout_s=10)
        verdict = decode(trained.key, trained.value, list(trained.headers.items())).payload
        holdout_accuracy = verdict.metrics["holdout_accuracy"]  # type: ignore[attr-defined]
        assert holdout_accuracy >= 0.7, holdout_accuracy  # 1,200 paragraphs, 3 classes (chance 0.33)

        # clients send texts (BYTES [batch, 1]); the entry tokenizes them with the version's tokenizer
        held = [(t, PACKAGES.index(p)) for i, (t, p) in enumerate(pairs) if holdout_member("docs", f"doc-{i}", 0.2)]
        texts = np.array([t.encode() for t, _ in held], dtype=np.object_).reshape(-1, 1)
        headers = {"authorization": f"Bearer {state['api_key']}"}
        client = tgrpc.InferenceServerClient(state["services"]["gateway"]["grpc"])

        def infer(chunk: np.ndarray, request_id: str) -> tgrpc.InferResult:
            inp = tgrpc.InferInput("text", list(chunk.shape), "BYTES")
            inp.set_data_from_numpy(chunk)
            return client.infer("docs", [inp], headers=headers, request_id=request_id)

        deadline = time.monotonic() + 90
        while True:
            try:
                first = infer(texts[:64], "text-batch-0")
                break
            except InferenceServerException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert first.get_response().model_version == "1"
        results = [first] + [infer(texts[k : k + 64], f"text-batch-{k}") for k in range(64, len(texts), 64)]
        predicted = np.concatenate([r.as_numpy("logits").argmax(1) for r in results])
        served = (predicted == np.array([y for _, y in held])).mean()
        # what Triton answers is what the trainer measured (a chosen variant may lose <= 0.5 point)
        assert served >= holdout_accuracy - 0.02, (served, holdout_accuracy)
        meta = client.get_model_metadata("docs", headers=headers)
        assert meta.inputs[0].name == "text" and meta.inputs[0].datatype == "BYTES"
        bad = tgrpc.InferInput("text", [1, 1], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 1), np.float32))
        with pytest.raises(InferenceServerException) as wrong:
            client.infer("docs", [bad], headers=headers)
        assert wrong.value.status() == "StatusCode.INVALID_ARGUMENT"

        sample = tmp_path / "text.json"
        sample.write_text(json.dumps(held[0][0]))
        predict = run_cdl("predict", "docs", str(sample), "--json", state_dir=state_dir)
        assert predict.returncode == 0, predict.stdout + predict.stderr
        assert json.loads(predict.stdout)["predictions"][0]["class"] in range(len(PACKAGES))

        # one text at a time, labelled late: the monitor's window for the text version
        for i, (text, _) in enumerate(held[:20]):
            one = tgrpc.InferInput("text", [1, 1], "BYTES")
            one.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
            client.infer("docs", [one], headers=headers, request_id=f"text-{i}")
        producer_lines = tmp_path / "labels.jsonl"
        producer_lines.write_text(
            "".join(
                json.dumps({"request_id": f"text-{i}", "label": PACKAGES[y]}) + "\n"
                for i, (_, y) in enumerate(held[:20])
            )
        )
        labels = run_cdl("produce", str(producer_lines), "--topic", "data.feedback", state_dir=state_dir)
        assert labels.returncode == 0, labels.stdout + labels.stderr
        deadline = time.monotonic() + 180  # the monitor shares two cores with a whole stack and the other tests
        feedback = 0
        while feedback < 20 and time.monotonic() < deadline:
            health = [
                decode(r.key, r.value, list(r.headers.items())).payload
                for r in read_topic(bootstrap, "model.health", 10**6, timeout_s=2)
            ]
            mine = [h for h in health if h.model == "docs" and h.version == 1]  # type: ignore[attr-defined]
            feedback = sum(h.feedback for h in mine)  # type: ignore[attr-defined]
        assert feedback == 20, _monitor_diagnosis(state_dir, mine)
        assert sum(h.requests for h in mine) >= 20 + len(results)  # type: ignore[attr-defined]
    finally:
        down = run_cdl("stack", "down", "--purge", state_dir=state_dir)
        assert down.returncode == 0, down.stdout
