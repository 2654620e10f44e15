"""Settings: one pydantic-settings class per service, all built on one base.

Every value comes from the environment (or the class's default): a service
never reads a developer's files. Connection fields (Kafka, object store,
Triton) left empty under the service's prefix are read from the generic
``CDL_<FIELD>`` variable, so one set of variables serves every service; the
local stack (``cdl_tools.stack``) passes its endpoints so.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cdl.errors import ConfigError
from cdl.failure import FailurePolicy

if TYPE_CHECKING:
    from cdl.kafka.security import KafkaSecurity

__all__ = [
    "EX_CONFIG",
    "KNOWN_DEFAULT_SECRETS",
    "SHARED_SWITCHES",
    "NativeSettings",
    "ServiceSettings",
    "cdl_home",
    "default_state_dir",
    "known_default",
    "plaintext_endpoint",
    "transactional_id",
]

#: the exit code of a service that refuses its configuration (sysexits' EX_CONFIG)
EX_CONFIG = 78

#: secrets published somewhere (compose's former defaults, deploy/laptop.env, MinIO's and
#: PostgreSQL images' examples): whoever read them knows them, so they protect nothing
KNOWN_DEFAULT_SECRETS = frozenset(
    {
        "",
        "cdl",
        "cdl-admin-secret",
        "minioadmin",
        "postgres",
        "password",
        "changeme",
        "secret",
        "laptop-only-minio-secret",
        "laptop-only-postgres-password",
    }
)


#: the hosts of a server this machine alone reaches
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def _hosts(addresses: str) -> set[str]:
    """The hosts of ``addresses`` (``host:port``, comma-separated)."""
    return {a.strip().rsplit(":", 1)[0].strip("[]") for a in addresses.split(",") if a.strip()}


def plaintext_endpoint(host: str, tls_cert_file: str, what: str) -> list[str]:
    """The security problem of serving ``what`` on ``host`` without TLS beyond loopback (an API
    key sent to it can be read on the network), or none."""
    if tls_cert_file or host in _LOOPBACK:
        return []
    return [f"{what} is served in plaintext beyond loopback: keys and data can be read on the network (tls_cert_file)"]


def known_default(secret: str) -> bool:
    """Whether ``secret`` is empty, one of :data:`KNOWN_DEFAULT_SECRETS` or one of
    deploy/laptop.env's (``laptop-only-…``)."""
    return secret.strip() in KNOWN_DEFAULT_SECRETS or secret.strip().startswith("laptop-only-")


def transactional_id(group_id: str, instance: str) -> str:
    """A loop's Kafka transactional id: ``<group_id>-<instance>``, where an empty ``instance`` is
    this host's name (in Kubernetes the pod's: a StatefulSet's stable ``<name>-<ordinal>``).

    Every live instance of a group needs its own: two with one id fence each other. A stable
    one (the same after a restart) lets the restarted process abort its predecessor's open
    transaction at once instead of after ``transaction.timeout.ms``.
    """
    return f"{group_id}-{instance or socket.gethostname()}"


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


#: connection fields every service also reads from the generic ``CDL_<FIELD>`` variable
SHARED_FIELDS = (
    "kafka_bootstrap",
    "kafka_security_protocol",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
    "kafka_sasl_password_file",
    "kafka_ssl_ca_file",
    "kafka_ssl_cert_file",
    "kafka_ssl_key_file",
    "s3_endpoint",
    "s3_access_key",
    "s3_secret_key",
    "s3_ca_file",
    "triton_grpc",
    "triton_http",
)
#: switches every service also reads from the generic ``CDL_<FIELD>`` variable
SHARED_SWITCHES = ("insecure", "s3_secure")


