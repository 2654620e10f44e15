"""deploy/compose.yml and the Dockerfiles against the code (no Docker engine here: they are read).

Every service's variables are fields of its settings class (or the shared connections), their
values parse, ports and dependencies match what each service needs, each Dockerfile's entry
point is a module that exists, and the gateway and monitor images carry no torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from cdl.kafka.acls import GRANTS
from cdl.settings import EX_CONFIG, ServiceSettings, known_default
from cdl.signing import generate_signing_key
from cdl.store_access import STORE_GRANTS, store_user
from tests.deployment import DEPLOY, ROOT, SERVICES, SHARED_VARIABLES, configure, settings_class, unread_variables

SLIM = ("gateway", "monitor")
HEAVY = {"torch", "onnx", "onnxruntime", "optuna", "scikit-learn", "nvidia-pytriton", "safetensors"}
#: imported when installed (this venv has them for development), never required: grpc tries
#: grpc_tools, urllib3 and aiohttp try brotli, setuptools' .pth hook loads _distutils_hack
OPTIONAL = {"brotli", "grpcio-tools", "setuptools"}
_SUBST = re.compile(r"\$\{([A-Z0-9_]+):([-?])([^}]*)\}")


def _dotenv(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {k: v for k, v in pairs}


#: what deploy/laptop.env gives compose (its variables as `docker compose --env-file` reads them)
LAPTOP = _dotenv(DEPLOY / "laptop.env")


class RefusedError(Exception):
    """What compose does with ``${VAR:?message}`` when VAR is unset or empty."""


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    return doc


def _render(value: str, environ: dict[str, str]) -> str:
    """``value`` as compose interpolates it from ``environ``: ``${VAR:-default}``, and
    ``${VAR:?message}`` refused (:class:`RefusedError`) when VAR is unset or empty."""

    def one(m: re.Match[str]) -> str:
        name, kind, rest = m.groups()
        if environ.get(name):
            return environ[name]
        if kind == "?":
            raise RefusedError(f"{name}: {rest}")
        return rest

    return _SUBST.sub(one, value)


def _env(svc: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, str]:
    """The service's environment as compose renders it from ``environ`` (deploy/laptop.env's)."""
    given = LAPTOP if environ is None else environ
    return {k: _render(str(v), given) for k, v in svc.get("environment", {}).items()}


def test_the_compose_file_has_the_servers_the_six_services_and_the_provisioning_job(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"kafka", "minio", "postgres", "triton", "provision", "tls-setup", *SERVICES}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_variable_is_a_setting_and_every_value_parses(
    name: str, compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = _env(compose["services"][name])
    cls = settings_class(name)
    unknown = unread_variables(env, cls, f"CDL_{name.upper()}_")
    assert unknown == [], f"{name}: variables no setting reads: {unknown}"
    for k in SHARED_VARIABLES - set(env):  # only what compose says (not a test stack's endpoints)
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CDL_STATE_DIR", str(tmp_path))
    settings = cls()
    assert settings.kafka_bootstrap == "kafka:9092" and settings.s3_endpoint == "minio:9000"
    assert settings.metrics_port == 9100 and settings.metrics_host == "0.0.0.0"
    values = settings.model_dump()
    if "grpc_port" in values:
        port = int(values["grpc_port"])
        assert values["grpc_host"] == "0.0.0.0"
        assert f"{port}:{port}" in compose["services"][name].get("ports", []), f"{name}: gRPC port not published"
        if "http_port" in values:  # the gateway's REST endpoint
            http = int(values["http_port"])
            assert f"{http}:{http}" in compose["services"][name]["ports"], f"{name}: REST port not published"
    else:
        assert "ports" not in compose["services"][name]


#: the object-store users' secrets compose asks for (cdl.store_access.STORE_GRANTS)
STORE_SECRETS = {f"CDL_S3_{name.upper()}_SECRET" for name in STORE_GRANTS}
#: the Kafka users' passwords compose asks for (cdl.kafka.acls.GRANTS), and the admin's
KAFKA_SECRETS = {f"CDL_KAFKA_{name.upper()}_PASSWORD" for name in GRANTS} | {"CDL_KAFKA_ADMIN_PASSWORD"}


def test_compose_has_no_default_secret_and_refuses_to_start_without_one(compose: dict[str, Any]) -> None:
    text = (DEPLOY / "compose.yml").read_text()
    needing = {"CDL_S3_SECRET_KEY", "CDL_PG_PASSWORD", *STORE_SECRETS, *KAFKA_SECRETS}
    for var in needing:
        assert f"${{{var}:-" not in text, f"{var} has a default"
    without = {k: v for k, v in LAPTOP.items() if k not in needing}
    users = [n for n, svc in compose["services"].items() if any(v in str(svc.get("environment")) for v in needing)]
    assert {"minio", "postgres", "triton", "provision", "tls-setup", *SERVICES} <= set(users)
    for name in users:
        with pytest.raises(RefusedError, match=r"docs/security\.md"):
            _env(compose["services"][name], without)
    # the laptop's secrets are published ones: only the insecure switch lets a service take them
    assert all(known_default(LAPTOP[var]) for var in needing)
    assert LAPTOP["CDL_INSECURE"] == "true"


def test_only_minio_and_the_provisioning_job_hold_the_stores_root_key(compose: dict[str, Any]) -> None:
    """Each service and Triton use their own object-store user, made by the provisioning job
    with its policy (cdl.store_access); the job is given each user's secret."""
    svcs = compose["services"]
    holders = [n for n, svc in svcs.items() if "CDL_S3_SECRET_KEY" in str(svc.get("environment"))]
    assert sorted(holders) == ["minio", "provision"]
    job = _env(svcs["provision"])
    for name in SERVICES:
        env = _env(svcs[name])
        prefix = f"CDL_{name.upper()}_"
        assert env[prefix + "S3_ACCESS_KEY"] == store_user(name), name
        assert env[prefix + "S3_SECRET_KEY"] == job[f"CDL_PROVISION_{name.upper()}_S3_SECRET"], name
        assert "CDL_S3_ACCESS_KEY" not in env and "CDL_S3_SECRET_KEY" not in env, name
    triton = _env(svcs["triton"])
    assert triton["AWS_ACCESS_KEY_ID"] == store_user("triton")
    assert triton["AWS_SECRET_ACCESS_KEY"] == job["CDL_PROVISION_TRITON_S3_SECRET"]


