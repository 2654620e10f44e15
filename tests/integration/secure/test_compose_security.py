"""compose's security, for real: deploy/compose.yml's Kafka and MinIO configurations run on the
servers this machine has (there is no Docker engine here). The tls-setup job writes its files;
the broker's properties are what the apache/kafka image makes of them and of the compose
file's KAFKA_* variables (its rules: a single '_' is a '.', '__' a '_', '___' a '-'; a value
holding '=' dropped); the provisioning job sets the users and ACLs as the admin; then the
services' users connect with compose's CA over SASL_SSL, each writing only what it owns. MinIO
serves TLS from tls-setup's certificate, and a Triton reads its repository over https with
tls-setup's bundle."""

from __future__ import annotations

import base64
import re
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import KafkaError, KafkaException

from cdl.events import Topics
from cdl.kafka.acls import GRANTS
from cdl.kafka.security import KafkaSecurity, use
from cdl_tools.settings import StackSettings
from cdl_tools.stack._components import KafkaComponent
from cdl_tools.stack._procs import free_port
from services.provision.app import provision_kafka_users
from services.provision.settings import ProvisionSettings
from services.provision.tls_setup import write_tls_setup
from tests.helpers import IN_CI
from tests.integration.secure.test_kafka_acls import _metadata, _produce
from tests.unit.test_deploy import DEPLOY, KAFKA_SECRETS, LAPTOP, _env

_SINGLE = re.compile(r"[^_]_[^_]")


def image_key(var: str) -> str:
    """A KAFKA_* variable's property as the apache/kafka image names it (its ConvertKey)."""
    key = _SINGLE.sub(lambda m: m.group(0).replace("_", "."), var[len("KAFKA_") :])
    return key.replace("___", "-").replace("__", "_").lower()


def test_the_images_naming_rules() -> None:
    assert image_key("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP") == "listener.security.protocol.map"
    assert image_key("KAFKA_LISTENER_NAME_CONTROLLER_SASL_ENABLED_MECHANISMS") == (
        "listener.name.controller.sasl.enabled.mechanisms"
    )
    assert image_key("KAFKA_FOO__BAR___BAZ") == "foo_bar-baz"


