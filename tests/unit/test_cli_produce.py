"""`cdl produce`'s error paths: one line, a non-zero exit, nothing produced (no servers needed)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import run_cdl


def test_a_line_that_is_not_a_json_object_stops_everything(tmp_path: Path) -> None:
    src = tmp_path / "records.jsonl"
    src.write_text('{"id": "a", "label": "x"}\n\n[1, 2]\n')
    out = run_cdl("produce", str(src), state_dir=tmp_path, timeout=60)
    assert out.returncode == 1 and "line 3: not a JSON object" in out.stdout
    src.write_text('{"id": "a"}\n{"id": \n')
    out = run_cdl("produce", str(src), state_dir=tmp_path, timeout=60)
    assert out.returncode == 1 and "line 2: not JSON" in out.stdout


def test_no_file_or_no_stack_is_a_one_line_error(tmp_path: Path) -> None:
    out = run_cdl("produce", str(tmp_path / "missing.jsonl"), state_dir=tmp_path, timeout=60)
    assert out.returncode == 1 and "cannot read" in out.stdout and len(out.stdout.strip().splitlines()) == 1
    src = tmp_path / "ok.jsonl"
    src.write_text('{"dataset": "d", "id": "a", "features": [1], "label": "x"}\n')
    out = run_cdl("produce", str(src), state_dir=tmp_path / "no-stack", timeout=60)
    assert out.returncode == 1 and "no Kafka" in out.stdout and "Traceback" not in out.stdout + out.stderr