def test_the_provisioning_job_runs_once_before_the_services_with_its_own_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from services.provision.settings import ProvisionSettings

    svcs = compose["services"]
    job = svcs["provision"]
    assert job["entrypoint"] == ["python", "-m", "services.provision"] and job["restart"] == "on-failure"
    assert (ROOT / "services" / "provision" / "__main__.py").exists()
    env = _env(job)
    assert unread_variables(env, ProvisionSettings, "CDL_PROVISION_") == []
    configure(monkeypatch, env, tmp_path)
    settings = ProvisionSettings()
    assert set(settings.user_secrets()) == set(STORE_GRANTS)
    assert set(settings.kafka_passwords()) == set(GRANTS)
    assert settings.kafka_security().sasl and settings.kafka_sasl_username == "admin"
    assert settings.insecure and settings.security_problems()  # the laptop's published secrets
    for name in [*SERVICES, "triton"]:
        deps = svcs[name]["depends_on"]
        assert deps["provision"]["condition"] == "service_completed_successfully", name


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_service_refuses_the_laptop_setup_without_the_insecure_switch_and_takes_a_real_one(
    name: str, compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every service, configured as compose configures it: with deploy/laptop.env (published
    secrets, no keys) it starts only under CDL_INSECURE=true, otherwise exits 78 (EX_CONFIG);
    with real secrets, keys and a trusted signing key, nothing is insecure."""

    def configured(environ: dict[str, str]) -> ServiceSettings:
        configure(monkeypatch, _env(compose["services"][name], environ), tmp_path)
        return settings_class(name)()

    laptop = configured(LAPTOP)
    assert laptop.insecure and laptop.security_problems()
    laptop.refuse_insecure(name)  # allowed: each problem a warning
    strict = configured({**LAPTOP, "CDL_INSECURE": "false"})
    with pytest.raises(SystemExit) as refused:
        strict.refuse_insecure(name)
    assert refused.value.code == EX_CONFIG
    problems = " ".join(strict.security_problems())
    assert "s3_secret_key" in problems
    if name == "gateway":
        assert "api_key_hashes" in problems and "admin_key_hashes" in problems and "trusted_keys" in problems
    if name == "ingest":
        assert "api_key_hashes" in problems
    if name == "tuner":
        assert "storage_url" in problems

    digest = [hashlib.sha256(secrets.token_bytes(16)).hexdigest()]
    real = {
        "CDL_S3_SECRET_KEY": secrets.token_urlsafe(24),
        **{var: secrets.token_urlsafe(24) for var in STORE_SECRETS},
        "CDL_PG_PASSWORD": secrets.token_urlsafe(24),
        "CDL_API_KEY_HASHES": json.dumps(digest),
        "CDL_ADMIN_KEY_HASHES": json.dumps(digest[::-1]),
        "CDL_INGEST_KEY_HASHES": json.dumps(digest),
        "CDL_MODEL_TRUSTED_KEYS": json.dumps([generate_signing_key(tmp_path / "signing.pem")]),
        **{var: secrets.token_urlsafe(24) for var in KAFKA_SECRETS},
    }
    secure = configured(real)
    assert not secure.insecure and secure.security_problems() == []
    secure.refuse_insecure(name)


def test_each_service_is_its_own_kafka_user_over_sasl_ssl_and_only_the_jobs_hold_the_admins_password(
    compose: dict[str, Any],
) -> None:
    svcs = compose["services"]
    job = _env(svcs["provision"])
    for name in SERVICES:
        env = _env(svcs[name])
        prefix = f"CDL_{name.upper()}_"
        assert (
            env["CDL_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL" and env["CDL_KAFKA_SSL_CA_FILE"] == "/etc/cdl/tls/ca.pem"
        )
        assert env[prefix + "KAFKA_SASL_USERNAME"] == name
        assert env[prefix + "KAFKA_SASL_PASSWORD"] == job[f"CDL_PROVISION_{name.upper()}_KAFKA_PASSWORD"]
        assert "trust:/etc/cdl/tls:ro" in svcs[name]["volumes"], name
        assert not any("kafka-ca" in v or "kafka-config" in v for v in svcs[name]["volumes"]), name
    holders = sorted(n for n, svc in svcs.items() if "CDL_KAFKA_ADMIN_PASSWORD" in str(svc.get("environment")))
    assert holders == ["provision", "tls-setup"]
    setup = _env(svcs["tls-setup"])
    assert setup["CDL_PROVISION_KAFKA_SASL_PASSWORD"] == job["CDL_PROVISION_KAFKA_SASL_PASSWORD"]
    assert svcs["tls-setup"]["entrypoint"] == ["python", "-m", "services.provision", "tls"]
    assert svcs["kafka"]["depends_on"]["tls-setup"]["condition"] == "service_completed_successfully"


def test_minio_serves_tls_that_every_client_and_triton_trust(compose: dict[str, Any]) -> None:
    """tls-setup writes MinIO's key and certificate (its --certs-dir) and what the clients
    trust; the services verify MinIO against the CA, Triton through its system bundle, which
    tls-setup's copy with the CA added replaces before the server starts."""
    svcs = compose["services"]
    minio = svcs["minio"]
    assert minio["command"][-2:] == ["--certs-dir", "/certs"] and "minio-certs:/certs:ro" in minio["volumes"]
    assert minio["depends_on"]["tls-setup"]["condition"] == "service_completed_successfully"
    assert "minio-certs:/mnt/minio-certs" in svcs["tls-setup"]["volumes"]
    for name in [*SERVICES, "provision"]:
        env = _env(svcs[name])
        assert env["CDL_S3_SECURE"] == "true" and env["CDL_S3_CA_FILE"] == "/etc/cdl/tls/ca.pem", name
    triton = svcs["triton"]
    assert "trust:/etc/cdl/tls:ro" in triton["volumes"]
    assert "cp /etc/cdl/tls/bundle.pem /etc/ssl/certs/ca-certificates.crt" in triton["entrypoint"][2]
    assert 'exec /opt/nvidia/nvidia_entrypoint.sh "$$@"' in triton["entrypoint"][2]  # (compose: $$ is $)


@pytest.mark.parametrize("name", ["gateway", "ingest"])
def test_the_published_endpoints_serve_tls_with_a_key_only_their_service_mounts(
    name: str, compose: dict[str, Any]
) -> None:
    svcs = compose["services"]
    env = _env(svcs[name])
    prefix = f"CDL_{name.upper()}_"
    assert env[prefix + "GRPC_HOST"] == "0.0.0.0"
    assert env[prefix + "TLS_CERT_FILE"] == "/etc/cdl/server/public.crt"
    assert env[prefix + "TLS_KEY_FILE"] == "/etc/cdl/server/private.key"
    volume = f"{name}-tls:/etc/cdl/server:ro"
    holders = sorted(
        n for n, svc in svcs.items() if any(str(v).startswith(f"{name}-tls:") for v in svc.get("volumes", []))
    )
    assert holders == sorted(["tls-setup", name])  # the key: its service's and the job that writes it
    assert volume in svcs[name]["volumes"]


def test_the_brokers_variables_survive_its_image(compose: dict[str, Any]) -> None:
    """The apache/kafka image turns KAFKA_* variables into properties but drops a value holding
    '=' (every SASL login line: they come from tls-setup's file), and wants JKS files when an
    advertised listener's name holds 'SSL://' or 'SASL_'; the listener is named CLIENT."""
    from services.provision.settings import ProvisionSettings

    kafka = _env(compose["services"]["kafka"])
    assert [k for k, v in kafka.items() if "=" in v] == []
    # tls-setup writes the paths as the broker sees its files (its health check's included)
    [mount] = [v.split(":")[1] for v in compose["services"]["kafka"]["volumes"] if v.startswith("kafka-config:")]
    assert ProvisionSettings.model_fields["broker_mount_dir"].default == mount == "/mnt/shared/config"
    assert kafka["KAFKA_SSL_KEYSTORE_LOCATION"].startswith(mount + "/")
    assert kafka["KAFKA_SSL_TRUSTSTORE_LOCATION"].startswith(mount + "/")
    assert f"--command-config {mount}/client.properties" in compose["services"]["kafka"]["healthcheck"]["test"][1]
    assert "SSL://" not in kafka["KAFKA_ADVERTISED_LISTENERS"] and "SASL_" not in kafka["KAFKA_ADVERTISED_LISTENERS"]
    assert kafka["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false" and kafka["KAFKA_SUPER_USERS"] == "User:admin"


def test_the_compressor_signs_with_a_secret_only_it_mounts_and_the_gateway_trusts_keys(compose: dict[str, Any]) -> None:
    svcs = compose["services"]
    secret = "model-signing-key"
    assert _env(svcs["compressor"])["CDL_COMPRESSOR_SIGNING_KEY_FILE"] == f"/run/secrets/{secret}"
    assert [n for n, svc in svcs.items() if secret in svc.get("secrets", [])] == ["compressor"]
    assert "file" in compose["secrets"][secret]
    assert "CDL_GATEWAY_TRUSTED_KEYS" in svcs["gateway"]["environment"]


def test_connections_point_at_the_servers_as_they_are_configured(compose: dict[str, Any]) -> None:
    svcs = compose["services"]
    kafka = _env(svcs["kafka"])
    assert kafka["KAFKA_ADVERTISED_LISTENERS"] == "CLIENT://kafka:9092"
    assert "CLIENT:SASL_SSL" in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # ingest creates every topic, partitioned
    minio = _env(svcs["minio"])
    triton = svcs["triton"]
    assert "--model-repository=s3://https://minio:9000/cdl-triton" in triton["command"]
    assert "--model-control-mode=explicit" in triton["command"]  # the gateway loads and unloads
    job = _env(svcs["provision"])  # the job makes the users as the store's root
    assert job["CDL_S3_ACCESS_KEY"] == minio["MINIO_ROOT_USER"]
    assert job["CDL_S3_SECRET_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    assert json.loads(_env(svcs["gateway"])["CDL_GATEWAY_TRITON_GRPC"]) == ["triton:8001"]
    assert _env(svcs["compressor"])["CDL_COMPRESSOR_TRITON_BACKEND"] == "onnxruntime"
    pg = _env(svcs["postgres"])
    url = _env(svcs["tuner"])["CDL_TUNER_STORAGE_URL"]
    assert (
        url
        == f"postgresql+psycopg2://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    )


def test_gpus_are_reserved_for_triton_and_the_trainer(compose: dict[str, Any]) -> None:
    for name in ("triton", "trainer"):
        [device] = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"], name


def test_each_service_waits_for_what_it_uses(compose: dict[str, Any]) -> None:
    svcs = compose["services"]

    def needs(name: str) -> dict[str, str]:
        return {k: v["condition"] for k, v in svcs[name].get("depends_on", {}).items()}

    for name in SERVICES:
        deps = needs(name)
        assert deps.get("kafka") == deps.get("minio") == "service_healthy", name
        assert deps.get("provision") == "service_completed_successfully", name  # topics, buckets, users
        if name != "ingest":
            assert deps.get("ingest") == "service_healthy", name
    assert needs("tuner").get("postgres") == "service_healthy"
    assert needs("gateway").get("triton") == "service_healthy"
    for server in ("kafka", "minio", "postgres", "triton"):
        assert svcs[server].get("healthcheck", {}).get("test"), f"{server} has no health check"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_service_is_restarted_and_checked_for_liveness(name: str, compose: dict[str, Any]) -> None:
    """Compose starts a service again whenever it exits, and its health check is its liveness
    endpoint (/healthz) on the metrics port the service is given."""
    svc = compose["services"][name]
    assert svc.get("restart") == "unless-stopped", name
    check = svc.get("healthcheck", {})
    test = " ".join(check.get("test", []))
    port = _env(svc)[f"CDL_{name.upper()}_METRICS_PORT"]
    assert f"127.0.0.1:{port}/healthz" in test, f"{name}: health check is not its /healthz: {test}"
    assert check.get("interval") and check.get("retries"), name


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_dockerfile_runs_its_service_module_and_checks_its_health(name: str, compose: dict[str, Any]) -> None:
    build = compose["services"][name]["build"]
    path = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
    assert path == DEPLOY / "docker" / f"{name}.Dockerfile" and path.exists()
    text = path.read_text()
    [entry] = [line for line in text.splitlines() if line.startswith("ENTRYPOINT")]
    argv = json.loads(entry.removeprefix("ENTRYPOINT"))
    assert argv == ["python", "-m", f"services.{name}"]
    assert (ROOT / "services" / name / "__main__.py").exists()
    assert f"CDL_{name.upper()}_METRICS_PORT" in text and "/readyz" in text  # HEALTHCHECK on the service's port
    # what it installs: its own extra of the project, from the lock (nothing hand-kept)
    assert f"uv export --locked --no-dev --extra {name} " in text, f"{name}: not cdl[{name}] from uv.lock"


def test_the_gateway_image_ships_the_lane_it_serves_with() -> None:
    """The lane is built in a Go stage of the gateway's image (the Go version go.mod asks for),
    from the lane's sources, and copied where the gateway looks for it (PATH); the image runs
    the native data plane, so a missing lane is an error at start, not a silent Python port."""
    from services.gateway.dataplane.lane import MODULE, PROGRAM

    text = (DEPLOY / "docker" / "gateway.Dockerfile").read_text()
    go = re.search(r"^go (\d+\.\d+)", (MODULE / "go.mod").read_text(), re.M)
    assert go is not None
    stage = re.search(r"^FROM golang:(\d+\.\d+)\S* AS (\w+)$", text, re.M)
    assert stage is not None and stage.group(1) == go.group(1), "a Go stage of the go.mod's version"
    rel = MODULE.relative_to(ROOT).as_posix()
    assert f"COPY {rel}/ ./" in text and f"go build -trimpath -o /out/{PROGRAM} ." in text
    copied = re.search(rf"^COPY --from={stage.group(2)} /out/{PROGRAM} (\S+)$", text, re.M)
    assert copied is not None and copied.group(1) == f"/usr/local/bin/{PROGRAM}"  # on the image's PATH
    assert "ENV CDL_GATEWAY_DATA_PLANE=native" in text
    assert text.index("COPY --from=") > text.index("FROM python:")  # into the final image


def _locked(extra: str) -> list[Requirement]:
    """What an image of ``cdl[extra]`` installs: ``uv export`` of the lock, as its Dockerfile runs it."""
    uv = shutil.which("uv")
    assert uv is not None, "uv (scripts/setup.sh installs it) is not on PATH"
    argv = [uv, "export", "--locked", "--no-dev", "--extra", extra, "--no-emit-project", "--no-emit-workspace"]
    out = subprocess.run([*argv, "--no-hashes", "--no-header"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    lines = [line.strip() for line in out.stdout.splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith(("#", "-"))]


@pytest.mark.parametrize("name", SLIM)
def test_the_gateway_and_monitor_install_no_torch_by_their_extra(name: str) -> None:
    names = {r.name.lower() for r in _locked(name)}
    assert names.isdisjoint(HEAVY), f"cdl[{name}] installs {sorted(names & HEAVY)}"
    assert {"confluent-kafka", "grpcio", "protobuf"} <= names  # the library's own


@pytest.mark.parametrize("name", ["trainer", "compressor"])
def test_the_training_services_install_the_training_stack(name: str) -> None:
    assert {"torch", "onnx", "onnxruntime"} <= {r.name.lower() for r in _locked(name)}


def test_the_gateway_and_monitor_import_nothing_beyond_their_extras() -> None:
    """What importing them loads is within what their images install (``cdl[gateway]``, ``cdl[monitor]``)."""

    # (the export is the whole closure, every platform's)
    allowed = {r.name.lower() for r in _locked("gateway") + _locked("monitor")} | {"cdl"} | OPTIONAL
    code = (
        "import sys, json, importlib.metadata as md\n"
        "import services.gateway.app, services.monitor.app\n"
        "dists = md.packages_distributions()\n"
        "top = {m.split('.')[0] for m in list(sys.modules)}\n"
        "print(json.dumps(sorted({d for t in top for d in dists.get(t, [])})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    used = {d.lower().replace("_", "-") for d in json.loads(out.stdout.strip().splitlines()[-1])}
    assert used.isdisjoint(HEAVY), used & HEAVY
    assert sorted(used - allowed) == []
