"""compose's TLS set-up (``python -m services.provision tls``), run once before the broker
and MinIO start: what a SASL_SSL broker needs that its image's environment variables cannot
carry, MinIO's certificate, and what the clients trust.

- the CA (``tls_ca_dir``; kept, so a rerun issues nothing new) and the broker's key and
  certificate for ``broker_hosts`` (``kafka.pem``, Kafka's PEM keystore layout);
- ``server.properties`` with the SASL login lines: the admin's PLAIN password (the admin is the
  one super user; the provisioning job then sets each service's SCRAM password as it) and the
  SCRAM module of the client listener. The apache/kafka image reads its configuration from
  ``KAFKA_*`` variables, but drops every value that holds a ``=``, which each login line does;
  it starts from this file (its ``/mnt/shared/config``) and appends the variables;
- ``client.properties``, the broker's own health check as the admin;
- MinIO's ``private.key`` and ``public.crt`` for ``minio_hosts`` (``minio_certs_dir``), and
  the same for the gateway's and ingest's gRPC endpoints (``gateway_tls_dir``,
  ``ingest_tls_dir``: the service's user's, 0600);
- in ``tls_trust_dir``, which every client mounts: the CA's certificate (``ca.pem``), and
  ``bundle.pem``, the system's CA bundle with the CA added, which Triton mounts over its own
  (its S3 client trusts only the system's bundle).

The files only the broker reads are 0600 and the broker's (``broker_uid``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cdl.errors import ConfigError
from cdl.tls import ensure_ca, ensure_key_and_chain, ensure_server_cert, write_private
from services.provision.settings import ProvisionSettings

__all__ = ["broker_login_lines", "write_tls_setup"]

_PLAIN = "org.apache.kafka.common.security.plain.PlainLoginModule required"
_SCRAM = "org.apache.kafka.common.security.scram.ScramLoginModule required"
#: what a password may not hold inside a JAAS line's quotes (and Kafka reads its properties
#: as ISO-8859-1: only printable ASCII is the same on both sides)
_UNQUOTABLE = set('"\\;')


def broker_login_lines(admin_password: str, listener: str = "client") -> list[str]:
    """The broker's SASL login lines (server.properties): the client listener takes SCRAM-SHA-512
    (the services) and PLAIN (the admin, also the broker's own inter-broker and controller user)."""
    if not admin_password or _UNQUOTABLE & set(admin_password) or not all(" " < c <= "~" for c in admin_password):
        raise ConfigError(
            "the Kafka admin's password must be printable ASCII without spaces, quotes, backslashes or ';'"
        )
    plain = f'{_PLAIN} username="admin" password="{admin_password}" user_admin="{admin_password}";'
    return [
        f"listener.name.{listener}.plain.sasl.jaas.config={plain}",
        f"listener.name.{listener}.scram-sha-512.sasl.jaas.config={_SCRAM};",
        f"listener.name.controller.plain.sasl.jaas.config={plain}",
    ]


def write_tls_setup(settings: ProvisionSettings) -> list[Path]:
    """Write (or keep) the broker's and MinIO's files and the clients' trust; returns those written."""
    ca_dir, config, trust = (
        Path(settings.tls_ca_dir),
        Path(settings.broker_config_dir),
        Path(settings.tls_trust_dir),
    )
    ca_cert, _ = ensure_ca(ca_dir)
    lines = broker_login_lines(settings.kafka_sasl_password)
    keystore = ensure_server_cert(ca_dir, "kafka", list(settings.broker_hosts), into=config)
    properties, client = config / "server.properties", config / "client.properties"
    write_private(properties, ("\n".join(lines) + "\n").encode())
    plain = lines[0].split("=", 1)[1]
    write_private(
        client,
        "\n".join(
            [
                "security.protocol=SASL_SSL",
                "sasl.mechanism=PLAIN",
                f"sasl.jaas.config={plain}",
                "ssl.truststore.type=PEM",
                f"ssl.truststore.location={settings.broker_mount_dir}/ca.pem",  # (where the broker sees it)
                "",
            ]
        ).encode(),
    )
    written = [keystore, properties, client]
    for folder in (config, trust):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ca_cert, folder / "ca.pem")
        (folder / "ca.pem").chmod(0o644)
        written.append(folder / "ca.pem")
    if os.geteuid() == 0:  # (the job runs as root in compose: the broker's files become the broker's)
        for path in [config, *written[:3], config / "ca.pem"]:
            os.chown(path, settings.broker_uid, settings.broker_uid)
    written += ensure_key_and_chain(ca_dir, "minio", list(settings.minio_hosts), Path(settings.minio_certs_dir))
    for name, hosts, out in (
        ("gateway", settings.gateway_hosts, Path(settings.gateway_tls_dir)),
        ("ingest", settings.ingest_hosts, Path(settings.ingest_tls_dir)),
    ):  # the gRPC (and REST) endpoints' TLS, each readable by its service only
        pair = ensure_key_and_chain(ca_dir, name, list(hosts), out)
        if os.geteuid() == 0:
            for path in (out, *pair):
                os.chown(path, settings.service_uid, settings.service_uid)
        written += pair
    system = Path(settings.system_ca_bundle)
    if not system.is_file():
        raise ConfigError("no system CA bundle to add the CA to (system_ca_bundle)", path=str(system))
    bundle = trust / "bundle.pem"
    bundle.write_text(system.read_text() + "\n" + ca_cert.read_text())
    bundle.chmod(0o644)
    return [*written, bundle]
