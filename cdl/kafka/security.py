"""Who a process is on the bus: TLS and SASL for every Kafka client it makes.

One process, one identity (a service is one Kafka user: the ACLs say what it may read and
write). A service sets it once at start from its settings (:meth:`ServiceSettings.secure_process
<cdl.settings.ServiceSettings.secure_process>`); every client cdl builds then carries it:
the loops' consumers and transactional producers, the columnar consumer, the admin calls,
readers, and Faust's (aiokafka) through :meth:`KafkaSecurity.faust_credentials`.

Protocols: ``PLAINTEXT`` (the default), ``SSL`` (TLS; with a client certificate: mTLS),
``SASL_PLAINTEXT`` and ``SASL_SSL`` (SCRAM-SHA-512 by default, or SCRAM-SHA-256, PLAIN).
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from typing import Any

from cdl.errors import ConfigError

__all__ = ["PROTOCOLS", "KafkaSecurity", "current", "secured", "use"]

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")


@dataclass(frozen=True)
class KafkaSecurity:
    """TLS and SASL of a Kafka client; the default is PLAINTEXT, no identity."""

    protocol: str = "PLAINTEXT"
    mechanism: str = "SCRAM-SHA-512"
    username: str = ""
    password: str = ""
    ca_file: str = ""
    """PEM of the CA that signed the brokers' certificates (empty: the system's)."""
    cert_file: str = ""
    """PEM client certificate (mTLS), with ``key_file``."""
    key_file: str = ""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"Kafka security protocol must be one of {', '.join(PROTOCOLS)}", given=self.protocol)
        if self.sasl:
            if self.mechanism not in _MECHANISMS:
                raise ConfigError(f"SASL mechanism must be one of {', '.join(_MECHANISMS)}", given=self.mechanism)
            if not self.username or not self.password:
                raise ConfigError("SASL needs a username and a password", protocol=self.protocol)
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("a client certificate needs its key, and a key its certificate")

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    def librdkafka(self) -> dict[str, str]:
        """The settings of a librdkafka client (confluent-kafka, the columnar consumer)."""
        conf = {"security.protocol": self.protocol.lower()}
        if self.sasl:
            conf |= {"sasl.mechanism": self.mechanism, "sasl.username": self.username, "sasl.password": self.password}
        if self.tls:
            if self.ca_file:
                conf["ssl.ca.location"] = self.ca_file
            if self.cert_file:
                conf |= {"ssl.certificate.location": self.cert_file, "ssl.key.location": self.key_file}
        return conf

    def ssl_context(self) -> ssl.SSLContext | None:
        """A TLS context for Python clients (aiokafka), or None without TLS."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file or None)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def faust_credentials(self) -> Any:
        """Faust's ``broker_credentials`` (None for PLAINTEXT)."""
        import faust

        if self.sasl:
            return faust.SASLCredentials(
                username=self.username,
                password=self.password,
                mechanism=self.mechanism,
                ssl_context=self.ssl_context(),
            )
        if self.tls:
            return faust.SSLCredentials(self.ssl_context())
        return None


class _Process:
    """The process's security (set by :func:`use`): one identity, or one per cluster."""

    lock = threading.Lock()
    default = KafkaSecurity()
    by_bootstrap: dict[str, KafkaSecurity] = {}  # the one registry, guarded by the lock


def use(security: KafkaSecurity, bootstrap: str = "") -> None:
    """Make ``security`` this process's: every client built from now on carries it; with
    ``bootstrap``, only the clients of that cluster (a tool that talks to several stacks)."""
    with _Process.lock:
        if bootstrap:
            _Process.by_bootstrap[bootstrap] = security
        else:
            _Process.default = security


def current(bootstrap: str = "") -> KafkaSecurity:
    """This process's Kafka security towards ``bootstrap`` (PLAINTEXT until :func:`use`)."""
    with _Process.lock:
        return _Process.by_bootstrap.get(bootstrap, _Process.default)


def secured(conf: dict[str, Any]) -> dict[str, Any]:
    """``conf`` with the security of its cluster (``bootstrap.servers``) in this process;
    what ``conf`` sets itself wins."""
    return {**current(str(conf.get("bootstrap.servers", ""))).librdkafka(), **conf}
