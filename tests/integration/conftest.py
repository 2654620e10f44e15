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

from cdl.kafka import ensure_topics
from cdl_tools.stack import service_env
from cdl_tools.stack._procs import free_port
from tests.conftest import admin_env

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
        self.http = f"127.0.0.1:{env.get(prefix + 'HTTP_PORT', '0')}"

    @property
    def supervisor_state(self) -> Path:
        """Where the supervisor of a ``supervised`` start writes its state (cdl_tools.stack.supervise)."""
        return self.log_path.with_suffix(".supervisor.json")

    def start(self, timeout_s: float = 60, supervised: bool = False) -> ServiceProcess:
        """Start the service and wait until it is ready; ``supervised``: under the local stack's
        supervisor, which restarts it when it exits or says it is not live."""
        argv = [sys.executable, "-m", f"services.{self.name}"]
        if supervised:
            live = f"http://{self.metrics}/healthz"
            state = ["--state", str(self.supervisor_state), "--probe-interval-s", "1"]
            argv = [
                sys.executable,
                "-m",
                "cdl_tools.stack.supervise",
                "--name",
                self.name,
                "--live-url",
                live,
                *state,
                "--",
                *argv,
            ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=log, stderr=log)
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
        "feedback": f"test.feedback.{uid}",
    }
    partitions = {t: 3 if kind == "raw" else 1 for kind, t in topics.items()}
    ensure_topics(kafka_bootstrap, partitions, {topics["state"]: {"cleanup.policy": "compact"}})
    topics["group"] = f"cdl-ingest-{uid}"
    return topics


