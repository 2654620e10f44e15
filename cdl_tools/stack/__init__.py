"""The local stack: real Kafka (KRaft), MinIO and Triton servers on loopback.

``LocalStack(settings).up()`` starts what is not running yet, waits until each
component is healthy, creates cdl's topics and buckets, and writes
``<state_dir>/stack.json`` (endpoints, pids) for the tooling and tests. The
services it starts get its endpoints in their environment
(:func:`service_env`); a service never reads the state file.
``down()`` stops exactly the processes recorded there.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdl.errors import StackError, UnavailableError
from cdl.store_access import STORE_GRANTS, store_user
from cdl.tls import write_private
from cdl_tools.settings import StackSettings
from cdl_tools.stack._components import (
    Component,
    KafkaComponent,
    MinioComponent,
    PostgresComponent,
    ServiceComponent,
    TritonComponent,
    ensure_triton_install,
)
from cdl_tools.stack._probe import describe_live, read_supervisor_state
from cdl_tools.stack._procs import ProcInfo, free_port, group_members, is_alive, port_taken, spawn, stop

if TYPE_CHECKING:
    from cdl.store import ObjectStore

__all__ = ["LocalStack", "ProgressFn", "ensure_triton_install", "service_env", "stack_store", "use_stack_identity"]

#: called as progress(component, phase, detail); phase in starting/healthy/ready/failed/stopped
ProgressFn = Callable[[str, str, str], None]


def _noop(component: str, phase: str, detail: str) -> None:
    return None


def _digest(key: str) -> str:
    """An API key as services' settings hold it (``cdl.auth.hash_key``: SHA-256, hex)."""
    return hashlib.sha256(key.encode()).hexdigest()


def use_stack_identity(state: dict[str, Any], user: str = "admin") -> None:
    """Make this process ``user`` of the stack of ``state`` towards its broker (nothing when the
    stack's Kafka is plaintext): the CLI, the demo and the tests are its operator, ``admin``."""
    from cdl.kafka.security import KafkaSecurity, use

    kafka = state.get("kafka", {})
    if kafka.get("security_protocol") != "SASL_SSL":
        return
    password = state["kafka_users"][user]
    use(KafkaSecurity("SASL_SSL", username=user, password=password, ca_file=kafka["ca_file"]), kafka["bootstrap"])


def _kept_security(state: dict[str, Any]) -> dict[str, Any]:
    """What the stack of ``state`` keeps for its life of its servers' security: its broker's
    (its storage holds the admin's credentials, or none) and its MinIO's TLS. A stack made before
    these were settings has a plaintext broker and says in its description whether MinIO is
    secure; a new stack (no state) keeps nothing yet."""
    kept: dict[str, Any] = {}
    if state.get("kafka_security"):
        kept["kafka_security"] = state["kafka_security"]
    elif "kafka" in state:
        kept["kafka_security"] = "plaintext"
    if "minio_tls" in state:
        kept["minio_tls"] = bool(state["minio_tls"])
    elif "minio" in state:
        kept["minio_tls"] = bool(state["minio"].get("secure"))
    return kept


def stack_store(state: dict[str, Any], access_key: str = "", secret_key: str = "") -> ObjectStore:
    """A client of the object store of the stack of ``state``: over TLS trusting the stack's CA
    when MinIO serves it; as the root user unless ``access_key`` and ``secret_key`` are given."""
    from cdl.store import ObjectStore

    m = state["minio"]
    key, secret = (access_key, secret_key) if access_key else (m["access_key"], m["secret_key"])
    return ObjectStore(m["endpoint"], key, secret, bool(m.get("secure")), m.get("ca_file", ""))


