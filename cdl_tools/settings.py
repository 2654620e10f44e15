"""Settings of the operator tooling: the local stack (``cdl stack``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from cdl.settings import cdl_home, default_state_dir

__all__ = ["StackSettings"]


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
    port_range: str = Field(default="", pattern=r"^([1-9][0-9]{0,4}-[1-9][0-9]{0,4})?$")
    """Where the free ports the stack picks come from, ``low-high`` (inclusive); empty: from 10000
    to below the kernel's range for outgoing connections. Stacks started side by side (the test
    workers) each get their own, so that no two pick the same port before either binds it."""
    kafka_version: str = "4.1.1"
    """Apache Kafka version whose jars set-up placed under ``home``."""
    kafka_heap: str = "512m"
    """Maximum JVM heap of the broker."""
    kafka_security: Literal["plaintext", "sasl_ssl"] = "sasl_ssl"
    """How clients reach the broker: ``sasl_ssl`` (the default): TLS (the stack's own CA), a
    SCRAM-SHA-512 user per service and ACLs that let each write only the topics it owns
    (cdl.kafka.acls; docs/security.md); or ``plaintext`` on loopback, no identity, for a laptop
    that asks for it. Kept for the stack's life: a restart keeps it."""
    minio_port: int = 0
    """MinIO S3 API port; 0 picks a free one."""
    minio_tls: bool = True
    """MinIO serves TLS with a certificate of the stack's CA, and every client trusts that CA
    (services through ``CDL_S3_SECURE`` and ``CDL_S3_CA_FILE``). Triton's S3 client trusts only
    the system's CA bundle, so each Triton runs in a mount namespace of its own where the
    stack's CA is added to it (``unshare``; the machine's bundle is untouched); where no such
    namespace may be made (a user without user namespaces), the stack serves plain HTTP on
    loopback and says so. Kept for the stack's life."""
    minio_access_key: str = "cdl-admin"
    """MinIO root user."""
    minio_secret_key: str = ""
    """MinIO root password; empty: one is generated at the stack's first start and kept in
    ``stack.json`` (mode 0600), as the API keys are."""
    triton_servers: int = 1
    """How many Triton servers to start."""
    services: list[str] = ["ingest", "trainer", "tuner", "compressor", "gateway", "monitor"]
    """cdl services to start after the servers (``python -m services.<name>``)."""
    postgres: bool = True
    """Start PostgreSQL (the tuner's shared study storage) when the tuner is among the services."""
    postgres_port: int = 0
    """PostgreSQL port; 0 picks a free one."""
    postgres_password: str = ""
    """Password of PostgreSQL's ``cdl`` role over TCP (SCRAM; only the server's own Unix socket
    trusts); empty: one is generated at the stack's first start and kept in ``stack.json``."""
    tuner_workers: int = 2
    """Worker processes of each study the stack's tuner runs (they share its PostgreSQL storage)."""
    api_key: str = ""
    """Inference key of the stack's gateway; empty: one is generated at the first start, kept
    in ``stack.json`` (``api_key``) and reused by later starts."""
    admin_key: str = ""
    """Admin key of the stack's gateway (ModelAdmin: approve, rollback, traffic; the inference
    key is not one); empty: generated as ``api_key`` is (``admin_key``)."""
    ingest_key: str = ""
    """Key of the stack's ingest API (register and list datasets); empty: generated as
    ``api_key`` is (``ingest_key``)."""
    triton_base_port: int = 0
    """First Triton port (each server takes three: gRPC, HTTP, metrics); 0 picks free ones."""
    start_timeout_s: float = 90.0
    """How long each component may take to become healthy."""
    stop_timeout_s: float = 20.0
    """How long each component gets to exit after SIGTERM before SIGKILL."""
    supervise: bool = True
    """Run each cdl service under a supervisor (``python -m cdl_tools.stack.supervise``) that restarts it
    when it exits or its ``/healthz`` says it is not live, with a backoff (docs/operations.md)."""
