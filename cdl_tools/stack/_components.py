"""The local stack's components: how each is prepared, started and checked."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import ssl
import subprocess
import sys
import sysconfig
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdl.errors import ConfigError
from cdl_tools.settings import StackSettings

__all__ = [
    "Component",
    "KafkaComponent",
    "MinioComponent",
    "PostgresComponent",
    "ServiceComponent",
    "TritonComponent",
    "triton_install_dir",
]


@dataclass
class Component:
    """One server of the local stack."""

    name: str
    workdir: Path
    ports: dict[str, int] = field(default_factory=dict)

    def prepare(self) -> None:
        """Create directories and config files (idempotent)."""

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def healthy(self) -> bool:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What clients need to reach the component (written to the state file)."""
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"


def _http_ok(url: str, timeout: float = 1.0, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


# --------------------------------------------------------------------------- Kafka


def broker_answers(bootstrap: str) -> bool:
    """Whether a broker at ``bootstrap`` answers a metadata request within a second (as this
    process's identity towards it: cdl.kafka.security)."""
    from confluent_kafka.admin import AdminClient

    from cdl.kafka.security import secured

    try:
        # log_level 0: connection refusals while the broker boots (or is away) are expected
        admin = AdminClient(secured({"bootstrap.servers": bootstrap, "socket.timeout.ms": 1000, "log_level": 0}))
        md = admin.list_topics(timeout=1.0)
    except Exception:  # noqa: BLE001 - any failure means "not answering"
        return False
    return bool(md.brokers)


@dataclass
class KafkaComponent(Component):
    """The broker (KRaft, one node). With ``settings.kafka_security == "sasl_ssl"`` its client
    listener is SASL_SSL (SCRAM-SHA-512; the certificate from the stack's CA, ``tls_dir``), a
    second one (port ``mtls``) SSL with a client certificate required (mTLS), the
    controller's SASL_PLAINTEXT (PLAIN; KRaft's controller takes no SCRAM) on loopback, and
    the StandardAuthorizer denies what no ACL allows; ``admin`` (``admin_password``), bootstrapped
    when the storage is formatted, is the one super user."""

    settings: StackSettings = field(default_factory=StackSettings)
    admin_password: str = ""
    tls_dir: Path = Path()

    @property
    def secure(self) -> bool:
        return self.settings.kafka_security == "sasl_ssl"

    @property
    def libs(self) -> Path:
        return self.settings.home / f"kafka-{self.settings.kafka_version}" / "libs"

    @property
    def bootstrap(self) -> str:
        return f"{self.settings.host}:{self.ports['broker']}"

    def _listeners(self) -> list[str]:
        h, broker, ctl = self.settings.host, self.ports["broker"], self.ports["controller"]
        if not self.secure:
            return [
                f"listeners=PLAINTEXT://{h}:{broker},CONTROLLER://{h}:{ctl}",
                f"advertised.listeners=PLAINTEXT://{h}:{broker}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            ]
        pw = self.admin_password
        scram = f'org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="{pw}";'
        plain = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="admin" password="{pw}" user_admin="{pw}";'
        )
        keystore = self.tls_dir / "kafka.pem"
        # the mTLS listener: a client certificate of the stack's CA is required, and its subject
        # CN=<user> is the principal User:<user> (the ACLs of the SCRAM user of that name)
        mtls = self.ports.get("mtls")
        listeners, advertised = f"SASL_SSL://{h}:{broker}", f"SASL_SSL://{h}:{broker}"
        if mtls:
            listeners, advertised = f"{listeners},SSL://{h}:{mtls}", f"{advertised},SSL://{h}:{mtls}"
        return [
            f"listeners={listeners},CONTROLLER://{h}:{ctl}",
            f"advertised.listeners={advertised}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=SASL_SSL",
            "listener.security.protocol.map=CONTROLLER:SASL_PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL",
            "listener.name.ssl.ssl.client.auth=required",
            "ssl.principal.mapping.rules=RULE:^CN=([a-zA-Z0-9._-]+)$/$1/,DEFAULT",
            "sasl.enabled.mechanisms=SCRAM-SHA-512",
            "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512",
            f"listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={scram}",
            "sasl.mechanism.controller.protocol=PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
            f"listener.name.controller.plain.sasl.jaas.config={plain}",
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={keystore}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={self.tls_dir / 'ca.pem'}",
            "ssl.client.auth=none",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users=User:admin",
            "allow.everyone.if.no.acl.found=false",
        ]

    def _properties(self) -> str:
        h, ctl = self.settings.host, self.ports["controller"]
        return "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@{h}:{ctl}",
                *self._listeners(),
                f"log.dirs={self.workdir / 'data'}",
                "num.partitions=1",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=4",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "auto.create.topics.enable=true",
                "log.retention.hours=168",
                "",
            ]
        )

    def prepare(self) -> None:
        if not self.libs.is_dir() or not any(self.libs.glob("kafka_2.13-*.jar")):
            raise ConfigError("Kafka jars are missing; run scripts/setup.sh", path=str(self.libs))
        if shutil.which("java") is None:
            raise ConfigError("java is not on PATH; Kafka needs Java 17+")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.secure:
            from cdl.tls import ensure_server_cert

            ensure_server_cert(self.tls_dir, "kafka", sorted({self.settings.host, "localhost", "127.0.0.1"}))
        props = self.workdir / "server.properties"
        props.touch(mode=0o600)  # it holds the admin's password when secure
        props.chmod(0o600)  # (one written before had the umask's mode)
        props.write_text(self._properties())
        (self.workdir / "log4j2.properties").write_text(
            "\n".join(
                [
                    "status = warn",
                    "appender.console.type = Console",
                    "appender.console.name = STDOUT",
                    "appender.console.layout.type = PatternLayout",
                    "appender.console.layout.pattern = [%d] %p %m (%c)%n",
                    "rootLogger.level = WARN",
                    "rootLogger.appenderRef.stdout.ref = STDOUT",
                    "logger.kafka.name = kafka.server.KafkaRaftServer",
                    "logger.kafka.level = INFO",
                    "",
                ]
            )
        )
        if not (self.workdir / "data" / "meta.properties").exists():
            import subprocess

            cluster_id = "-"
            while cluster_id.startswith("-"):  # the storage tool would read "-…" as an option
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            result = subprocess.run(
                [
                    *self._java("kafka.tools.StorageTool"),
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(props),
                    "--ignore-formatted",
                    *(
                        ["--add-scram", f"SCRAM-SHA-512=[name=admin,password={self.admin_password}]"]
                        if self.secure
                        else []
                    ),
                ],
                capture_output=True,
                text=True,
                env=self.env(),
                check=False,
            )
            if result.returncode != 0:
                raise ConfigError(
                    "formatting Kafka storage failed", stderr=result.stderr[-2000:], stdout=result.stdout[-500:]
                )

    def _java(self, main: str) -> list[str]:
        return [
            "java",
            f"-Xmx{self.settings.kafka_heap}",
            "-XX:+UseG1GC",
            "-XX:TieredStopAtLevel=1" if main != "kafka.Kafka" else "-XX:+UseStringDeduplication",
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            "-Djava.awt.headless=true",
            "-cp",
            f"{self.libs}/*",
            main,
        ]

    def argv(self) -> list[str]:
        return [*self._java("kafka.Kafka"), str(self.workdir / "server.properties")]

    def healthy(self) -> bool:
        return broker_answers(self.bootstrap)

    def describe(self) -> dict[str, Any]:
        desc: dict[str, Any] = {"bootstrap": self.bootstrap, "version": self.settings.kafka_version}
        if self.secure:
            desc |= {"security_protocol": "SASL_SSL", "ca_file": str(self.tls_dir / "ca.pem")}
            if self.ports.get("mtls"):  # (clients with a certificate of the stack's CA: ensure_client_cert)
                desc["mtls_bootstrap"] = f"{self.settings.host}:{self.ports['mtls']}"
        return desc