def service_env(state: dict[str, Any]) -> dict[str, str]:
    """The environment that points a cdl service at the stack of ``state`` (its ``stack.json``):
    the generic connection variables every service reads (``cdl.settings.SHARED_FIELDS``), the
    state directory, and the tuner's study storage when the stack has PostgreSQL; each service's
    own object-store key (never the root's) and, on a secured broker, its own Kafka user."""
    env: dict[str, str] = {}
    if state.get("state_dir"):
        env["CDL_STATE_DIR"] = str(state["state_dir"])
    if "kafka" in state:
        env["CDL_KAFKA_BOOTSTRAP"] = str(state["kafka"]["bootstrap"])
    if "minio" in state:
        m = state["minio"]
        env["CDL_S3_ENDPOINT"] = m["endpoint"]
        if m.get("secure"):  # TLS with the stack's CA
            env |= {"CDL_S3_SECURE": "true", "CDL_S3_CA_FILE": m["ca_file"]}
        if not state.get("minio_users"):  # (a stack from before its users: the root key for all)
            env |= {"CDL_S3_ACCESS_KEY": m["access_key"], "CDL_S3_SECRET_KEY": m["secret_key"]}
    tritons = state.get("triton", [])
    if tritons:
        env["CDL_TRITON_GRPC"] = json.dumps([t["grpc"] for t in tritons])
        if all(t.get("http") for t in tritons):
            env["CDL_TRITON_HTTP"] = json.dumps([t["http"] for t in tritons])
    if state.get("postgres", {}).get("url"):
        env["CDL_TUNER_STORAGE_URL"] = str(state["postgres"]["url"])
    for name, secret in state.get("minio_users", {}).items():  # each service with its own key (cdl.store_access)
        if name != "triton":
            env[f"CDL_{name.upper()}_S3_ACCESS_KEY"] = store_user(name)
            env[f"CDL_{name.upper()}_S3_SECRET_KEY"] = secret
    kafka = state.get("kafka", {})
    if kafka.get("security_protocol") == "SASL_SSL":  # each service as its own user (cdl.kafka.acls)
        env |= {"CDL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "CDL_KAFKA_SSL_CA_FILE": kafka["ca_file"]}
        keys = Path(state["state_dir"]) / "keys" / "kafka"
        for user in state.get("kafka_users", {}):
            if user not in ("admin", "producer"):
                env[f"CDL_{user.upper()}_KAFKA_SASL_USERNAME"] = user
                env[f"CDL_{user.upper()}_KAFKA_SASL_PASSWORD_FILE"] = str(keys / f"{user}.password")
    return env


class LocalStack:
    """Start, inspect and stop the local stack recorded under ``settings.state_dir``."""

    def __init__(self, settings: StackSettings | None = None) -> None:
        self.settings = settings or StackSettings()
        self.state_dir = Path(self.settings.state_dir)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        #: how a Triton trusts a TLS MinIO (``_triton_trust``), once worked out
        self._trust: tuple[tuple[tuple[Path, Path], tuple[str, ...]], ...] | None = None
        #: the passwords of the stack's Kafka users when its broker is secured (``up``)
        self.kafka_users: dict[str, str] = {}
        #: components the last ``up()`` found already running (and left alone)
        self.reused: list[str] = []

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.state_dir / "stack.json"

    def read_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        write_private(self.state_path, json.dumps(state, indent=2, sort_keys=True).encode())  # it holds the keys

    # ------------------------------------------------------------------ components
    def _port(self, configured: int) -> int:
        return configured or free_port(self.settings.host)

    @property
    def signing_key_path(self) -> Path:
        """The stack's model-signing key (cdl.signing): the compressor signs with it, the gateway
        trusts its public key; made at the first start, kept with the state (mode 0600)."""
        return self.state_dir / "keys" / "model-signing.pem"

    def _kept(self, state: dict[str, Any]) -> StackSettings:
        """The settings, with what the stack of ``state`` keeps (its secrets, its broker's
        security) where they give none."""
        update: dict[str, Any] = {}
        for kept in ("minio_secret_key", "postgres_password"):
            if not getattr(self.settings, kept) and state.get(kept):
                update[kept] = state[kept]
        return self.settings.model_copy(update=update | _kept_security(state))

    def _triton_trust(self) -> tuple[tuple[Path, Path], tuple[str, ...]] | None:
        """How a Triton trusts a MinIO that serves TLS with the stack's CA: (the system's CA
        bundle it reads, the copy with the stack's CA added) and the prefix that runs it in a
        mount namespace of its own; None where this machine allows no such namespace."""
        if self._trust is None:
            from cdl.tls import ensure_ca
            from cdl_tools.stack._components import private_mount_prefix, trusting_bundle

            prefix = private_mount_prefix()
            bundle = trusting_bundle(ensure_ca(self.tls_dir)[0], self.tls_dir / "triton-ca-bundle.pem")
            self._trust = ((bundle, tuple(prefix)),) if prefix is not None and bundle is not None else ()
        return self._trust[0] if self._trust else None

    @property
    def tls_dir(self) -> Path:
        """The stack's CA and server certificates (``cdl.tls``)."""
        return self.state_dir / "keys" / "tls"

    def kafka_password_file(self, user: str) -> Path:
        """Where the password of the stack's Kafka user ``user`` is kept (mode 0600)."""
        return self.state_dir / "keys" / "kafka" / f"{user}.password"

    def _components(
        self,
        previous: dict[str, Any],
        keys: dict[str, str] | None = None,
        trusted_key: str = "",
        triton_secret: str = "",
    ) -> list[Component]:
        """The stack's components; ``keys``: the stack's ``api_key``, ``admin_key`` and
        ``ingest_key`` (each service gets the digest of its own); ``triton_secret``: the secret of
        Triton's object-store user (empty: the root user's)."""
        keys = keys or {}
        s, d = self._kept(previous), self.state_dir
        admin_password = self.kafka_users.get("admin") or previous.get("kafka_users", {}).get("admin", "")

        def old_ports(name: str) -> dict[str, int]:
            return dict(previous.get("ports", {}).get(name, {}))

        kafka_ports = old_ports("kafka") or {
            "broker": self._port(s.kafka_port),
            "controller": free_port(s.host),
        }
        broker = previous.get("procs", {}).get("kafka")
        if (
            s.kafka_security == "sasl_ssl"
            and "mtls" not in kafka_ports
            and not (broker and is_alive(ProcInfo(**broker)))
        ):
            kafka_ports["mtls"] = free_port(s.host)  # the mTLS listener (a broker still running from before has none)
        minio_ports = old_ports("minio") or {"api": self._port(s.minio_port), "console": free_port(s.host)}
        comps: list[Component] = [
            KafkaComponent(
                "kafka",
                d / "kafka",
                kafka_ports,
                settings=s,
                admin_password=admin_password,
                tls_dir=self.tls_dir,
            ),
            MinioComponent(
                "minio", d / "minio", minio_ports, settings=s, tls_dir=self.tls_dir if s.minio_tls else None
            ),
        ]
        if s.postgres:
            pg_ports = old_ports("postgres") or {"port": self._port(s.postgres_port)}
            comps.append(PostgresComponent("postgres", d / "postgres", pg_ports, settings=s))
        for i in range(s.triton_servers):
            name = f"triton-{i}"
            base = s.triton_base_port + 3 * i if s.triton_base_port else 0
            ports = old_ports(name) or {
                "grpc": base or free_port(s.host),
                "http": base + 1 if base else free_port(s.host),
                "metrics": base + 2 if base else free_port(s.host),
            }
            s3_user = (store_user("triton"), triton_secret) if triton_secret else ()
            endpoint = f"{s.host}:{minio_ports['api']}"
            trust = self._triton_trust() if s.minio_tls else None
            comps.append(
                TritonComponent(
                    name,
                    d / name,
                    ports,
                    settings=s,
                    s3_endpoint=endpoint,
                    s3_user=s3_user,
                    ca_bundle=trust[0] if trust else None,
                    mount_prefix=trust[1] if trust else (),
                )
            )
        grpc_services = {"ingest", "gateway"}
        for name in s.services:
            ports = old_ports(name) or {"metrics": free_port(s.host)}
            if name in grpc_services and "grpc" not in ports:
                ports["grpc"] = free_port(s.host)
            if name == "gateway" and "http" not in ports:  # the REST/HTTP v2 endpoint
                ports["http"] = free_port(s.host)
            key = keys.get("ingest_key" if name == "ingest" else "api_key", "") if name in grpc_services else ""
            key_hash = _digest(key) if key else ""
            extra: dict[str, str] = {}
            if name == "tuner":
                extra["CDL_TUNER_WORKERS"] = str(s.tuner_workers)  # its storage: service_env
            elif name == "compressor":  # the private key: the compressor's alone
                extra["CDL_COMPRESSOR_SIGNING_KEY_FILE"] = str(self.signing_key_path)
            elif name == "gateway":
                if trusted_key:
                    extra["CDL_GATEWAY_TRUSTED_KEYS"] = json.dumps([trusted_key])
                if keys.get("admin_key"):
                    extra["CDL_GATEWAY_ADMIN_KEY_HASHES"] = json.dumps([_digest(keys["admin_key"])])
            comps.append(ServiceComponent(name, d / name, ports, settings=s, api_key_hash=key_hash, extra_env=extra))
        return comps

    # ------------------------------------------------------------------ up
    def up(self, progress: ProgressFn = _noop) -> dict[str, Any]:
        """Start every component that is not already running; returns the state."""
        previous = self.read_state()
        running = {n for n, p in previous.get("procs", {}).items() if is_alive(ProcInfo(**p))}
        # a key per scope (docs/security.md): inference, admin, ingest; each kept and reused
        keys = {
            scope: getattr(self.settings, scope) or previous.get(scope) or secrets.token_urlsafe(24)
            for scope in ("api_key", "admin_key", "ingest_key")
        }
        # MinIO's root password: the stack's own, made at its first start and kept (its data is
        # written under it), unless the settings give one
        minio_secret = (
            self.settings.minio_secret_key
            or previous.get("minio_secret_key")
            or previous.get("minio", {}).get("secret_key")
            or secrets.token_urlsafe(24)
        )
        pg_password = self.settings.postgres_password or previous.get("postgres_password") or secrets.token_urlsafe(24)
        # an object-store key per service and Triton (cdl.store_access), each kept and reused
        kept_users = previous.get("minio_users", {})
        minio_users = {name: kept_users.get(name) or secrets.token_urlsafe(24) for name in STORE_GRANTS}
        # the broker's security is the stack's for its life (its storage holds the admin's credentials)
        kept = _kept_security(previous)
        kafka_security = kept.get("kafka_security", self.settings.kafka_security)
        # MinIO's TLS too; Triton must be able to trust the stack's CA, or a new MinIO stays plain
        minio_tls = kept.get("minio_tls", self.settings.minio_tls)
        needs_trust = self.settings.triton_servers and "minio" not in running
        if minio_tls and needs_trust and self._triton_trust() is None:
            minio_tls = False
            progress("minio", "starting", "plain HTTP on loopback: Triton cannot be given the stack's CA here")
        self.settings = self.settings.model_copy(
            update={
                "minio_secret_key": minio_secret,
                "postgres_password": pg_password,
                "kafka_security": kafka_security,
                "minio_tls": minio_tls,
            }
        )
        self.kafka_users = {}
        if kafka_security == "sasl_ssl":
            from cdl.kafka.acls import GRANTS

            kept = previous.get("kafka_users", {})
            self.kafka_users = {u: kept.get(u) or secrets.token_urlsafe(24) for u in ("admin", *GRANTS)}
            for user, password in self.kafka_users.items():
                write_private(self.kafka_password_file(user), password.encode())
        trusted_key = ""
        if self.settings.services:  # (imported here: the stack's module stays light for the tests' helpers)
            from cdl.signing import generate_signing_key

            trusted_key = generate_signing_key(self.signing_key_path)
        comps = self._components(previous if running else {}, keys, trusted_key, minio_users.get("triton", ""))
        self.reused = sorted(running)
        state: dict[str, Any] = {
            "state_dir": str(self.state_dir),
            **keys,
            "minio_secret_key": minio_secret,
            "postgres_password": pg_password,
            "minio_users": minio_users,
            "kafka_security": kafka_security,
            "minio_tls": minio_tls,
            **({"kafka_users": self.kafka_users} if self.kafka_users else {}),
            "ports": {c.name: c.ports for c in comps},
            "procs": {n: p for n, p in previous.get("procs", {}).items() if n in running},
            "started_at": previous.get("started_at") if running else time.time(),
        }
        kafka = next(c for c in comps if isinstance(c, KafkaComponent))
        if self.kafka_users:  # this process (the health checks, provisioning) as the stack's admin
            use_stack_identity({"kafka": kafka.describe(), "kafka_users": self.kafka_users})
        try:
            # Kafka and MinIO first (Triton reads its repository from MinIO)
            servers = [c for c in comps if isinstance(c, KafkaComponent | MinioComponent | PostgresComponent)]
            tritons = [c for c in comps if isinstance(c, TritonComponent)]
            services = [c for c in comps if isinstance(c, ServiceComponent)]
            self._start(servers, running, state, progress)
            if self.kafka_users:  # (its port may have been picked again while it started)
                use_stack_identity({"kafka": kafka.describe(), "kafka_users": self.kafka_users})
            self._provision(state, progress)
            for triton in tritons:  # (MinIO's port may have been picked again while it started)
                triton.s3_endpoint = state["minio"]["endpoint"]
            self._start(tritons, running, state, progress)
            self._write_state(state)
            for comp in services:  # the services get the endpoints in their environment
                comp.endpoints = service_env(state)
            self._start(services, running, state, progress)
        except BaseException:
            self._write_state(state)
            raise
        return state

    def _start(
        self, comps: Sequence[Component], running: set[str], state: dict[str, Any], progress: ProgressFn
    ) -> None:
        log_from: dict[str, int] = {}  # where each one's log starts for this start
        for comp in comps:
            if comp.name in running:
                progress(comp.name, "healthy", "already running")
                continue
            log_from[comp.name] = self._spawn(comp, state, progress)
        for comp in comps:
            if comp.name in log_from:
                self._until_healthy(comp, state, log_from[comp.name], progress)
            else:
                self._wait_healthy(comp, ProcInfo(**state["procs"][comp.name]), progress)
            desc = comp.describe()
            if isinstance(comp, TritonComponent):
                state["triton"] = [t for t in state.get("triton", []) if t["grpc"] != desc["grpc"]] + [desc]
            elif isinstance(comp, ServiceComponent):
                state.setdefault("services", {})[comp.name] = desc
            else:
                state[comp.name] = desc
            self._write_state(state)

    #: how often a server is started again with fresh ports when one it was given was taken before
    #: it bound it (``free_port`` picks a port free when asked; anything may bind it before the
    #: server, tens of seconds later, does)
    PORT_RETRIES = 2

    def _spawn(self, comp: Component, state: dict[str, Any], progress: ProgressFn) -> int:
        """Start ``comp``'s process and record it; returns where its log starts for this start."""
        progress(comp.name, "starting", str(comp.log_path))
        comp.prepare()
        log_from = comp.log_path.stat().st_size if comp.log_path.exists() else 0
        proc, info = spawn(comp.argv(), comp.log_path, env=comp.env(), cwd=comp.workdir)
        self._children[comp.name] = proc
        state["procs"][comp.name] = info.to_json()
        self._write_state(state)
        return log_from

    def _until_healthy(self, comp: Component, state: dict[str, Any], log_from: int, progress: ProgressFn) -> None:
        """Wait for ``comp``, just spawned, to be healthy; started again with fresh ports when it
        exited because one it was given was taken (its log from ``log_from`` says so), at most
        ``PORT_RETRIES`` times, and only with ports the settings leave to the stack."""
        for retry in range(self.PORT_RETRIES + 1):
            info = ProcInfo(**state["procs"][comp.name])
            try:
                self._wait_healthy(comp, info, progress)
                return
            except StackError:
                repick = self._picked_ports(comp)
                if retry == self.PORT_RETRIES or not repick or not port_taken(comp.log_path, log_from):
                    raise
            stop(info, self.settings.stop_timeout_s)  # (what it started may still hold the others)
            for port in repick:
                comp.ports[port] = free_port(self.settings.host)
            progress(comp.name, "retrying", f"a port it was given was taken; now {comp.ports}")
            log_from = self._spawn(comp, state, progress)

    def _picked_ports(self, comp: Component) -> list[str]:
        """The ports of ``comp`` the stack picked itself (the settings fix none of them)."""
        s = self.settings
        fixed = {
            "kafka": {"broker"} if s.kafka_port else set(),
            "minio": {"api"} if s.minio_port else set(),
            "postgres": {"port"} if s.postgres_port else set(),
        }.get(comp.name, set(comp.ports) if comp.name.startswith("triton-") and s.triton_base_port else set())
        return [port for port in comp.ports if port not in fixed]

    def _wait_healthy(self, comp: Component, info: ProcInfo, progress: ProgressFn) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        start = time.monotonic()
        while time.monotonic() < deadline:
            if comp.healthy():
                progress(comp.name, "healthy", f"{time.monotonic() - start:.1f}s")
                return
            failure = self._start_failure(comp, info)
            if failure:
                progress(comp.name, "failed", failure)
                log = str(comp.log_path)
                raise StackError(f"{comp.name} exited during start ({failure})", log=log, tail=_tail(comp.log_path))
            time.sleep(0.25)
        progress(comp.name, "failed", "timeout")
        raise StackError(
            f"{comp.name} not healthy after {self.settings.start_timeout_s}s",
            log=str(comp.log_path),
            tail=_tail(comp.log_path),
        )

    def _start_failure(self, comp: Component, info: ProcInfo) -> str:
        """Why ``comp`` stopped starting ("" while it still may): its process exited; for a
        supervised service, the service did (then its supervisor is stopped too, so that a service
        that fails to start is not left running, as without a supervisor)."""
        if not is_alive(info):
            return "exited"
        if not isinstance(comp, ServiceComponent):
            return ""
        reason = str(_supervision(comp, info).get("last_reason") or "")
        if reason:
            stop(info, self.settings.stop_timeout_s)
        return reason

    def _provision(self, state: dict[str, Any], progress: ProgressFn) -> None:
        from cdl.events import Topics
        from cdl.provision import provision
        from cdl.store import BUCKETS
        from cdl.store_access import apply_store_grants

        m = state["minio"]
        try:
            provision(
                state["kafka"]["bootstrap"],
                stack_store(state),
                Topics.PARTITIONS,
            )
        except UnavailableError as exc:
            raise StackError(exc.message, **exc.context) from exc
        if state.get("kafka_users"):
            from cdl.kafka.acls import provision_users

            passwords = {u: p for u, p in state["kafka_users"].items() if u != "admin"}
            try:
                acls = provision_users(state["kafka"]["bootstrap"], passwords)
            except UnavailableError as exc:
                raise StackError(exc.message, **exc.context) from exc
            progress("kafka", "ready", f"SASL_SSL: {len(state['kafka_users'])} users, {acls} ACLs")
        try:
            users = apply_store_grants(
                m["endpoint"],
                m["access_key"],
                m["secret_key"],
                state.get("minio_users", {}),
                bool(m.get("secure")),
                m.get("ca_file", ""),
            )
        except UnavailableError as exc:
            raise StackError(exc.message, **exc.context) from exc
        progress("kafka", "ready", f"{len(Topics.PARTITIONS)} topics")
        progress("minio", "ready", f"{len(BUCKETS)} buckets, {users} users")

    # ------------------------------------------------------------------ down
    def down(self, progress: ProgressFn = _noop, purge: bool = False) -> list[str]:
        """Stop every process recorded in the state file; returns the names stopped.

        ``purge``: also delete what the stack keeps outside its state directory (PostgreSQL's
        data when run as root): for throw-away stacks whose state directory goes too.
        """
        state = self.read_state()
        stopped = []
        procs = state.get("procs", {})
        # reverse start order: services, Triton, MinIO and PostgreSQL, then Kafka last
        rank = {"kafka": 3, "minio": 2, "postgres": 2}
        for name in sorted(procs, key=lambda n: rank.get(n, 1 if n.startswith("triton-") else 0)):
            info = ProcInfo(**procs[name])
            if stop(info, self.settings.stop_timeout_s):
                stopped.append(name)
                progress(name, "stopped", f"pid {info.pid}")
            child = self._children.pop(name, None)
            if child is not None:
                child.wait(timeout=5)
        if self.state_path.exists():
            state["procs"] = {}
            state["stopped_at"] = time.time()
            self._write_state(state)
        data = state.get("postgres", {}).get("data")
        if purge and data and not Path(data).resolve().is_relative_to(self.state_dir.resolve()):
            shutil.rmtree(data, ignore_errors=True)
        return stopped

    # ------------------------------------------------------------------ status
    def status(self) -> list[dict[str, Any]]:
        """One row per recorded component: name, pid, running, healthy, endpoint, processes, log;
        for cdl services also live (``live``, ``not live: <what is stuck>`` or ``down``), and from
        the supervisor (None when unsupervised) child_pid and restarts; None for the servers."""
        state = self.read_state()
        rows = []
        use_stack_identity(state)  # the broker's health, asked as the stack's admin when it is secured
        comps = {c.name: c for c in self._components(state)} if state.get("ports") else {}
        for name, proc in state.get("procs", {}).items():
            info = ProcInfo(**proc)
            alive = is_alive(info)
            comp = comps.get(name)
            row: dict[str, Any] = {
                "name": name,
                "pid": info.pid,
                "running": alive,
                "healthy": bool(alive and comp is not None and comp.healthy()),
                "endpoint": ", ".join(f"{k}={v}" for k, v in (comp.ports if comp else {}).items()),
                "processes": len(group_members(info.pid)),
                "log": str(comp.log_path) if comp else "",
                "live": None,
                "child_pid": None,
                "restarts": None,
            }
            if isinstance(comp, ServiceComponent):
                supervision = _supervision(comp, info)
                row["live"] = describe_live(comp.live_url) if alive else "down"
                row["child_pid"] = supervision.get("child_pid")
                row["restarts"] = supervision.get("restarts")
            rows.append(row)
        return rows

    def service_pid(self, name: str) -> int | None:
        """The pid of cdl service ``name``'s own process: its supervisor's child (None between a
        child's exit and its restart), or the recorded process when it runs unsupervised."""
        state = self.read_state()
        info = ProcInfo(**state["procs"][name])
        comp = next(c for c in self._components(state) if c.name == name)
        assert isinstance(comp, ServiceComponent), name
        supervision = _supervision(comp, info)
        if not supervision:  # unsupervised
            return info.pid
        child: int | None = supervision.get("child_pid")
        return child


def _supervision(comp: ServiceComponent, info: ProcInfo) -> dict[str, Any]:
    """The state its supervisor wrote, when ``info`` is that supervisor (else ``{}``)."""
    state = read_supervisor_state(comp.supervisor_state)
    return state if state.get("supervisor_pid") == info.pid else {}


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return ""
