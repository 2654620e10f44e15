"""Two gateway processes in one group in front of the stack's two Triton servers: each model has one
writer (the member holding its partition), the other follows its rollout.json and model.deployed.

One model, rolled out three times while clients send through the follower without pause:

1. v1 (first version) and v2 announced: the writer loads them, both gateways route the canary; an
   admin Rollback sent to the follower (which does not own the model) is applied by the writer and
   answered once it is, with the caller's key id on model.deployed;
2. v3 announced with clients on both gateways: promoted, and each gateway's gRPC port answers
   from v3;
3. v4 announced; at its canary the writer is killed -9: the follower is given the partition,
   resumes the rollout from the document and promotes v4.

Not one request through the follower fails. The canary steps on the writer's own traffic (the
follower's requests are not counted there): with no clients on the writer, v2 waits at its first
step.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import grpc
import pytest

from cdl.auth import hash_key
from cdl.kafka import ensure_topics
from cdl.store import ObjectStore
from cdl.v1 import admin_pb2, admin_pb2_grpc, events_pb2
from services.gateway.rollout.replicas import partition_of
from tests.helpers import wait_for
from tests.integration.test_gateway_rollout import (
    FAST,
    Load,
    _announce,
    _deployed,
    _wait_serving,
    _wait_state,
    _weights,
)
from tests.models import write_affine

PARTITIONS = 3
ADMIN_KEY = "replicas-admin-key"
SETTINGS = {
    **FAST,
    "step_min_s": "1.0",
    "admin_key_hashes": json.dumps([hash_key(ADMIN_KEY)]),
    "admin_forward_timeout_s": "15",
}


def _ready(gw: Any) -> dict[str, Any]:
    """The gateway's /readyz details (also while it is not ready: a rebalance)."""
    try:
        with urllib.request.urlopen(f"http://{gw.metrics}/readyz", timeout=5) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))


def test_two_gateways_one_writer_per_model_the_other_follows_and_takes_over(
    gateway_factory: Any, kafka_bootstrap: str, object_store: ObjectStore, triton_grpcs: list[str]
) -> None:
    uid = uuid.uuid4().hex[:8]
    topics = {kind: f"test.replicas.{kind}.{uid}" for kind in ("compressed", "commands", "deployed")}
    ensure_topics(kafka_bootstrap, dict.fromkeys(topics.values(), PARTITIONS))
    group = f"cdl-gateway-replicas-{uid}"
    overrides = {f"{kind}_topic": topic for kind, topic in topics.items()} | {"group_id": group}
    first = gateway_factory(**SETTINGS, **overrides, instance=f"a-{uid}").start()
    second = gateway_factory(**SETTINGS, **overrides, instance=f"b-{uid}").start()

    # the group split the partitions between the two (a rebalance after the second joined)
    def split() -> tuple[list[int], list[int]] | None:
        held = (_ready(first)["partitions"], _ready(second)["partitions"])
        return held if all(held) else None

    held = wait_for(split, 30, "both gateways holding partitions")
    assert set(held[0]) | set(held[1]) == set(range(PARTITIONS)) and not set(held[0]) & set(held[1])
    model = next(m for i in range(1000) if partition_of(m := f"rep_{uid}_{i}", PARTITIONS) in held[0])
    writer, follower = first, second
    deployed, compressed = topics["deployed"], topics["compressed"]
    admin = admin_pb2_grpc.ModelAdminStub(grpc.insecure_channel(follower.grpc))
    key = (("authorization", f"Bearer {ADMIN_KEY}"),)

    # 1. the first version, then v2 at its canary, rolled back through the follower
    for v in (1, 2, 3, 4):
        write_affine(object_store, model, v, *_weights(v))
    _announce(kafka_bootstrap, compressed, model, 1)
    _wait_state(kafka_bootstrap, deployed, model, 1, events_pb2.ROLLOUT_STATE_PROMOTED)
    _wait_serving(writer.grpc, model, 1)
    _wait_serving(follower.grpc, model, 1)
    with Load(follower.grpc, model, threads=2) as load:
        _announce(kafka_bootstrap, compressed, model, 2)
        _wait_state(kafka_bootstrap, deployed, model, 2, events_pb2.ROLLOUT_STATE_CANARY)
        wait_for(lambda: load.versions["2"] > 0, 30, "the follower routing the canary")
        with pytest.raises(grpc.RpcError) as refused:  # the follower checks the key itself
            admin.Rollback(admin_pb2.RollbackRequest(model=model, reason="no key"), timeout=20)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:  # the writer's error comes back as it gave it
            admin.Approve(admin_pb2.ApproveRequest(model=model, version=2), metadata=key, timeout=20)
        assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION, wrong.value.details()
        answer = admin.Rollback(admin_pb2.RollbackRequest(model=model, reason="by test"), metadata=key, timeout=20)
        states = {v.version: v.state for v in answer.status.versions}
        assert answer.status.serving_version == 1 and states[2] == events_pb2.ROLLOUT_STATE_ROLLED_BACK
        load.ends_on("1", 20)
    assert load.failures == []
    rolled = _wait_state(kafka_bootstrap, deployed, model, 2, events_pb2.ROLLOUT_STATE_ROLLED_BACK)
    assert rolled.actor == f"key:{hash_key(ADMIN_KEY)[:12]}" and "by test" in rolled.reason
    audit = [json.loads(line) for line in writer.log_path.read_text().splitlines() if "admin call from" in line]
    assert [(a["method"], a["key"]) for a in audit] == [("Approve", rolled.actor), ("Rollback", rolled.actor)]

    # 2. v3 rolled out with clients on both: promoted, and answered by v3 through each gateway
    with Load(follower.grpc, model, threads=2) as load, Load(writer.grpc, model, threads=2) as on_writer:
        _announce(kafka_bootstrap, compressed, model, 3)
        _wait_state(kafka_bootstrap, deployed, model, 3, events_pb2.ROLLOUT_STATE_PROMOTED, timeout_s=60)
        load.ends_on("3", 20)
        on_writer.ends_on("3", 20)
    assert load.failures == [] and on_writer.failures == []

    # 3. v4: the writer is killed at its canary; the follower takes the partition over and finishes it
    with Load(follower.grpc, model, threads=2) as load:
        _announce(kafka_bootstrap, compressed, model, 4)
        _wait_state(kafka_bootstrap, deployed, model, 4, events_pb2.ROLLOUT_STATE_CANARY)
        killed = time.monotonic()
        writer.kill()
        wait_for(lambda: set(_ready(follower)["partitions"]) == set(range(PARTITIONS)), 60, "the takeover")
        taken = time.monotonic() - killed
        promoted = _wait_state(kafka_bootstrap, deployed, model, 4, events_pb2.ROLLOUT_STATE_PROMOTED, timeout_s=60)
        load.ends_on("4", 20)
    assert load.failures == [], load.failures[:5]
    assert promoted.actor == "gateway"
    resumed = [d for d in _deployed(kafka_bootstrap, deployed, model) if d.version == 4 and "resumed" in d.reason]
    assert resumed, "the new writer resumed v4's canary from its document"
    status = admin.RolloutStatus(admin_pb2.RolloutStatusRequest(model=model), metadata=key, timeout=10).status
    assert status.serving_version == 4
    print(f"takeover after {taken:.1f} s")