@pytest.fixture
def ingest_factory(stack: dict[str, Any], ingest_topics: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    settings = {f"{k}_topic": v for k, v in ingest_topics.items() if k != "group"}
    settings |= {"group_id": ingest_topics["group"], "flush_interval_s": "0.5", "grpc_port": "0"}
    factory = ServiceFactory("ingest", stack, tmp_path, settings)

    def make(**overrides: str) -> ServiceProcess:
        svc = factory(grpc_port=str(free_port()), **overrides)
        svc.grpc = f"127.0.0.1:{svc.env['CDL_INGEST_GRPC_PORT']}"
        return svc

    yield make
    factory.stop_all()


def state_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


class ServiceFactory:
    """Starts instances of one service with the test's topics; stops them all at the end."""

    def __init__(
        self, name: str, stack: dict[str, Any], tmp_path: Path, settings: dict[str, str], as_admin: bool = True
    ) -> None:
        """``as_admin``: on a secured broker, the stack's admin (the tests' own topics, which no
        grant names: tests.conftest.admin_env); False: the service's own user."""
        self.name = name
        self.as_admin = as_admin
        self.stack = stack
        self.tmp_path = tmp_path
        self.settings = settings
        self.started: list[ServiceProcess] = []

    def __call__(self, **overrides: str) -> ServiceProcess:
        prefix = f"CDL_{self.name.upper()}_"
        env = dict(os.environ)  # pointed at the test's stack, whichever the environment names
        env.update({**service_env(self.stack), "CDL_STATE_DIR": self.stack["state_dir"], "PYTHONPATH": str(ROOT)})
        env[prefix + "METRICS_PORT"] = str(free_port())
        # most tests start a service without API keys or a signing key (the local stack's
        # services, the e2e tests' and test_security's run secure): allowed, with a warning each
        env.setdefault("CDL_INSECURE", "true")
        if self.as_admin:
            env.update(admin_env(self.stack, prefix))
        env.update({prefix + k.upper(): v for k, v in {**self.settings, **overrides}.items()})
        svc = ServiceProcess(self.name, env, self.tmp_path / f"{self.name}-{len(self.started)}.log")
        self.started.append(svc)
        return svc

    def stop_all(self) -> None:
        for svc in self.started:
            svc.stop()


def _topics(bootstrap: str, service: str, kinds: list[str]) -> dict[str, str]:
    uid = uuid.uuid4().hex[:8]
    topics = {kind: f"test.{kind}.{uid}" for kind in kinds}
    ensure_topics(bootstrap, dict.fromkeys(topics.values(), 1))
    topics["group"] = f"cdl-{service}-{uid}"
    return topics


@pytest.fixture
def trainer_topics(kafka_bootstrap: str) -> dict[str, str]:
    return _topics(kafka_bootstrap, "trainer", ["updated", "tuning", "trained", "deadletter"])


@pytest.fixture
def trainer_factory(stack: dict[str, Any], trainer_topics: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    settings = {f"{k}_topic": v for k, v in trainer_topics.items() if k != "group"}
    factory = ServiceFactory("trainer", stack, tmp_path, {**settings, "group_id": trainer_topics["group"]})
    yield factory
    factory.stop_all()


@pytest.fixture
def tuner_topics(kafka_bootstrap: str) -> dict[str, str]:
    return _topics(kafka_bootstrap, "tuner", ["updated", "trained", "drift", "requested", "completed", "deadletter"])


@pytest.fixture
def tuner_factory(stack: dict[str, Any], tuner_topics: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """Tuner processes with the test's topics and the session's PostgreSQL as study storage;
    small studies (few trials and epochs, a short heartbeat) unless overridden."""
    settings = {f"{k}_topic": v for k, v in tuner_topics.items() if k != "group"}
    settings |= {
        "group_id": tuner_topics["group"],
        "storage_url": stack["postgres"]["url"],
        "workers": "2",
        "n_trials": "8",
        "max_epochs": "6",
        "heartbeat_s": "1",
        "grace_s": "4",
        "window_records": "0",
        "first_after_model": "false",  # tests publish dataset versions without a trainer
    }
    factory = ServiceFactory("tuner", stack, tmp_path, settings)
    yield factory
    factory.stop_all()


@pytest.fixture
def compressor_topics(kafka_bootstrap: str) -> dict[str, str]:
    return _topics(kafka_bootstrap, "compressor", ["trained", "compressed", "deadletter"])


@pytest.fixture
def compressor_factory(stack: dict[str, Any], compressor_topics: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    settings = {f"{k}_topic": v for k, v in compressor_topics.items() if k != "group"}
    settings |= {"group_id": compressor_topics["group"], "latency_runs": "50"}
    factory = ServiceFactory("compressor", stack, tmp_path, settings)
    yield factory
    factory.stop_all()


@pytest.fixture
def gateway_topics(kafka_bootstrap: str) -> dict[str, str]:
    return _topics(kafka_bootstrap, "gateway", ["compressed", "deployed", "logged", "commands", "deadletter"])


@pytest.fixture
def gateway_factory(stack: dict[str, Any], gateway_topics: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """Gateway processes in front of the session's Triton servers, with the test's topics.

    Each instance gets fresh gRPC and REST ports unless they are passed (a restarted gateway keeps
    its port by passing ``grpc_port=old.env['CDL_GATEWAY_GRPC_PORT']``)."""
    settings = {f"{k}_topic": v for k, v in gateway_topics.items() if k != "group"}
    settings |= {"group_id": gateway_topics["group"], "health_interval_s": "0.5"}
    factory = ServiceFactory("gateway", stack, tmp_path, settings)

    def make(**overrides: str) -> ServiceProcess:
        overrides.setdefault("grpc_port", str(free_port()))
        overrides.setdefault("http_port", str(free_port()))
        svc = factory(**overrides)
        svc.grpc = f"127.0.0.1:{svc.env['CDL_GATEWAY_GRPC_PORT']}"
        svc.http = f"127.0.0.1:{svc.env['CDL_GATEWAY_HTTP_PORT']}"
        return svc

    yield make
    factory.stop_all()


def new_monitor_topics(bootstrap: str) -> dict[str, str]:
    """Fresh topics for one monitor group: the log (3 partitions, as the gateway's), labels (1),
    outputs, and the group's id."""
    uid = uuid.uuid4().hex[:8]
    topics = {kind: f"test.{kind}.{uid}" for kind in ("logged", "feedback", "health", "drift", "raw")}
    ensure_topics(bootstrap, {t: 3 if kind in ("logged", "raw") else 1 for kind, t in topics.items()})
    topics["group"] = f"cdl-monitor-{uid}"
    return topics


def monitor_service_factory(stack: dict[str, Any], topics: dict[str, str], tmp: Path) -> ServiceFactory:
    """Monitor processes of the group ``topics`` names, with short windows and a short join time."""
    settings = {f"{k}_topic": v for k, v in topics.items() if k != "group"}
    settings |= {"group_id": topics["group"], "window_s": "1", "grace_s": "0.5", "drift_draws": "300"}
    return ServiceFactory("monitor", stack, tmp, settings)


@pytest.fixture
def monitor_topics(kafka_bootstrap: str) -> dict[str, str]:
    return new_monitor_topics(kafka_bootstrap)


@pytest.fixture
def monitor_factory(stack: dict[str, Any], monitor_topics: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    factory = monitor_service_factory(stack, monitor_topics, tmp_path)
    yield factory
    factory.stop_all()