# --------------------------------------------------------------------------- MinIO


@dataclass
class MinioComponent(Component):
    settings: StackSettings = field(default_factory=StackSettings)
    #: the stack's CA and server certificates (cdl.tls): MinIO serves TLS with a
    #: certificate of that CA; None: plain HTTP
    tls_dir: Path | None = None

    @property
    def binary(self) -> Path:
        return self.settings.home / "bin" / "minio"

    @property
    def endpoint(self) -> str:
        return f"{self.settings.host}:{self.ports['api']}"

    @property
    def certs_dir(self) -> Path:
        return self.workdir / "certs"

    def prepare(self) -> None:
        if not self.binary.exists():
            raise ConfigError("MinIO binary is missing; run scripts/setup.sh", path=str(self.binary))
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        if self.tls_dir is not None:  # MinIO reads a key and a certificate chain from --certs-dir
            from cdl.tls import ensure_key_and_chain

            hosts = sorted({self.settings.host, "localhost", "127.0.0.1"})
            ensure_key_and_chain(self.tls_dir, "minio", hosts, self.certs_dir)

    def argv(self) -> list[str]:
        return [
            str(self.binary),
            "server",
            str(self.workdir / "data"),
            "--address",
            self.endpoint,
            "--console-address",
            f"{self.settings.host}:{self.ports['console']}",
            *(["--certs-dir", str(self.certs_dir)] if self.tls_dir is not None else []),
            "--quiet",
            # no MD5 of every uploaded body for its ETag (a random one instead, as MinIO does
            # for encrypted objects): cdl never reads ETags as checksums, and ingest's shards
            # are hundreds of MiB per minute (docs/benchmarks.md)
            "--no-compat",
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "MINIO_ROOT_USER": self.settings.minio_access_key,
                "MINIO_ROOT_PASSWORD": self.settings.minio_secret_key,
                "MINIO_BROWSER": "off",
                "MINIO_UPDATE": "off",
            }
        )
        return env

    def healthy(self) -> bool:
        if self.tls_dir is None:
            return _http_ok(f"http://{self.endpoint}/minio/health/live")
        ca = ssl.create_default_context(cafile=str(self.tls_dir / "ca.pem"))
        return _http_ok(f"https://{self.endpoint}/minio/health/live", context=ca)

    def describe(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "access_key": self.settings.minio_access_key,
            "secret_key": self.settings.minio_secret_key,
            **({"secure": True, "ca_file": str(self.tls_dir / "ca.pem")} if self.tls_dir is not None else {}),
        }


