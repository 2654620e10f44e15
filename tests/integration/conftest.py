"""Fixtures that run cdl services as real processes against the session's stack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from cdl.stack._procs import free_port

ROOT = Path(__file__).resolve().parent.parent.parent


class ServiceProcess:
    """A cdl service started with ``python -m services.<name>`` and its own settings."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        prefix = f"CDL_{name.upper()}_"
        self.metrics = f"127.0.0.1:{env[prefix + 'METRICS_PORT']}"
        self.grpc = f"127.0.0.1:{env.get(prefix + 'GRPC_PORT', '0')}"

    def start(self, timeout_s: float = 60) -> ServiceProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{self.name}"], env=self.env, cwd=ROOT, stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.metrics}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready: {self.log_tail()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.grpc)


@pytest.fixture
def ingest_topics(kafka_bootstrap: str) -> dict[str, str]:
    """Fresh raw / dead-letter / updated / state topics for one ingest instance."""
    uid = uuid.uuid4().hex[:8]
    topics = {
        "raw": f"test.raw.{uid}",
        "deadletter": f"test.dlq.{uid}",
        "updated": f"test.updated.{uid}",
        "state": f"test.ingest-state.{uid}",
    }
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    new = [
        NewTopic(topics["raw"], num_partitions=3, replication_factor=1),
        NewTopic(topics["deadletter"], num_partitions=1, replication_factor=1),
        NewTopic(topics["updated"], num_partitions=1, replication_factor=1),
        NewTopic(topics["state"], num_partitions=1, replication_factor=1, config={"cleanup.policy": "compact"}),
    ]
    for fut in admin.create_topics(new).values():
        fut.result(30)
    topics["group"] = f"cdl-ingest-{uid}"
    return topics


@pytest.fixture
def ingest_factory(stack: dict[str, Any], ingest_topics: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    started: list[ServiceProcess] = []

    def make(**overrides: str) -> ServiceProcess:
        env = dict(os.environ)
        env.update(
            {
                "CDL_STATE_DIR": stack["state_dir"],
                "CDL_INGEST_GRPC_PORT": str(free_port()),
                "CDL_INGEST_METRICS_PORT": str(free_port()),
                "CDL_INGEST_RAW_TOPIC": ingest_topics["raw"],
                "CDL_INGEST_DEADLETTER_TOPIC": ingest_topics["deadletter"],
                "CDL_INGEST_UPDATED_TOPIC": ingest_topics["updated"],
                "CDL_INGEST_STATE_TOPIC": ingest_topics["state"],
                "CDL_INGEST_GROUP_ID": ingest_topics["group"],
                "CDL_INGEST_FLUSH_INTERVAL_S": "0.5",
                "PYTHONPATH": str(ROOT),
            }
        )
        env.update({f"CDL_INGEST_{k.upper()}": v for k, v in overrides.items()})
        svc = ServiceProcess("ingest", env, tmp_path / f"ingest-{len(started)}.log")
        started.append(svc)
        return svc

    yield make
    for svc in started:
        svc.stop()


def state_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


@pytest.fixture
def trainer_topics(kafka_bootstrap: str) -> dict[str, str]:
    uid = uuid.uuid4().hex[:8]
    topics = {
        "updated": f"test.updated.{uid}",
        "tuning": f"test.tuning.{uid}",
        "trained": f"test.trained.{uid}",
        "deadletter": f"test.dlq.{uid}",
    }
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for fut in admin.create_topics(
        [NewTopic(t, num_partitions=1, replication_factor=1) for t in topics.values()]
    ).values():
        fut.result(30)
    topics["group"] = f"cdl-trainer-{uid}"
    return topics


@pytest.fixture
def trainer_factory(stack: dict[str, Any], trainer_topics: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    started: list[ServiceProcess] = []

    def make(**overrides: str) -> ServiceProcess:
        env = dict(os.environ)
        env.update(
            {
                "CDL_STATE_DIR": stack["state_dir"],
                "CDL_TRAINER_METRICS_PORT": str(free_port()),
                "CDL_TRAINER_UPDATED_TOPIC": trainer_topics["updated"],
                "CDL_TRAINER_TUNING_TOPIC": trainer_topics["tuning"],
                "CDL_TRAINER_TRAINED_TOPIC": trainer_topics["trained"],
                "CDL_TRAINER_DEADLETTER_TOPIC": trainer_topics["deadletter"],
                "CDL_TRAINER_GROUP_ID": trainer_topics["group"],
                "PYTHONPATH": str(ROOT),
            }
        )
        env.update({f"CDL_TRAINER_{k.upper()}": v for k, v in overrides.items()})
        svc = ServiceProcess("trainer", env, tmp_path / f"trainer-{len(started)}.log")
        started.append(svc)
        return svc

    yield make
    for svc in started:
        svc.stop()
