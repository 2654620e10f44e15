"""Settings of the provisioning job (env prefix ``CDL_PROVISION_``)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from cdl.settings import ServiceSettings, known_default
from cdl.store_access import STORE_GRANTS

__all__ = ["ProvisionSettings"]


class ProvisionSettings(ServiceSettings):
    """The provisioning job: creates cdl's topics and buckets, and a user per service and Triton
    in the object store with its policy (cdl.store_access), as the store's root user (the
    shared ``s3_access_key`` and ``s3_secret_key``). Each ``<user>_s3_secret`` is the secret of
    that user, ``cdl-<user>``, which the service is given as its own ``s3_secret_key``."""

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

    def user_secrets(self) -> dict[str, str]:
        """User (a :data:`cdl.store_access.STORE_GRANTS` name) -> its secret, for those given."""
        given = {name: str(getattr(self, f"{name}_s3_secret")) for name in STORE_GRANTS}
        return {name: secret for name, secret in given.items() if secret}

    def security_problems(self) -> list[str]:
        problems = super().security_problems()
        missing = sorted(set(STORE_GRANTS) - set(self.user_secrets()))
        if missing:
            problems.append(f"no object-store secret for {', '.join(missing)}: they would share the root key")
        published = sorted(n for n, s in self.user_secrets().items() if known_default(s))
        if published:
            problems.append(f"the object-store secret of {', '.join(published)} is a published default")
        return problems