# --------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path | None:
    """Debian's PostgreSQL binaries (``scripts/setup.sh`` installs them), the newest major."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


@dataclass
class PostgresComponent(Component):
    """A PostgreSQL server for the tuner's shared Optuna storage.

    ``initdb`` once, its data kept across restarts. Over TCP (loopback only) the
    ``cdl`` role signs in with the stack's password (SCRAM-SHA-256), set at each
    start in single-user mode; only the server's own Unix socket, in its data
    directory, trusts. PostgreSQL refuses to run as root: as root the server runs as the
    ``postgres`` system user (``setpriv``), and since that user cannot enter
    root's home, its data directory is ``/var/lib/cdl-postgres/<digest of the
    state directory>`` (still one per stack, kept across restarts).
    """

    settings: StackSettings = field(default_factory=StackSettings)

    @property
    def as_root(self) -> bool:
        return os.geteuid() == 0

    @property
    def data(self) -> Path:
        if self.as_root:
            digest = hashlib.sha256(str(self.settings.state_dir.resolve()).encode()).hexdigest()[:16]
            return Path("/var/lib/cdl-postgres") / digest
        return self.workdir / "data"

    @property
    def url(self) -> str:
        """The SQLAlchemy URL (the psycopg2 driver, a dependency of cdl)."""
        password = self.settings.postgres_password
        return f"postgresql+psycopg2://cdl:{password}@{self.settings.host}:{self.ports['port']}/postgres"

    def _as_server_user(self, argv: list[str]) -> list[str]:
        if not self.as_root:
            return argv
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *argv]

    def prepare(self) -> None:
        import subprocess

        bin_dir = postgres_bin()
        if bin_dir is None:
            raise ConfigError("PostgreSQL is missing; run scripts/setup.sh", path="/usr/lib/postgresql")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not (self.data / "PG_VERSION").exists():
            self.data.mkdir(parents=True, exist_ok=True)
            if self.as_root:
                shutil.chown(self.data.parent, "postgres", "postgres")
                shutil.chown(self.data, "postgres", "postgres")
            cmd = [str(bin_dir / "initdb"), "-D", str(self.data), "-U", "cdl", "--auth=trust", "-E", "UTF8"]
            done = subprocess.run(self._as_server_user(cmd), capture_output=True, text=True, cwd="/", check=False)
            if done.returncode != 0:
                raise ConfigError("initdb failed", output=(done.stdout + done.stderr)[-2000:])
        password = self.settings.postgres_password
        if not password or not password.replace("-", "").replace("_", "").isalnum():
            raise ConfigError("the stack's PostgreSQL password must be letters, digits, - and _")
        # a stack made before it had a password gets one too: the role's password, then the rules
        single = [str(bin_dir / "postgres"), "--single", "-D", str(self.data)]
        single += ["-c", "password_encryption=scram-sha-256"]
        try:
            done = subprocess.run(
                self._as_server_user([*single, "postgres"]),
                input=f"ALTER ROLE cdl PASSWORD '{password}';\n",
                capture_output=True,
                text=True,
                cwd="/",
                check=False,
                timeout=self.settings.start_timeout_s,  # a server that never answers fails the start
            )
        except subprocess.TimeoutExpired as exc:
            raise ConfigError("setting PostgreSQL's password timed out", seconds=self.settings.start_timeout_s) from exc
        if done.returncode != 0 or "ERROR" in done.stdout + done.stderr:
            raise ConfigError("setting PostgreSQL's password failed", output=(done.stdout + done.stderr)[-2000:])
        hba = "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n"
        (self.data / "pg_hba.conf").write_text(hba)
        if self.as_root:
            shutil.chown(self.data / "pg_hba.conf", "postgres", "postgres")

    def argv(self) -> list[str]:
        bin_dir = postgres_bin()
        assert bin_dir is not None
        cmd = [
            str(bin_dir / "postgres"),
            "-D",
            str(self.data),
            "-h",
            self.settings.host,
            "-p",
            str(self.ports["port"]),
            "-k",
            str(self.data),  # its Unix socket, where the server user may write
            "-c",
            "max_connections=200",
            "-c",
            "fsync=on",
        ]
        return self._as_server_user(cmd)

    def healthy(self) -> bool:
        import socket

        try:
            with socket.create_connection((self.settings.host, self.ports["port"]), timeout=1):
                pass
        except OSError:
            return False
        try:
            import psycopg2  # type: ignore[import-untyped]

            psycopg2.connect(self.url.replace("+psycopg2", ""), connect_timeout=2).close()
        except Exception:  # noqa: BLE001 - not accepting connections yet (starting up)
            return False
        return True

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "data": str(self.data)}


# --------------------------------------------------------------------------- Triton


def triton_install_dir(home: Path) -> Path:
    """Where set-up places the writable copy of pytriton's Triton server."""
    return home / "triton"