class ServiceSettings(BaseSettings):
    """Connection settings every cdl service shares; env prefix ``CDL_``.

    Each service subclasses this with its own prefix (``CDL_INGEST_`` ...).
    Connection fields (:data:`SHARED_FIELDS`) left empty fall back to the generic
    ``CDL_<FIELD>`` variable (a JSON list for the Triton endpoints).
    """

    model_config = SettingsConfigDict(env_prefix="CDL_", extra="ignore", use_attribute_docstrings=True)

    kafka_bootstrap: str = ""
    """Kafka bootstrap servers, ``host:port[,host:port]``."""
    kafka_security_protocol: str = ""
    """How this service talks to Kafka: PLAINTEXT (empty), SSL (TLS; with a client certificate,
    mTLS), SASL_PLAINTEXT or SASL_SSL (cdl.kafka.security; docs/security.md)."""
    kafka_sasl_mechanism: str = ""
    """SASL mechanism: SCRAM-SHA-512 (empty), SCRAM-SHA-256 or PLAIN."""
    kafka_sasl_username: str = ""
    """This service's Kafka user (the ACLs say what it may read and write)."""
    kafka_sasl_password: str = ""
    """Its password; prefer ``kafka_sasl_password_file``."""
    kafka_sasl_password_file: str = ""
    """A file holding its password (a mounted secret), read at start."""
    kafka_ssl_ca_file: str = ""
    """PEM of the CA that signed the brokers' certificates; empty: the system's CAs."""
    kafka_ssl_cert_file: str = ""
    """PEM client certificate for mTLS (with ``kafka_ssl_key_file``)."""
    kafka_ssl_key_file: str = ""
    """PEM private key of ``kafka_ssl_cert_file``."""
    s3_endpoint: str = ""
    """Object store endpoint, ``host:port`` (MinIO)."""
    s3_access_key: str = ""
    """Object store access key."""
    s3_secret_key: str = ""
    """Object store secret key."""
    s3_secure: bool = False
    """Use TLS towards the object store."""
    s3_ca_file: str = ""
    """PEM of the CA that signed the object store's certificate (with ``s3_secure``); empty:
    the system's CAs."""
    api_key_hashes: list[str] = []
    """SHA-256 hex digests of the API keys this service's gRPC API accepts (``authorization:
    Bearer <key>``); empty: no key needed. The local stack generates one key for all."""
    api_keys_file: str = ""
    """A JSON file of the keys' digests, ``{"inference": [...], "admin": [...]}`` (the admin list:
    the gateway's ModelAdmin), read at start and again whenever it changes (every
    ``keys_reload_s``): rewrite it to rotate a key without a restart. With it, ``api_key_hashes``
    (and the gateway's ``admin_key_hashes``) are not used."""
    keys_reload_s: float = 5.0
    """How often ``api_keys_file`` is looked at for a change."""
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
    """Where the service keeps its local files (processed-event stores, traces, the monitor's
    tables); the local stack gives its own state directory."""
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
    insecure: bool = False
    """Start even with an open endpoint, a default secret or unsigned models, each logged as a
    warning: for a laptop only (docs/security.md). Unset under the service's prefix: ``CDL_INSECURE``.
    Without it a service refuses such a configuration and exits 78."""

    def security_problems(self) -> list[str]:
        """What makes this configuration insecure (each service adds its own endpoints and keys);
        empty when nothing does."""
        problems = []
        if self.s3_endpoint and known_default(self.s3_secret_key):
            problems.append("the object store's secret key is empty or a published default (s3_secret_key)")
        sasl = self.kafka_security_protocol.upper().startswith("SASL_")
        if sasl and not self.kafka_sasl_password_file and known_default(self.kafka_sasl_password):
            problems.append("the Kafka password is empty or a published default (kafka_sasl_password)")
        protocol = (self.kafka_security_protocol or "PLAINTEXT").upper()
        if protocol in ("PLAINTEXT", "SASL_PLAINTEXT") and _hosts(self.kafka_bootstrap) - _LOOPBACK:
            # beyond this machine: an open bus (whoever reaches it may write the control plane's
            # topics), or a password and every record in clear
            problems.append(f"Kafka is reached in {protocol} beyond loopback (kafka_security_protocol)")
        if self.s3_endpoint and not self.s3_secure and _hosts(self.s3_endpoint) - _LOOPBACK:
            problems.append("the object store is reached in plain HTTP beyond loopback (s3_secure)")
        return problems

    def key_digests(self) -> tuple[list[str], list[str]]:
        """The (inference, admin) key digests this service starts with: ``api_keys_file``'s, else
        the settings' (a ConfigError when the file is unreadable or not valid)."""
        if self.api_keys_file:
            from cdl.auth import read_keys_file

            return read_keys_file(self.api_keys_file)
        return list(self.api_key_hashes), list(getattr(self, "admin_key_hashes", []))

    def kafka_security(self) -> KafkaSecurity:
        """This service's TLS and SASL towards Kafka (its password read from its file)."""
        from cdl.kafka.security import KafkaSecurity

        password = self.kafka_sasl_password
        if self.kafka_sasl_password_file:
            try:
                password = Path(self.kafka_sasl_password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the Kafka password file {self.kafka_sasl_password_file}: {exc}"
                ) from exc
        return KafkaSecurity(
            protocol=(self.kafka_security_protocol or "PLAINTEXT").upper(),
            mechanism=(self.kafka_sasl_mechanism or "SCRAM-SHA-512").upper(),
            username=self.kafka_sasl_username,
            password=password,
            ca_file=self.kafka_ssl_ca_file,
            cert_file=self.kafka_ssl_cert_file,
            key_file=self.kafka_ssl_key_file,
        )

    def secure_process(self, service: str) -> None:
        """At a service's start: refuse an insecure configuration (:meth:`refuse_insecure`), then
        make its Kafka identity the process's (:func:`cdl.kafka.security.use`); a configuration
        that cannot be used (SASL without a password, an unreadable keys file) exits 78 too."""
        from cdl.kafka.security import use
        from cdl.logging import get_logger

        try:
            self.refuse_insecure(service)
            use(self.kafka_security())
        except ConfigError as exc:  # a half-configured Kafka identity, a bad keys file: one line, 78
            get_logger(f"cdl.{service}").error(f"{service} cannot start: {exc}")
            raise SystemExit(EX_CONFIG) from exc

    def refuse_insecure(self, service: str) -> None:
        """Exit with :data:`EX_CONFIG` and one error line naming the problems of
        :meth:`security_problems`, unless ``insecure`` is set (then each is a warning)."""
        from cdl.logging import get_logger

        log = get_logger(f"cdl.{service}")
        problems = self.security_problems()
        if not problems:
            return
        if self.insecure:
            for problem in problems:
                log.warning("insecure configuration, allowed by the insecure setting", problem=problem)
            return
        log.error(
            f"{service} refuses an insecure configuration: {'; '.join(problems)}; fix it, or set "
            "CDL_INSECURE=true on a laptop (docs/security.md)",
            problems=problems,
        )
        raise SystemExit(EX_CONFIG)

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
    def _fill_shared(self) -> ServiceSettings:
        for switch in SHARED_SWITCHES:
            if switch not in self.model_fields_set:
                raw = os.environ.get(f"CDL_{switch.upper()}", "").strip().lower()
                setattr(self, switch, raw in ("1", "true", "yes"))
        for field in SHARED_FIELDS:
            if field.startswith("triton_"):
                continue  # JSON lists, below
            if not getattr(self, field):
                setattr(self, field, os.environ.get(f"CDL_{field.upper()}", ""))
        grpc, http = _endpoints("CDL_TRITON_GRPC"), _endpoints("CDL_TRITON_HTTP")
        if not self.triton_grpc:
            self.triton_grpc = grpc
        # the HTTP ports pair with the gRPC ones by position: only for the same servers
        if not self.triton_http and self.triton_grpc == grpc and len(http) == len(grpc):
            self.triton_http = http
        return self


