"""Settings of the provisioning job (env prefix ``CDL_PROVISION_``)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from cdl.kafka.acls import GRANTS
from cdl.settings import ServiceSettings, known_default
from cdl.store_access import STORE_GRANTS

__all__ = ["ProvisionSettings"]


class ProvisionSettings(ServiceSettings):
    """The provisioning job: creates cdl's topics and buckets, and a user per service and Triton
    in the object store with its policy (cdl.store_access), as the store's root user (the
    shared ``s3_access_key`` and ``s3_secret_key``). Each ``<user>_s3_secret`` is the secret of
    that user, ``cdl-<user>``, which the service is given as its own ``s3_secret_key``.

    On a secured broker the job is its admin (the shared ``kafka_sasl_*`` fields: ``admin``,
    PLAIN), and each ``<user>_kafka_password`` is the SCRAM-SHA-512 password it sets for that
    Kafka user (cdl.kafka.acls: the services and ``producer``), with the user's ACLs; with none
    given it makes no Kafka user (the local stack makes its own), with some but not all it
    refuses (a security problem).

    ``python -m services.provision tls`` is compose's TLS set-up, before the broker and MinIO
    start: the CA (``tls_ca_dir``, kept from run to run), the broker's certificate and the SASL
    login lines with the admin's password (``broker_config_dir``, read by the broker only),
    MinIO's, the gateway's and ingest's keys and certificates (``minio_certs_dir``,
    ``gateway_tls_dir``, ``ingest_tls_dir``), and for the clients the CA's certificate
    and a copy of the system's CA bundle with it added, for Triton (``tls_trust_dir``)."""

    model_config = SettingsConfigDict(env_prefix="CDL_PROVISION_", extra="ignore", use_attribute_docstrings=True)

    ingest_s3_secret: str = ""
    """Secret key of ingest's object-store user ``cdl-ingest``."""
    trainer_s3_secret: str = ""
    """Secret key of the trainer's object-store user ``cdl-trainer``."""
    tuner_s3_secret: str = ""
    """Secret key of the tuner's object-store user ``cdl-tuner``."""
    compressor_s3_secret: str = ""
    """Secret key of the compressor's object-store user ``cdl-compressor``."""
    gateway_s3_secret: str = ""
    """Secret key of the gateway's object-store user ``cdl-gateway``."""
    monitor_s3_secret: str = ""
    """Secret key of the monitor's object-store user ``cdl-monitor``."""
    triton_s3_secret: str = ""
    """Secret key of Triton's object-store user ``cdl-triton``."""

    ingest_kafka_password: str = ""
    """SCRAM password of the Kafka user ``ingest``."""
    trainer_kafka_password: str = ""
    """SCRAM password of the Kafka user ``trainer``."""
    tuner_kafka_password: str = ""
    """SCRAM password of the Kafka user ``tuner``."""
    compressor_kafka_password: str = ""
    """SCRAM password of the Kafka user ``compressor``."""
    gateway_kafka_password: str = ""
    """SCRAM password of the Kafka user ``gateway``."""
    monitor_kafka_password: str = ""
    """SCRAM password of the Kafka user ``monitor``."""
    producer_kafka_password: str = ""
    """SCRAM password of the Kafka user ``producer`` (the applications that write ``data.raw``
    and ``data.feedback``)."""

    tls_ca_dir: str = "/var/lib/cdl-ca"
    """The TLS set-up's CA (its private key: no other container mounts it)."""
    broker_config_dir: str = "/mnt/kafka-config"
    """Where the TLS set-up writes the broker's key and certificate (``kafka.pem``), the CA's
    certificate and ``server.properties`` with its SASL login lines (the broker's
    ``/mnt/shared/config``)."""
    broker_mount_dir: str = "/mnt/shared/config"
    """Where the broker sees ``broker_config_dir`` (the apache/kafka image's file input): the
    paths in the files it reads are written as it sees them."""
    tls_trust_dir: str = "/etc/cdl/tls"
    """Where the TLS set-up writes the CA's certificate (``ca.pem``) that the clients trust."""
    broker_hosts: list[str] = ["kafka", "localhost"]
    """The names the broker's certificate is valid for (its advertised host among them)."""
    minio_certs_dir: str = "/mnt/minio-certs"
    """Where the TLS set-up writes MinIO's ``private.key`` and ``public.crt`` (its ``--certs-dir``)."""
    minio_hosts: list[str] = ["minio", "localhost"]
    """The names MinIO's certificate is valid for."""
    gateway_tls_dir: str = "/mnt/gateway-tls"
    """Where the TLS set-up writes the gateway's ``private.key`` and ``public.crt`` (its gRPC and
    REST endpoints' TLS)."""
    gateway_hosts: list[str] = ["gateway", "localhost"]
    """The names the gateway's certificate is valid for (add those its clients use)."""
    ingest_tls_dir: str = "/mnt/ingest-tls"
    """Where the TLS set-up writes ingest's ``private.key`` and ``public.crt`` (its gRPC TLS)."""
    ingest_hosts: list[str] = ["ingest", "localhost"]
    """The names ingest's certificate is valid for (add those its clients use)."""
    service_uid: int = 65534
    """The services' user (their images' ``nobody``): the gateway's and ingest's keys are theirs."""
    system_ca_bundle: str = "/etc/ssl/certs/ca-certificates.crt"
    """The system's CA bundle the TLS set-up adds the CA to (``bundle.pem`` in ``tls_trust_dir``,
    which Triton mounts over its own: its S3 client trusts only the system's bundle)."""
    broker_uid: int = 1000
    """The broker's user: the files only it reads are its own (0600)."""

    def user_secrets(self) -> dict[str, str]:
        """User (a :data:`cdl.store_access.STORE_GRANTS` name) -> its secret, for those given."""
        given = {name: str(getattr(self, f"{name}_s3_secret")) for name in STORE_GRANTS}
        return {name: secret for name, secret in given.items() if secret}

    def kafka_passwords(self) -> dict[str, str]:
        """Kafka user (a :data:`cdl.kafka.acls.GRANTS` name) -> its password, for those given."""
        given = {name: str(getattr(self, f"{name}_kafka_password")) for name in GRANTS}
        return {name: password for name, password in given.items() if password}

    def security_problems(self) -> list[str]:
        problems = super().security_problems()
        checks = [("object-store secret", set(STORE_GRANTS), self.user_secrets(), "they would share the root key")]
        if self.kafka_passwords():  # (with none, the broker's users are someone else's to make)
            checks.append(("Kafka password", set(GRANTS), self.kafka_passwords(), "they could not connect"))
        for what, names, given, consequence in checks:
            missing = sorted(names - set(given))
            if missing:
                problems.append(f"no {what} for {', '.join(missing)}: {consequence}")
            published = sorted(n for n, v in given.items() if known_default(v))
            if published:
                problems.append(f"the {what} of {', '.join(published)} is a published default")
        return problems