def _pytriton_root() -> Path:
    # find_spec does not import pytriton (importing it pulls in gevent).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("nvidia-pytriton is not installed; run scripts/setup.sh")
    return Path(next(iter(spec.submodule_search_locations)))


def ensure_triton_install(home: Path) -> Path:
    """Copy the Triton server of the nvidia-pytriton wheel to a writable place, once."""
    dest = triton_install_dir(home)
    stub_dir = dest / "backends" / "python"
    stub = stub_dir / "triton_python_backend_stub"
    if (dest / "bin" / "tritonserver").exists() and stub.exists():
        return dest
    src = _pytriton_root() / "tritonserver"
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy2(tmp / "python_backend_stubs" / ver / "triton_python_backend_stub", tmp / "backends" / "python")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


#: where Triton's S3 client (the AWS SDK's curl) looks for the system's CA bundle, in its order
SYSTEM_CA_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
)


def private_mount_prefix() -> list[str] | None:
    """The command prefix that runs a process in a mount namespace of its own, where a bind
    mount is allowed (``unshare -m`` as root, ``unshare -rm`` in a user namespace otherwise),
    or None where neither is."""
    if shutil.which("unshare") is None:
        return None
    private = "--propagation=private"  # (the default of util-linux >= 2.27; said, for older ones)
    for prefix in (["unshare", "-m", private, "--"], ["unshare", "-r", "-m", private, "--"]):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return None


