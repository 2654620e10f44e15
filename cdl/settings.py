"""Settings: one pydantic-settings class per service, all built on one base.

Connection fields (Kafka, object store, Triton) that are not set in the
environment are read from the local stack's state file written by
``cdl stack up``, so a service started next to a local stack needs no
configuration at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cdl.failure import FailurePolicy

__all__ = [
    "ServiceSettings",
    "StackSettings",
    "cdl_home",
    "default_state_dir",
    "read_stack_state",
]


def cdl_home() -> Path:
    """Where cdl caches what it installs (``$CDL_HOME``, default ``~/.cache/cdl``)."""
    env = os.environ.get("CDL_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cdl"


def default_state_dir() -> Path:
    """Where the local stack keeps its data, logs and state file."""
    env = os.environ.get("CDL_STATE_DIR")
    return Path(env) if env else cdl_home() / "stack"


def read_stack_state(state_dir: Path | None = None) -> dict[str, Any]:
    """The local stack's state file, or ``{}`` when no stack was started there."""
    path = (state_dir or default_state_dir()) / "stack.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return data


class StackSettings(BaseSettings):
    """Settings of the local stack (``cdl stack``); env prefix ``CDL_STACK_``."""

    model_config = SettingsConfigDict(env_prefix="CDL_STACK_", extra="ignore", use_attribute_docstrings=True)

    state_dir: Path = default_state_dir()
    """Data, logs and the state file of the stack."""
    home: Path = cdl_home()
    """Cache of installed components (Kafka jars, MinIO, Triton)."""
    host: str = "127.0.0.1"
    """Address every component binds to (loopback only by default)."""
    kafka_port: int = 0
    """Kafka broker port; 0 picks a free one."""
    kafka_version: str = "4.1.1"
    """Apache Kafka version whose jars set-up placed under ``home``."""
    kafka_heap: str = "512m"
    """Maximum JVM heap of the broker."""
    minio_port: int = 0
    """MinIO S3 API port; 0 picks a free one."""
    minio_access_key: str = "cdl-admin"
    """MinIO root user."""
    minio_secret_key: str = "cdl-admin-secret"
    """MinIO root password."""
    triton_servers: int = 1
    """How many Triton servers to start."""
    services: list[str] = ["ingest", "trainer", "tuner", "compressor", "gateway", "monitor"]
    """cdl services to start after the servers (``python -m services.<name>``)."""
    postgres: bool = True
    """Start PostgreSQL (the tuner's shared study storage) when the tuner is among the services."""
    postgres_port: int = 0
    """PostgreSQL port; 0 picks a free one."""
    tuner_workers: int = 2
    """Worker processes of each study the stack's tuner runs (they share its PostgreSQL storage)."""
    api_key: str = ""
    """API key the stack's gRPC APIs (gateway, ingest) accept; empty: one is generated at the
    first start, kept in ``stack.json`` (``api_key``) and reused by later starts."""
    triton_base_port: int = 0
    """First Triton port (each server takes three: gRPC, HTTP, metrics); 0 picks free ones."""
    start_timeout_s: float = 90.0
    """How long each component may take to become healthy."""
    stop_timeout_s: float = 20.0
    """How long each component gets to exit after SIGTERM before SIGKILL."""
    supervise: bool = True
    """Run each cdl service under a supervisor (``python -m cdl.stack.supervise``) that restarts it
    when it exits or its ``/healthz`` says it is not live, with a backoff (docs/operations.md)."""


#: connection fields every service also reads from the generic ``CDL_<FIELD>`` variable
SHARED_FIELDS = ("kafka_bootstrap", "s3_endpoint", "s3_access_key", "s3_secret_key")