def _endpoints(variable: str) -> list[str]:
    """A JSON list of ``host:port`` from ``variable`` (empty when unset)."""
    raw = os.environ.get(variable, "")
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{variable} is not a JSON list of host:port: {raw[:200]}")
    return value


class NativeSettings(BaseSettings):
    """The native helpers' switches (``cdl.native``, ``cdl.kafka_native``, ingest's scanner),
    read by every process that may build or load them; env prefix ``CDL_``."""

    model_config = SettingsConfigDict(env_prefix="CDL_", extra="ignore", use_attribute_docstrings=True)

    native_required: bool | None = None
    """Whether a C helper that cannot be built or loaded is an error (true) or a fallback to the
    pure-Python path with a warning (false); unset: an error under CI (``CI=true``)."""
    ci: str = Field(default="", validation_alias="CI")
    """Set by CI systems: ``true`` (or ``1``, ``yes``) makes a helper that cannot be built an error."""
    cc: str = Field(default="", validation_alias="CC")
    """The C compiler (and its leading arguments) the helpers are built with; empty: ``cc``, else
    ``gcc``, on PATH."""
    kafka_no_native: bool = False
    """Consume through confluent-kafka's ``Consumer`` instead of the columnar C consumer
    (``cdl/rdbatch.c``): same semantics, more CPU per record."""
    ingest_no_fastscan: bool = False
    """Every ingest record takes the careful Python path, and seen ids are kept in a Python set
    (no C helper from ``services/ingest/fastscan.c``)."""
    fastscan_lib: str = ""
    """A prebuilt ingest scanner to load instead of building one (the fuzz test's hook for a
    build with AddressSanitizer and UBSan); empty: build it."""

    def required(self) -> bool:
        """Whether a helper that cannot be built is an error rather than a fallback."""
        if self.native_required is not None:
            return self.native_required
        return self.ci.strip().lower() in ("1", "true", "yes")
