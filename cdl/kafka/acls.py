"""The users of a secured cluster and what each may do: least privilege on the bus.

In an event-driven ML system the bus is the control plane: whoever may produce to
``model.compressed`` decides what the gateway loads, to ``data.raw`` what the trainer learns.
So each service is a Kafka user (SCRAM) that may write only the topics it owns and read only
those it consumes (docs/security.md has the table):

- **ingest** owns ``data.updated`` and its state topic (``cdl.ingest.*``, which it creates),
  writes to ``data.raw`` what its ``Ingest`` RPC accepts; reads ``data.raw``, ``data.feedback``
  and ``drift.detected``;
- **trainer** owns ``model.trained``; reads ``data.updated`` and ``tuning.completed``;
- **tuner** owns ``tuning.completed``; reads its four triggers;
- **compressor** owns ``model.compressed``; reads ``model.trained``;
- **gateway** owns ``model.deployed``, ``inference.logged`` and ``gateway.commands`` (ModelAdmin
  calls handed from one instance to the model's owner, and their results); reads
  ``model.compressed``, ``model.health``, ``model.deployed`` (an instance follows the rollouts
  other instances drive) and ``gateway.commands``;
- **monitor** owns ``model.health``, ``drift.detected`` and what it adds to ``data.raw`` (the
  served requests it labels); reads ``inference.logged`` and ``data.feedback``; its Faust
  topics are its own (a prefix);
- **producer** is the users' applications: ``data.raw`` and ``data.feedback`` only;
- every service writes ``data.deadletter``, may describe every topic (provisioning checks
  they exist), reads and commits as its own consumer group and holds its own transactional
  ids (both prefixed by its group id).

The operator (``cdl`` with the stack's admin user, ``cdl tune`` writing ``tuning.requested``)
is a super user. What nobody is granted is denied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cdl.errors import UnavailableError
from cdl.events import Topics

__all__ = ["GRANTS", "Grant", "apply_grants", "bindings", "provision_users", "set_passwords"]


@dataclass(frozen=True)
class Grant:
    """What one user may do."""

    reads: tuple[str, ...] = ()
    """Topics it consumes."""
    writes: tuple[str, ...] = ()
    """Topics it produces to."""
    prefixes: tuple[str, ...] = ()
    """Consumer groups and transactional ids it uses (prefixes: ``cdl-trainer`` covers
    ``cdl-trainer-0``)."""
    own_prefixes: tuple[str, ...] = ()
    """Topic prefixes it creates, reads and writes itself (ingest's state, Faust's changelogs)."""
    describe_all: bool = True
    """Whether it may describe every topic (services check their topics exist)."""


_DEAD = Topics.DATA_DEADLETTER

GRANTS: Mapping[str, Grant] = {
    "ingest": Grant(
        reads=(Topics.DATA_RAW, Topics.DATA_FEEDBACK, Topics.DRIFT_DETECTED),
        writes=(Topics.DATA_UPDATED, Topics.DATA_RAW, _DEAD),  # data.raw: its Ingest RPC's records
        prefixes=("cdl-ingest", "cdl-reader-"),
        own_prefixes=("cdl.ingest.",),  # its state topic, which it creates
    ),
    "trainer": Grant(
        reads=(Topics.DATA_UPDATED, Topics.TUNING_COMPLETED),
        writes=(Topics.MODEL_TRAINED, _DEAD),
        prefixes=("cdl-trainer",),
    ),
    "tuner": Grant(
        reads=(Topics.DATA_UPDATED, Topics.MODEL_TRAINED, Topics.DRIFT_DETECTED, Topics.TUNING_REQUESTED),
        writes=(Topics.TUNING_COMPLETED, _DEAD),
        prefixes=("cdl-tuner",),
    ),
    "compressor": Grant(
        reads=(Topics.MODEL_TRAINED,),
        writes=(Topics.MODEL_COMPRESSED, _DEAD),
        prefixes=("cdl-compressor",),
    ),
    "gateway": Grant(
        reads=(Topics.MODEL_COMPRESSED, Topics.MODEL_HEALTH, Topics.MODEL_DEPLOYED, Topics.GATEWAY_COMMANDS),
        writes=(Topics.MODEL_DEPLOYED, Topics.INFERENCE_LOGGED, Topics.GATEWAY_COMMANDS, _DEAD),
        prefixes=("cdl-gateway",),
    ),
    "monitor": Grant(
        reads=(Topics.INFERENCE_LOGGED, Topics.DATA_FEEDBACK),
        writes=(Topics.MODEL_HEALTH, Topics.DRIFT_DETECTED, Topics.DATA_RAW, _DEAD),
        prefixes=("cdl-monitor",),
        own_prefixes=("cdl-monitor-",),
    ),
    "producer": Grant(writes=(Topics.DATA_RAW, Topics.DATA_FEEDBACK), describe_all=False),
}


def bindings(user: str, grant: Grant) -> list[Any]:
    """The ACL bindings (confluent-kafka ``AclBinding``) that give ``user`` its ``grant``."""
    from confluent_kafka.admin import (  # type: ignore[attr-defined]  # exported at run time, not in its stubs
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    principal = f"User:{user}"
    out = []

    def allow(kind: Any, name: str, pattern: Any, op: Any) -> None:
        out.append(AclBinding(kind, name, pattern, principal, "*", op, AclPermissionType.ALLOW))

    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    for topic in grant.reads:
        allow(ResourceType.TOPIC, topic, literal, AclOperation.READ)
    for topic in grant.writes:
        allow(ResourceType.TOPIC, topic, literal, AclOperation.WRITE)
    if grant.describe_all:
        allow(ResourceType.TOPIC, "*", literal, AclOperation.DESCRIBE)
    else:
        for topic in grant.writes:
            allow(ResourceType.TOPIC, topic, literal, AclOperation.DESCRIBE)
    for prefix in grant.prefixes:
        allow(ResourceType.GROUP, prefix, prefixed, AclOperation.READ)
        allow(ResourceType.TRANSACTIONAL_ID, prefix, prefixed, AclOperation.WRITE)
        allow(ResourceType.TRANSACTIONAL_ID, prefix, prefixed, AclOperation.DESCRIBE)
    for prefix in grant.own_prefixes:
        for op in (AclOperation.CREATE, AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE):
            allow(ResourceType.TOPIC, prefix, prefixed, op)
        allow(ResourceType.GROUP, prefix, prefixed, AclOperation.READ)
    return out


def _admin(conf: Mapping[str, Any]) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient(dict(conf))


def set_passwords(admin_conf: Mapping[str, Any], passwords: Mapping[str, str], iterations: int = 8192) -> None:
    """Create or update the SCRAM-SHA-512 credentials of ``passwords``' users (as a super user)."""
    from confluent_kafka.admin import (  # type: ignore[attr-defined]  # exported at run time, not in its stubs
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialUpsertion,
    )

    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, iterations)
    upserts = [UserScramCredentialUpsertion(user, info, pw.encode()) for user, pw in passwords.items()]
    admin = _admin(admin_conf)  # kept until the answers came: a destroyed client fails its futures
    for user, fut in admin.alter_user_scram_credentials(upserts, request_timeout=30).items():
        try:
            fut.result()
        except Exception as exc:
            raise UnavailableError("setting a Kafka user's password failed", user=user, error=str(exc)) from exc


def apply_grants(admin_conf: Mapping[str, Any], grants: Mapping[str, Grant] = GRANTS) -> int:
    """Create the ACLs of ``grants`` (idempotent: an ACL that exists is left as it is);
    returns how many bindings were asked for."""
    wanted = [b for user, grant in grants.items() for b in bindings(user, grant)]
    admin = _admin(admin_conf)
    for binding, fut in admin.create_acls(wanted, request_timeout=30).items():
        try:
            fut.result()
        except Exception as exc:
            raise UnavailableError("creating a Kafka ACL failed", acl=str(binding), error=str(exc)) from exc
    return len(wanted)


def provision_users(bootstrap: str, passwords: Mapping[str, str]) -> int:
    """As this process's identity towards ``bootstrap`` (its admin): the SCRAM passwords of
    ``passwords``' users and the ACLs of :data:`GRANTS`; returns how many bindings were asked
    for. What the local stack and compose's provisioning job both do."""
    from cdl.kafka.security import secured

    admin = secured({"bootstrap.servers": bootstrap})
    set_passwords(admin, passwords)
    return apply_grants(admin)
