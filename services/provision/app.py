"""The provisioning job: make what the services need, then exit (0 when all of it is there)."""

from __future__ import annotations

import time

from cdl.errors import CdlError, RetryableError
from cdl.events import Topics
from cdl.logging import configure_logging, get_logger
from cdl.provision import provision
from cdl.store import ObjectStore
from cdl.store_access import apply_store_grants
from services.provision.settings import ProvisionSettings

__all__ = ["main", "run"]

log = get_logger("cdl.provision")


def run(settings: ProvisionSettings) -> int:
    """Create cdl's topics and buckets where missing, and the object-store users with their
    policies (idempotent: a rerun changes nothing, a changed secret replaces the old one)."""
    store = ObjectStore.from_settings(settings)
    created = provision(settings.kafka_bootstrap, store, Topics.PARTITIONS if settings.kafka_bootstrap else None)
    s, secrets = settings, settings.user_secrets()
    users = apply_store_grants(s.s3_endpoint, s.s3_access_key, s.s3_secret_key, secrets, s.s3_secure, s.s3_ca_file)
    log.info("provisioned", topics_created=len(created), store_users=users)
    return users


def main() -> None:
    configure_logging("provision")
    settings = ProvisionSettings()
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