class ServiceSettings(BaseSettings):
    """Connection settings every cdl service shares; env prefix ``CDL_``.

    Each service subclasses this with its own prefix (``CDL_INGEST_`` ...).
    Connection fields left empty fall back to the generic ``CDL_<FIELD>``
    variable, then to the local stack's state file.
    """

    model_config = SettingsConfigDict(env_prefix="CDL_", extra="ignore", use_attribute_docstrings=True)

    kafka_bootstrap: str = ""
    """Kafka bootstrap servers, ``host:port[,host:port]``."""
    s3_endpoint: str = ""
    """Object store endpoint, ``host:port`` (MinIO)."""
    s3_access_key: str = ""
    """Object store access key."""
    s3_secret_key: str = ""
    """Object store secret key."""
    s3_secure: bool = False
    """Use TLS towards the object store."""
    api_key_hashes: list[str] = []
    """SHA-256 hex digests of the API keys this service's gRPC API accepts (``authorization:
    Bearer <key>``); empty: no key needed. The local stack generates one key for all."""
    triton_grpc: list[str] = []
    """Triton gRPC endpoints, ``host:port``."""
    triton_http: list[str] = []
    """The same Triton servers' HTTP endpoints, ``host:port``, in ``triton_grpc``'s order (the
    gateway's native lane serves REST infer requests to them); empty: unknown."""
    metrics_port: int = 0
    """Prometheus metrics port; 0 picks a free one."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics and health endpoint binds to (0.0.0.0 in a container, for scrapes)."""
    log_level: str = "INFO"
    """Log level of the service."""
    trace_exporter: str = ""
    """Where spans go: file | otlp | console | none; empty: ``CDL_TRACE_EXPORTER``, else file
    (``<state_dir>/traces/<service>.jsonl``; cdl.tracing, docs/operations.md)."""
    trace_file: str = ""
    """The file exporter's file; empty: ``CDL_TRACE_FILE``, else under the state directory."""
    otlp_endpoint: str = ""
    """The OTLP/gRPC collector of the otlp exporter; empty: ``CDL_OTLP_ENDPOINT``, else localhost:4317."""
    state_dir: Path = default_state_dir()
    """Local stack state directory to read endpoints from."""
    transaction_retry_s: float = 60.0
    """How long a loop retries a failed Kafka transaction in place before it starts a new session."""
    call_grace_s: float = 30.0
    """How long a blocking Kafka call may run past its own timeout before the loop counts as stuck:
    ``/healthz`` says not live and the process exits (70) for its supervisor to restart it."""
    progress_deadline_s: float = 180.0
    """Longest a loop may go without progress outside a blocking call before it counts as stuck."""
    job_deadline_s: float = 6 * 3600.0
    """Longest one job (training, study, compression, rollout step) may run before its loop counts as stuck."""
    restore_deadline_s: float = 3600.0
    """Longest a loop's state restore at the start of a session may take before the loop counts as stuck."""

    def failure_policy(self) -> FailurePolicy:
        """The loops' failure policy with this service's deadlines."""
        return FailurePolicy(
            transaction_retry_s=self.transaction_retry_s,
            call_grace_s=self.call_grace_s,
            progress_deadline_s=self.progress_deadline_s,
            job_deadline_s=self.job_deadline_s,
            restore_deadline_s=self.restore_deadline_s,
        )

    @model_validator(mode="after")
    def _fill_from_stack(self) -> ServiceSettings:
        state = read_stack_state(self.state_dir)
        kafka = state.get("kafka", {})
        minio = state.get("minio", {})
        fallbacks: dict[str, Any] = {
            "kafka_bootstrap": kafka.get("bootstrap", ""),
            "s3_endpoint": minio.get("endpoint", ""),
            "s3_access_key": minio.get("access_key", ""),
            "s3_secret_key": minio.get("secret_key", ""),
        }
        assert tuple(fallbacks) == SHARED_FIELDS
        for field, from_state in fallbacks.items():
            if not getattr(self, field):
                setattr(self, field, os.environ.get(f"CDL_{field.upper()}") or from_state)
        tritons = state.get("triton", [])
        if not self.triton_grpc:
            self.triton_grpc = [t["grpc"] for t in tritons]
        if not self.triton_http:
            http_of = {t["grpc"]: t.get("http", "") for t in tritons}
            found = [http_of.get(g, "") for g in self.triton_grpc]
            self.triton_http = found if all(found) else []
        return self
