"""Secure by default (docs/security.md): each service's real entry point, given an insecure
configuration, refuses it before it connects to anything: exit 78 (EX_CONFIG) and one log line
that names every problem; under ``CDL_INSECURE=true`` it goes on, each problem a warning.

No servers: the refusal comes first (the insecure case is then stopped once it warned).
deploy/compose.yml's side is tests/unit/test_deploy.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdl.settings import EX_CONFIG, known_default

ROOT = Path(__file__).resolve().parent.parent.parent
SERVICES = ("ingest", "trainer", "tuner", "compressor", "gateway", "monitor")


def _environ(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDL_")}
    env |= {
        "PYTHONPATH": str(ROOT),
        "CDL_STATE_DIR": str(tmp_path),
        "CDL_KAFKA_BOOTSTRAP": "127.0.0.1:1",  # nothing answers there: nothing may be reached first
        "CDL_S3_ENDPOINT": "127.0.0.1:1",
        "CDL_S3_ACCESS_KEY": "cdl-admin",
        "CDL_S3_SECRET_KEY": "cdl-admin-secret",  # compose's former default
        "CDL_TUNER_STORAGE_URL": "postgresql+psycopg2://cdl:cdl@postgres:5432/optuna",
        "CDL_TRITON_GRPC": '["127.0.0.1:1"]',
    }
    return env | extra


def _spawn(name: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """The service's real entry point (``python -m services.<name>``), its output piped."""
    argv = [sys.executable, "-m", f"services.{name}"]
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(stderr: str) -> list[dict[str, object]]:
    out = []
    for line in stderr.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_every_service_refuses_an_insecure_configuration_and_says_why(tmp_path: Path) -> None:
    env = _environ(tmp_path)
    procs = {name: _spawn(name, env) for name in SERVICES}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == EX_CONFIG, f"{name}: exit {proc.returncode}\n{stderr[-3000:]}"
        [refusal] = [r for r in _records(stderr) if r.get("level") == "error"]
        message = str(refusal["msg"] if "msg" in refusal else refusal.get("message"))
        assert f"{name} refuses an insecure configuration" in message and "CDL_INSECURE=true" in message, refusal
        assert "s3_secret_key" in message
        assert "cdl-admin-secret" not in stderr  # the secret itself is never logged
        expected = {
            "gateway": ["api_key_hashes", "admin_key_hashes", "trusted_keys"],
            "ingest": ["api_key_hashes"],
            "compressor": ["signing_key_file"],
            "tuner": ["storage_url"],
        }.get(name, [])
        for setting in expected:
            assert setting in message, (name, setting, message)
        assert "Traceback" not in stderr


@pytest.mark.parametrize("name", ["gateway", "ingest"])
def test_the_insecure_switch_lets_a_service_start_with_a_warning_per_problem(name: str, tmp_path: Path) -> None:
    env = _environ(tmp_path, CDL_INSECURE="true")
    proc = subprocess.Popen(
        [sys.executable, "-m", f"services.{name}"], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    warnings: list[dict[str, object]] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and len(warnings) < 2:
            line = proc.stderr.readline()
            if not line:
                break
            warnings += [r for r in _records(line) if "insecure configuration" in str(r.get("msg", ""))]
    finally:
        proc.kill()
        proc.wait(30)
    problems = " ".join(str(w.get("problem")) for w in warnings)
    assert len(warnings) >= 2 and "s3_secret_key" in problems and "api_key_hashes" in problems, warnings


def test_published_secrets_are_known_and_generated_ones_are_not() -> None:
    for published in ("", " ", "cdl", "cdl-admin-secret", "minioadmin", "laptop-only-minio-secret"):
        assert known_default(published), published
    assert not known_default("b2Vm4rXq-generated_9w")


@pytest.mark.parametrize(
    ("name", "extra", "says"),
    [
        ("trainer", {"CDL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "SASL needs a username and a password"),
        ("gateway", {"CDL_GATEWAY_API_KEYS_FILE": "/nonexistent/keys.json"}, "cannot read the keys file"),
    ],
)
def test_a_configuration_that_cannot_be_used_exits_78_with_one_line(
    name: str, extra: dict[str, str], says: str, tmp_path: Path
) -> None:
    env = _environ(tmp_path, CDL_INSECURE="true", **extra)
    proc = _spawn(name, env)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EX_CONFIG, f"exit {proc.returncode}\n{stderr[-3000:]}"
    [error] = [r for r in _records(stderr) if r.get("level") == "error"]
    assert f"{name} cannot start" in str(error["msg"]) and says in str(error["msg"]), error
    assert "Traceback" not in stderr