@pytest.fixture(scope="module")
def compose_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("compose-broker")
    compose = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    environ = {var: secrets.token_urlsafe(18) for var in KAFKA_SECRETS}  # an operator's real passwords
    config, trust, data = root / "config", root / "trust", root / "data"

    # tls-setup, with compose's settings (its folders here, and this machine's name)
    setup_env = _env(compose["services"]["tls-setup"], environ)
    setup = ProvisionSettings(
        kafka_sasl_password=setup_env["CDL_PROVISION_KAFKA_SASL_PASSWORD"],
        tls_ca_dir=str(root / "ca"),
        broker_config_dir=str(config),
        tls_trust_dir=str(trust),
        minio_certs_dir=str(root / "minio-certs"),
        gateway_tls_dir=str(root / "gateway-tls"),
        ingest_tls_dir=str(root / "ingest-tls"),
        broker_hosts=["localhost"],
    )
    written = write_tls_setup(setup)
    assert {p.name for p in written} == {
        *("kafka.pem", "server.properties", "client.properties", "ca.pem"),
        *("private.key", "public.crt", "bundle.pem"),
    }
    assert oct((config / "server.properties").stat().st_mode & 0o777) == "0o600"
    assert not (trust / "kafka.pem").exists() and not (config / "ca-key.pem").exists()

    # the broker: the setup's file, then the image's rendering of compose's variables
    port, controller = free_port(), free_port()
    kafka_env = _env(compose["services"]["kafka"], environ)
    props = (config / "server.properties").read_text().splitlines()
    here = {  # compose's paths and ports, this machine's
        "/mnt/shared/config": str(config),
        "/var/lib/kafka/data": str(data),
        "kafka:9092": f"localhost:{port}",
        ":9092": f":{port}",
        "localhost:9093": f"localhost:{controller}",
    }
    for var, value in sorted(kafka_env.items()):
        assert "=" not in value, var  # (the image would drop it)
        local = value
        for theirs, ours in here.items():
            local = local.replace(theirs, ours)
        props.append(f"{image_key(var)}={local}")
    properties = root / "broker.properties"
    properties.write_text("\n".join(props) + "\n")
    kafka = KafkaComponent("kafka", root / "run", {"broker": port, "controller": controller}, settings=StackSettings())
    kafka.workdir.mkdir(parents=True)
    (kafka.workdir / "log4j2.properties").write_text(
        "status = warn\nappender.console.type = Console\nappender.console.name = STDOUT\n"
        "appender.console.layout.type = PatternLayout\nappender.console.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = WARN\nrootLogger.appenderRef.stdout.ref = STDOUT\n"
    )
    cluster = base64.urlsafe_b64encode(uuid.UUID(int=7).bytes).decode().rstrip("=")
    fmt = subprocess.run(
        [*kafka._java("kafka.tools.StorageTool"), "format", "-t", cluster, "-c", str(properties)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    log = (root / "kafka.log").open("wb")
    proc = subprocess.Popen([*kafka._java("kafka.Kafka"), str(properties)], stdout=log, stderr=subprocess.STDOUT)
    bootstrap = f"localhost:{port}"
    admin = KafkaSecurity(
        "SASL_SSL",
        mechanism="PLAIN",
        username="admin",
        password=environ["CDL_KAFKA_ADMIN_PASSWORD"],
        ca_file=str(trust / "ca.pem"),
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (root / "kafka.log").read_text()[-3000:]
            try:
                _metadata({"bootstrap.servers": bootstrap, **admin.librdkafka(), "log_level": 0})
                break
            except KafkaException:
                assert time.monotonic() < deadline, (root / "kafka.log").read_text()[-3000:]
                time.sleep(1)
        yield {
            "bootstrap": bootstrap,
            "environ": environ,
            "compose": compose,
            "admin": admin,
            "trust": trust,
            "root": root,
        }
    finally:
        proc.kill()
        proc.wait(30)
        log.close()


def _user(broker: dict[str, Any], user: str, password: str | None = None) -> dict[str, Any]:
    pw = password if password is not None else broker["environ"][f"CDL_KAFKA_{user.upper()}_PASSWORD"]
    security = KafkaSecurity("SASL_SSL", username=user, password=pw, ca_file=str(broker["trust"] / "ca.pem"))
    return {"bootstrap.servers": broker["bootstrap"], **security.librdkafka(), "log_level": 0}


@pytest.mark.timeout(300)
def test_composes_broker_runs_sasl_ssl_with_a_user_per_service_and_their_acls(compose_broker: dict[str, Any]) -> None:
    broker = compose_broker
    # the provisioning job as compose configures it: the admin over PLAIN, each user's password
    job_env = _env(broker["compose"]["services"]["provision"], {**LAPTOP, **broker["environ"]})
    job = ProvisionSettings(
        kafka_bootstrap=broker["bootstrap"],
        **{f"{u}_kafka_password": job_env[f"CDL_PROVISION_{u.upper()}_KAFKA_PASSWORD"] for u in GRANTS},
    )
    assert job_env["CDL_PROVISION_KAFKA_SASL_MECHANISM"] == "PLAIN"
    use(broker["admin"], broker["bootstrap"])
    try:
        users, acls = provision_kafka_users(job)
        assert users == len(GRANTS) and acls > 0
        assert provision_kafka_users(job) == (users, acls)  # a rerun (compose restarts a failed job)
        admin_conf = {"bootstrap.servers": broker["bootstrap"], **broker["admin"].librdkafka()}
        from confluent_kafka.admin import AdminClient, NewTopic

        client = AdminClient(admin_conf)  # (kept until its answers came)
        futures = client.create_topics(
            [NewTopic(t, 1, 1) for t in (Topics.MODEL_TRAINED, Topics.MODEL_COMPRESSED, Topics.DATA_RAW)]
        )
        for fut in futures.values():
            fut.result(30)
    finally:
        use(KafkaSecurity(), broker["bootstrap"])

    with pytest.raises(KafkaException):  # no credentials
        _metadata({"bootstrap.servers": broker["bootstrap"], "log_level": 0})
    with pytest.raises(KafkaException):  # a wrong password
        _metadata(_user(broker, "trainer", password="not-it"))
    for user, owned, forbidden in (
        ("trainer", Topics.MODEL_TRAINED, Topics.MODEL_COMPRESSED),
        ("compressor", Topics.MODEL_COMPRESSED, Topics.DATA_RAW),
        ("producer", Topics.DATA_RAW, Topics.MODEL_COMPRESSED),
    ):
        conf = _user(broker, user)
        assert _produce(conf, owned) is None, user
        refused = _produce(conf, forbidden)
        assert refused is not None and refused.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, (user, refused)
    # the broker's health check logs in as the admin with tls-setup's client.properties
    client = (Path(str(broker["trust"])).parent / "config" / "client.properties").read_text()
    assert "security.protocol=SASL_SSL" in client and broker["environ"]["CDL_KAFKA_ADMIN_PASSWORD"] in client


@pytest.mark.timeout(300)
def test_composes_minio_serves_tls_that_the_services_and_triton_trust(compose_broker: dict[str, Any]) -> None:
    """MinIO as compose runs it (``--certs-dir`` holding tls-setup's key and certificate), a
    client as compose configures the services (``CDL_S3_SECURE``, ``CDL_S3_CA_FILE``: the CA
    from the trust volume), and a Triton reading ``s3://https://…`` with tls-setup's bundle in
    place of its system one (compose copies it there in Triton's container; here it is
    bind-mounted in Triton's own mount namespace)."""
    import json
    import os
    import urllib.request

    from cdl.errors import ConfigError
    from cdl.store import ObjectStore
    from cdl_tools.stack._components import TritonComponent, private_mount_prefix
    from cdl_tools.stack._procs import spawn, stop

    root, trust, compose = compose_broker["root"], compose_broker["trust"], compose_broker["compose"]
    command = compose["services"]["minio"]["command"]
    certs = command[command.index("--certs-dir") + 1]
    assert certs == "/certs" and "minio-certs:/certs:ro" in compose["services"]["minio"]["volumes"]
    settings = StackSettings()
    port, console = free_port(), free_port()
    secret = secrets.token_urlsafe(18)
    env = dict(os.environ, MINIO_ROOT_USER="cdl-admin", MINIO_ROOT_PASSWORD=secret)
    argv = [str(settings.home / "bin" / "minio"), "server", str(root / "minio-data"), "--address", f"127.0.0.1:{port}"]
    argv += ["--console-address", f"127.0.0.1:{console}", "--certs-dir", str(root / "minio-certs"), "--quiet"]
    _, minio = spawn(argv, root / "minio.log", env=env)
    tinfo = None
    try:
        services_env = _env(compose["services"]["trainer"], {**LAPTOP, **compose_broker["environ"]})
        assert services_env["CDL_S3_SECURE"] == "true"
        store = ObjectStore(f"localhost:{port}", "cdl-admin", secret, secure=True, ca_file=str(trust / "ca.pem"))
        deadline = time.monotonic() + 60
        while True:
            try:
                store.ensure_buckets()
                break
            except Exception:
                assert time.monotonic() < deadline, (root / "minio.log").read_text()[-2000:]
                time.sleep(0.5)
        store.put_bytes("cdl-triton", "m/config.pbtxt", b'name: "m"\nbackend: "python"\n')
        with pytest.raises(ConfigError, match="not trusted"):  # the system's CAs alone do not trust it
            ObjectStore(f"localhost:{port}", "cdl-admin", secret, secure=True).get_bytes("cdl-triton", "m/config.pbtxt")

        prefix = private_mount_prefix()
        if prefix is None and not IN_CI:
            pytest.skip("this machine allows no mount namespace to give Triton tls-setup's bundle")
        assert prefix is not None, "no mount namespace for Triton on this machine"
        system = Path(compose["services"]["triton"]["entrypoint"][2].split()[2])
        ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
        triton = TritonComponent(
            "triton-compose",
            root / "triton",
            ports,
            settings=settings,
            s3_endpoint=f"localhost:{port}",
            s3_user=("cdl-admin", secret),
            ca_bundle=(system, trust / "bundle.pem"),
            mount_prefix=tuple(prefix),
        )
        triton.prepare()
        _, tinfo = spawn(triton.argv(), triton.log_path, env=triton.env(), cwd=triton.workdir)
        deadline = time.monotonic() + 120
        index = urllib.request.Request(f"http://127.0.0.1:{ports['http']}/v2/repository/index", data=b"{}")
        while True:
            try:
                with urllib.request.urlopen(index, timeout=5) as answer:
                    listed = json.loads(answer.read())
                break
            except OSError:
                assert time.monotonic() < deadline, triton.log_path.read_text()[-2000:]
                time.sleep(1)
        assert [m["name"] for m in listed] == ["m"]  # read over TLS from MinIO
    finally:
        if tinfo is not None:
            stop(tinfo, 10)
        stop(minio, 10)


@pytest.mark.timeout(300)
def test_ingest_serves_tls_with_tls_setups_certificate_and_refuses_plaintext(
    compose_broker: dict[str, Any], stack: dict[str, Any], tmp_path: Path
) -> None:
    """ingest as compose configures it (every address, TLS from tls-setup's key and certificate
    in its own volume): a client trusting the CA registers a dataset; a plaintext client and a
    client that trusts only the system's CAs get nothing."""
    import grpc

    from tests.helpers import register_digits
    from tests.integration.conftest import ServiceFactory

    compose, root, trust = compose_broker["compose"], compose_broker["root"], compose_broker["trust"]
    env = _env(compose["services"]["ingest"], {**LAPTOP, **compose_broker["environ"]})
    here = {"/etc/cdl/server": str(root / "ingest-tls")}
    cert, key = (env[f"CDL_INGEST_TLS_{k}_FILE"] for k in ("CERT", "KEY"))
    for theirs, ours in here.items():
        cert, key = cert.replace(theirs, ours), key.replace(theirs, ours)
    port = free_port()
    ingest = ServiceFactory("ingest", stack, tmp_path, {})(
        grpc_host="0.0.0.0", grpc_port=str(port), tls_cert_file=cert, tls_key_file=key
    )
    ingest.start()
    try:
        ca = (trust / "ca.pem").read_bytes()
        with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(root_certificates=ca)) as channel:
            register_digits(channel, f"tls-{uuid.uuid4().hex[:6]}", min_new_records=100)
        with grpc.insecure_channel(f"localhost:{port}") as plain, pytest.raises(grpc.RpcError):
            register_digits(plain, f"tls-{uuid.uuid4().hex[:6]}", min_new_records=100)
        untrusted = grpc.ssl_channel_credentials()  # the system's CAs only
        with grpc.secure_channel(f"localhost:{port}", untrusted) as channel, pytest.raises(grpc.RpcError):
            register_digits(channel, f"tls-{uuid.uuid4().hex[:6]}", min_new_records=100)
    finally:
        ingest.stop()
