"""Fleet-consistent serving (issue 28): with two Tritons, a server that restarts in the middle of a
rollout holds nothing (explicit model control); the gateway loads every version it routes to
(the stable one and the canary) on it before it takes traffic again, and no client request fails."""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

import tritonclient.grpc as tgrpc

from cdl.store import ObjectStore
from cdl.v1 import admin_pb2, events_pb2
from cdl_tools.settings import StackSettings
from cdl_tools.stack import LocalStack
from tests.helpers import metric_value, wait_for
from tests.integration.test_gateway_rollout import (
    FAST,
    Load,
    _admin,
    _announce,
    _wait_serving,
    _wait_state,
    _weights,
)
from tests.models import write_affine


def _held(endpoint: str, model: str) -> set[int]:
    """The versions of ``model`` the server has ready (its repository index)."""
    client = tgrpc.InferenceServerClient(endpoint)
    try:
        index = client.get_model_repository_index(as_json=True).get("models", [])
    finally:
        client.close()
    return {int(m["version"]) for m in index if m.get("name") == model and m.get("state") == "READY"}


def _successes(endpoint: str, model: str, version: int) -> int:
    client = tgrpc.InferenceServerClient(endpoint)
    try:
        stats = client.get_inference_statistics(model, str(version)).model_stats
        return int(stats[0].inference_stats.success.count) if stats else 0
    except Exception:
        return 0
    finally:
        client.close()


def test_a_triton_restarted_mid_rollout_is_resynced_before_it_serves(
    gateway_factory: Any,
    gateway_topics: dict[str, str],
    kafka_bootstrap: str,
    object_store: ObjectStore,
    fleet_settings: StackSettings,
    triton_grpcs: list[str],
) -> None:
    assert len(triton_grpcs) == 2
    slow_canary = {**FAST, "min_samples": "1000000"}  # the canary holds its first step until promoted
    gw = gateway_factory(**slow_canary).start()
    model = f"fleet_{uuid.uuid4().hex[:8]}"
    deployed, compressed = gateway_topics["deployed"], gateway_topics["compressed"]
    write_affine(object_store, model, 1, *_weights(1))
    _announce(kafka_bootstrap, compressed, model, 1)
    _wait_serving(gw.grpc, model, 1)
    write_affine(object_store, model, 2, *_weights(2))
    _announce(kafka_bootstrap, compressed, model, 2)
    _wait_state(kafka_bootstrap, deployed, model, 2, events_pb2.ROLLOUT_STATE_CANARY)
    # the canary was loaded and warmed on every server before it got its share
    assert all(_held(ep, model) == {1, 2} for ep in triton_grpcs)

    second = triton_grpcs[1]
    metrics = f"http://{gw.metrics}/metrics"

    def ready(ep: str) -> float:
        return metric_value(metrics, "cdl_gateway_triton_ready", server=ep)

    local = LocalStack(fleet_settings)
    with Load(gw.grpc, model) as load:
        wait_for(lambda: {"1", "2"} <= set(load.versions), 30, "both versions answering")
        wait_for(lambda: _successes(second, model, 1) > 0 and _successes(second, model, 2) > 0, 30, "traffic on both")
        pid = int(local.read_state()["procs"]["triton-1"]["pid"])
        os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: ready(second) == 0, 30, "the gateway to take the killed server out")
        served = sum(load.versions.values())
        wait_for(lambda: sum(load.versions.values()) > served + 50, 30, "requests served by the other server alone")
        t0 = time.monotonic()
        state = local.up()  # starts the dead server again, on its ports, holding nothing
        assert [str(t["grpc"]) for t in sorted(state["triton"], key=lambda t: str(t["grpc"]))] == sorted(triton_grpcs)
        wait_for(lambda: ready(second) == 1, 90, "the restarted server back in the gateway's pool")
        # readmitted only once it held what the gateway routes to
        assert _held(second, model) == {1, 2}
        before = (_successes(second, model, 1), _successes(second, model, 2))
        wait_for(
            lambda: _successes(second, model, 1) > before[0] and _successes(second, model, 2) > before[1],
            30,
            "traffic on the restarted server, to both versions",
        )
        rejoined_s = time.monotonic() - t0
    assert load.failures == [], load.failures[:5]
    assert rejoined_s < 90
    stub, _ = _admin(gw.grpc, None)
    stub.Promote(admin_pb2.PromoteRequest(model=model, version=2), timeout=10)
    _wait_serving(gw.grpc, model, 2)
    wait_for(lambda: all(_held(ep, model) == {2} for ep in triton_grpcs), 60, "v1 unloaded from both servers")