def trusting_bundle(ca_file: Path, out: Path) -> tuple[Path, Path] | None:
    """(the system's CA bundle Triton reads, a copy of it with ``ca_file`` added, at ``out``),
    or None when the machine has none of the known bundles."""
    system = next((Path(p) for p in SYSTEM_CA_BUNDLES if Path(p).is_file()), None)
    if system is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    bundle = system.read_text() + "\n" + ca_file.read_text()
    if not out.is_file() or out.read_text() != bundle:  # (a running Triton has it mounted: rewritten only when changed)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(bundle)
        tmp.replace(out)
    return system, out


@dataclass
class TritonComponent(Component):
    """A Triton server reading its model repository straight from MinIO (``s3://``). With
    ``ca_bundle`` (MinIO over TLS with the stack's CA): the system's bundle Triton reads and
    the copy with the stack's CA added, bind-mounted over it in Triton's own mount namespace
    (``mount_prefix``, :func:`private_mount_prefix`)."""

    settings: StackSettings = field(default_factory=StackSettings)
    s3_endpoint: str = ""
    #: its object-store user, (access key, secret key); empty: the root user
    s3_user: tuple[str, ...] = ()
    ca_bundle: tuple[Path, Path] | None = None
    mount_prefix: tuple[str, ...] = ()

    @property
    def repository(self) -> str:
        scheme = "https://" if self.ca_bundle else ""
        return f"s3://{scheme}{self.s3_endpoint}/cdl-triton"

    def prepare(self) -> None:
        ensure_triton_install(self.settings.home)
        self.workdir.mkdir(parents=True, exist_ok=True)

    def argv(self) -> list[str]:
        if self.ca_bundle is None:
            return self._server_argv()
        system, bundle = self.ca_bundle
        bind = 'mount --bind "$0" "$1" && shift && exec "$@"'
        return [*self.mount_prefix, "sh", "-c", bind, str(bundle), str(system), *self._server_argv()]

    def _server_argv(self) -> list[str]:
        install = triton_install_dir(self.settings.home)
        h = self.settings.host
        return [
            str(install / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={install / 'backends'}",
            "--model-control-mode=explicit",
            # ready = able to serve: one model version that failed to load (a bad candidate the
            # gateway refused) must not take the whole server out of the gateway's pool
            "--strict-readiness=false",
            f"--grpc-address={h}",
            f"--grpc-port={self.ports['grpc']}",
            f"--http-address={h}",
            f"--http-port={self.ports['http']}",
            f"--metrics-address={h}",
            f"--metrics-port={self.ports['metrics']}",
            "--exit-timeout-secs=5",
            "--log-verbose=0",
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = _pytriton_root().parent / "nvidia_pytriton.libs"
        # The python backend stub loads libpython: it must be this interpreter's.
        libdir = str(sysconfig.get_config_var("LIBDIR") or "")
        paths = [str(libs), libdir, env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = ":".join(p for p in paths if p)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        access, secret = self.s3_user or (self.settings.minio_access_key, self.settings.minio_secret_key)
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = access, secret
        env["AWS_DEFAULT_REGION"] = "us-east-1"
        return env

    def healthy(self) -> bool:
        return _http_ok(f"http://{self.settings.host}:{self.ports['http']}/v2/health/ready")

    def describe(self) -> dict[str, Any]:
        h = self.settings.host
        return {
            "grpc": f"{h}:{self.ports['grpc']}",
            "http": f"{h}:{self.ports['http']}",
            "metrics": f"{h}:{self.ports['metrics']}",
            "repository": self.repository,
        }


# --------------------------------------------------------------------------- cdl services


@dataclass
class ServiceComponent(Component):
    """A cdl service process (``python -m services.<name>``) wired to this stack."""

    settings: StackSettings = field(default_factory=StackSettings)
    #: SHA-256 of the key of the service's gRPC API ("" for none): the gateway's inference key,
    #: ingest's key (the gateway's admin key comes in ``extra_env``)
    api_key_hash: str = ""
    #: settings the stack gives this service (the environment still overrides them)
    extra_env: dict[str, str] = field(default_factory=dict)
    #: the stack's endpoints (``service_env``): they override the environment's
    endpoints: dict[str, str] = field(default_factory=dict)

    @property
    def live_url(self) -> str:
        """The service's liveness endpoint."""
        return f"http://{self.settings.host}:{self.ports['metrics']}/healthz"

    @property
    def supervisor_state(self) -> Path:
        """Where its supervisor writes its state (``cdl_tools.stack.supervise``)."""
        return self.workdir / "supervisor.json"

    def argv(self) -> list[str]:
        service = [sys.executable, "-m", f"services.{self.name}"]
        if not self.settings.supervise:
            return service
        supervisor = [sys.executable, "-m", "cdl_tools.stack.supervise", "--name", self.name]
        return [*supervisor, "--live-url", self.live_url, "--state", str(self.supervisor_state), "--", *service]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        prefix = f"CDL_{self.name.upper()}_"
        env.update(self.endpoints)
        env["CDL_STATE_DIR"] = str(self.settings.state_dir)
        env[prefix + "METRICS_PORT"] = str(self.ports["metrics"])
        if "grpc" in self.ports:
            env[prefix + "GRPC_PORT"] = str(self.ports["grpc"])
        if "http" in self.ports:
            env[prefix + "HTTP_PORT"] = str(self.ports["http"])
        if self.api_key_hash:
            env[prefix + "API_KEY_HASHES"] = json.dumps([self.api_key_hash])
        if self.name in ("ingest", "trainer", "compressor"):
            # each thread (torch's; ingest's shard writers and compaction) would get a malloc
            # arena: a long run's freed memory stays fragmented over them (bench/soak); two
            # arenas and a trim after each job (ingest: once a minute) keep it flat
            env.setdefault("MALLOC_ARENA_MAX", "2")
        for k, v in self.extra_env.items():
            env.setdefault(k, v)
        root = str(Path(__file__).resolve().parent.parent.parent)
        env["PYTHONPATH"] = f"{root}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else root
        return env

    def prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.supervisor_state.unlink(missing_ok=True)  # a stopped supervisor's, not the next one's

    def healthy(self) -> bool:
        return _http_ok(f"http://{self.settings.host}:{self.ports['metrics']}/readyz")

    def describe(self) -> dict[str, Any]:
        h = self.settings.host
        return {k: f"{h}:{v}" for k, v in self.ports.items()}
