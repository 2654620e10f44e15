"""The provisioning job: make what the services need, then exit (0 when all of it is there)."""

from __future__ import annotations

import sys
import time

from cdl.errors import CdlError, RetryableError
from cdl.events import Topics
from cdl.kafka.acls import provision_users
from cdl.logging import configure_logging, get_logger
from cdl.provision import provision
from cdl.store import ObjectStore
from cdl.store_access import apply_store_grants
from services.provision.settings import ProvisionSettings

__all__ = ["main", "provision_kafka_users", "run"]

log = get_logger("cdl.provision")


def run(settings: ProvisionSettings) -> int:
    """Create cdl's topics and buckets where missing, the Kafka users with their ACLs (on a
    secured broker, as its admin) and the object-store users with their policies (idempotent:
    a rerun changes nothing, a changed secret or password replaces the old one)."""
    s = settings
    kafka_users, acls = provision_kafka_users(s)
    created = provision(
        s.kafka_bootstrap, ObjectStore.from_settings(s), Topics.PARTITIONS if s.kafka_bootstrap else None
    )
    secrets = s.user_secrets()
    users = apply_store_grants(s.s3_endpoint, s.s3_access_key, s.s3_secret_key, secrets, s.s3_secure, s.s3_ca_file)
    log.info("provisioned", topics_created=len(created), kafka_users=kafka_users, acls=acls, store_users=users)
    return users


def provision_kafka_users(settings: ProvisionSettings) -> tuple[int, int]:
    """On a secured broker, as its admin: each Kafka user's SCRAM password and the ACLs of
    cdl.kafka.acls (idempotent); returns (users, ACL bindings), (0, 0) with no password given."""
    passwords = settings.kafka_passwords()
    if not passwords or not settings.kafka_bootstrap:
        return 0, 0
    return len(passwords), provision_users(settings.kafka_bootstrap, passwords)


def main(argv: list[str] | None = None) -> None:
    """``provision`` (the default): topics, buckets, users; ``provision tls``: compose's TLS
    set-up before the broker and MinIO start (services.provision.tls_setup)."""
    configure_logging("provision")
    settings = ProvisionSettings()
    args = sys.argv[1:] if argv is None else argv
    if args == ["tls"]:
        from services.provision.tls_setup import write_tls_setup

        try:
            written = write_tls_setup(settings)
        except (CdlError, OSError) as exc:
            log.error("the TLS set-up failed", error=str(exc))
            raise SystemExit(1) from exc
        log.info("TLS set up", files=[str(p) for p in written])
        return
    if args:
        log.error("unknown command: provision takes no argument, or 'tls'", given=args)
        raise SystemExit(2)
    settings.secure_process("provision")
    deadline = time.monotonic() + 120
    while True:
        try:
            run(settings)
            return
        except RetryableError as exc:  # the servers are still starting
            if time.monotonic() > deadline:
                log.error("provisioning failed: the servers did not answer", error=str(exc))
                raise SystemExit(1) from exc
            log.warning("provisioning waits for the servers", error=str(exc))
            time.sleep(2)
        except CdlError as exc:
            log.error("provisioning failed", error=str(exc))
            raise SystemExit(1) from exc
