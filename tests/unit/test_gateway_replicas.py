"""Several gateway instances, pure logic: one writer per model, the others follow its document
(services/gateway/rollout/machine.py, replicas.py)."""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from concurrent.futures import Future
from typing import Any

import grpc
import pytest

from cdl.auth import ApiKeys, hash_key
from cdl.errors import DecodeError
from cdl.v1 import admin_pb2, events_pb2
from services.gateway.rollout.admin import ModelAdminService
from services.gateway.rollout.machine import (
    Action,
    NotOwnerError,
    Phase,
    RolloutManager,
    RolloutPolicy,
    RolloutState,
    Transition,
    route_of,
)
from services.gateway.rollout.replicas import Ownership, Replies, partition_of
from services.gateway.routing import Route, RoutingTable

S = RolloutState

POLICY = RolloutPolicy(canary_steps=(0.1, 0.5, 1.0), min_samples=10, step_min_s=1.0, max_errors=3, drain_s=1.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Store:
    """The object store's rollout.json per model, shared by the instances (a JSON round trip)."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.fail = False

    def __call__(self, model: str, doc: dict[str, Any]) -> None:
        if self.fail:
            raise OSError("object store down")
        self.docs[model] = json.loads(json.dumps(doc))


class Instance:
    def __init__(self, store: Store, clock: Clock) -> None:
        self.table = RoutingTable()
        self.mgr = RolloutManager(self.table, POLICY, clock, store)
        self.store = store

    def follow(self, model: str = "m") -> bool:
        return self.mgr.follow(model, self.store.docs.get(model))


def pair() -> tuple[Instance, Instance, Store, Clock]:
    store, clock = Store(), Clock()
    return Instance(store, clock), Instance(store, clock), store, clock


def only(ts: list[Transition]) -> Transition:
    assert len(ts) == 1, ts
    return ts[0]


def roll(mgr: RolloutManager, version: int, model: str = "m") -> None:
    only(mgr.begin(model, version))
    only(mgr.loaded(model, version, True))
    only(mgr.warmed(model, version, True))


def drive(inst: Instance, n: int, model: str = "m", ok: bool = True) -> None:
    for _ in range(n):
        route = inst.table.get(model)
        assert route is not None
        version = inst.table.pick(route)
        inst.mgr.served(model, version, ok or version != route.candidate, 0.01)


# --------------------------------------------------------------------------- ownership


def test_partition_of_is_librdkafkas_consistent_partitioner() -> None:
    for model in ("digits", "m", "fashion-mnist", "ä"):
        assert partition_of(model, 3) == zlib.crc32(model.encode()) % 3
        assert partition_of(model, 1) == 0
    with pytest.raises(ValueError, match="partition"):
        partition_of("m", 0)


def test_ownership_follows_the_partitions_held() -> None:
    own = Ownership()
    models = [f"model-{i}" for i in range(30)]
    assert own.owned(models) == []  # nothing assigned yet
    own.assign([0, 2], 3)
    assert own.owned(models) == sorted(m for m in models if partition_of(m, 3) in (0, 2))
    own.revoke([0])
    assert own.owned(models) == sorted(m for m in models if partition_of(m, 3) == 2)
    other = Ownership()
    other.assign([0, 1], 3)
    # each model has exactly one writer among the group's members
    assert all(own.owns(m) != other.owns(m) for m in models)


def test_replies_reach_the_caller_once_and_forget_who_gave_up() -> None:
    replies: Replies[str] = Replies()
    fut = replies.expect("a")
    with pytest.raises(ValueError, match="already"):
        replies.expect("a")
    assert not replies.resolve("b", "not ours")
    assert replies.resolve("a", "done") and fut.result(0) == "done"
    assert not replies.resolve("a", "twice")
    gone = replies.expect("c")
    replies.forget("c")
    assert gone.cancelled() and len(replies) == 0 and not replies.resolve("c", "late")


# --------------------------------------------------------------------------- following


def test_a_follower_routes_as_the_writers_document_says_at_every_step() -> None:
    a, b, store, clock = pair()
    roll(a.mgr, 1)
    assert b.follow() and b.table.get("m") == a.table.get("m") == Route("m", 1)
    assert b.mgr.followed() == ["m"] and a.mgr.owned() == ["m"] and not b.mgr.owns("m")
    only(a.mgr.begin("m", 2))
    b.follow()
    assert b.table.get("m") == Route("m", 1)  # loading: no traffic to the candidate yet
    assert b.mgr.wanted_versions("m") == (1, 2)
    only(a.mgr.loaded("m", 2, True))
    only(a.mgr.warmed("m", 2, True))
    b.follow()
    assert b.table.get("m") == a.table.get("m") == Route("m", 1, 2, canary=0.1)
    assert b.mgr.status("m").candidate == 2 and b.mgr.status("m").state is S.CANARY
    for _ in range(3):  # step up, step up, promote
        clock.now += 1.5
        drive(a, 120)
        a.mgr.tick()
        b.follow()
        assert b.table.get("m") == a.table.get("m")
    assert b.table.get("m") == Route("m", 2) and store.docs["m"]["route"]["stable"] == 2


def test_a_follower_decides_nothing_and_refuses_changes() -> None:
    a, b, _, clock = pair()
    roll(a.mgr, 1)
    roll(a.mgr, 2)
    b.follow()
    before = b.table.get("m")
    drive(b, 50, ok=False)  # the candidate fails here: only its writer may roll it back
    clock.now += 5
    assert b.mgr.tick() == [] and not b.mgr.busy()
    assert b.table.get("m") == before
    for call in (
        lambda: b.mgr.rollback("m"),
        lambda: b.mgr.promote("m", 2),
        lambda: b.mgr.set_traffic("m", 0.5),
        lambda: b.mgr.approve("m", 2),
    ):
        with pytest.raises(NotOwnerError):
            call()
    assert b.mgr.loaded("m", 2, True) == [] and b.mgr.warmed("m", 2, True) == []
    # the writer rolls back: the follower's route loses the candidate at the next document
    only(a.mgr.rollback("m", "by hand"))
    b.follow()
    assert b.table.get("m") == Route("m", 1) and b.mgr.status("m").state is S.ROLLED_BACK


def test_follow_leaves_the_writers_own_models_and_bad_documents_alone() -> None:
    a, b, store, _ = pair()
    roll(a.mgr, 1)
    assert not a.follow()  # a writes it
    assert not b.mgr.follow("m", None)
    assert not b.mgr.follow("m", {"model": "m", "phase": "nonsense"})
    assert not b.mgr.follow("other", store.docs["m"])  # another model's document
    assert b.table.get("m") is None
    bad = dict(store.docs["m"], route={"stable": "x"})
    assert not b.mgr.follow("m", bad)
    with pytest.raises(DecodeError):
        route_of(bad, POLICY)


def test_route_of_a_document_written_before_routes_were_saved() -> None:
    a, _, store, _ = pair()
    roll(a.mgr, 1)
    roll(a.mgr, 2)
    old = {k: v for k, v in store.docs["m"].items() if k != "route"}
    assert route_of(old, POLICY) == route_of(store.docs["m"], POLICY) == Route("m", 1, 2, canary=0.1)


# --------------------------------------------------------------------------- hand-overs


def test_the_writer_dies_mid_canary_and_the_new_owner_resumes_from_the_document() -> None:
    a, b, _, clock = pair()
    roll(a.mgr, 1)
    roll(a.mgr, 2)
    clock.now += 1.5
    drive(a, 120)
    a.mgr.tick()  # canary at 50%
    b.follow()
    assert b.table.get("m") == Route("m", 1, 2, canary=0.5)
    # a is gone (kill -9): b is given its partition and restores the rollout
    load = only(b.mgr.restore(b.store.docs))
    assert (load.action, load.load) == (Action.LOAD, (1, 2)) and b.mgr.owns("m")
    assert b.table.get("m") == Route("m", 1)  # no canary until the candidate is loaded and warm again
    warm = only(b.mgr.loaded("m", 2, True))
    assert warm.action is Action.WARM
    resumed = only(b.mgr.warmed("m", 2, True))
    assert resumed.state is S.CANARY and resumed.traffic == 0.5 and "resumed" in resumed.reason
    assert b.table.get("m") == Route("m", 1, 2, canary=0.5)
    clock.now += 1.5
    drive(b, 40)
    only(b.mgr.tick())  # 100%
    clock.now += 1.5
    drive(b, 40)
    promoted = only(b.mgr.tick())
    assert promoted.state is S.PROMOTED and b.table.get("m") == Route("m", 2)


def test_a_released_model_given_back_unchanged_resumes_without_a_reload() -> None:
    a, _, store, _ = pair()
    roll(a.mgr, 1)
    roll(a.mgr, 2)
    assert a.mgr.release(["m", "unknown"]) == ["m"]
    assert not a.mgr.owns("m") and a.table.get("m") == Route("m", 1, 2, canary=0.1)  # routes on meanwhile
    assert a.mgr.tick() == [] and not a.mgr.busy()
    assert not a.follow()  # its document is still the one it saved: held, not replaced
    assert a.mgr.restore(store.docs) == [] and a.mgr.owns("m")  # a rebalance gave it back
    assert a.mgr.status("m").phase is Phase.CANARY


def test_a_released_model_changed_elsewhere_is_restored_from_the_document() -> None:
    a, b, store, _ = pair()
    roll(a.mgr, 1)
    roll(a.mgr, 2)
    a.mgr.release(["m"])
    b.mgr.restore(store.docs)  # b drove it for a while: rolled back
    only(b.mgr.rollback("m", "by hand"))
    b.mgr.release(["m"])
    assert a.mgr.restore(store.docs) == [Transition("m", 1, None, 1.0, "restored", 0, Action.SYNC, (1,))]
    assert a.table.get("m") == Route("m", 1) and a.mgr.owns("m")


def test_release_saves_what_is_not_saved_first() -> None:
    a, _, store, _ = pair()
    roll(a.mgr, 1)
    roll(a.mgr, 2)
    saved = dict(store.docs["m"])
    store.fail = True
    a.mgr.rollback("m", "by hand")
    assert store.docs["m"] == saved  # not saved yet (the next tick would retry)
    store.fail = False
    a.mgr.release(["m"])
    assert store.docs["m"]["state"] == "ROLLED_BACK" and store.docs["m"]["candidate"] == 0


def test_a_new_version_of_a_followed_model_makes_this_instance_its_writer() -> None:
    a, b, _, _ = pair()
    roll(a.mgr, 1)
    b.follow()
    t = only(b.mgr.begin("m", 2))
    assert t.action is Action.LOAD and b.mgr.owns("m")


# --------------------------------------------------------------------------- admin calls handed over


class AbortedError(Exception):
    pass


class Context:
    """What ModelAdminService reads of a grpc.aio servicer context."""

    def __init__(self, remaining: float | None = None) -> None:
        self.remaining = remaining
        self.status: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer admin"),)

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise AbortedError(details)


def admin_pair() -> tuple[ModelAdminService, ModelAdminService, list[events_pb2.GatewayCommand]]:
    """The writer's and the follower's ModelAdmin; the follower hands changes over through
    ``sent`` (answered by the test, as the writer's loop and the follower's consumer would)."""
    a, b, _, _ = pair()
    roll(a.mgr, 1)
    roll(a.mgr, 2)
    b.follow()
    keys = ApiKeys([], [hash_key("admin")])
    writer = ModelAdminService(a.mgr, lambda ts: None, keys)
    sent: list[events_pb2.GatewayCommand] = []
    waiting: dict[str, Future[events_pb2.GatewayCommandResult]] = {}

    def forward(model: str, method: str, request: bytes, actor: str, timeout_s: float) -> Future[Any]:
        command = events_pb2.GatewayCommand(
            command_id=str(len(sent)),
            model=model,
            method=method,
            request=request,
            actor=actor,
            reply_to="b",
            group="g",
            expires_unix_ms=int((time.time() + timeout_s) * 1000),
        )
        sent.append(command)
        fut: Future[events_pb2.GatewayCommandResult] = Future()
        waiting[command.command_id] = fut
        if model != "silent":  # the writer answers
            fut.set_result(writer.apply(command))
        return fut

    follower = ModelAdminService(b.mgr, lambda ts: None, keys, forward=forward, forward_timeout_s=0.3)
    return writer, follower, sent


def test_a_change_on_the_follower_is_applied_by_the_writer_and_answered_with_its_result() -> None:
    _, follower, sent = admin_pair()
    ctx = Context()
    answer = asyncio.run(follower.Rollback(admin_pb2.RollbackRequest(model="m", reason="why"), ctx))  # type: ignore[arg-type]
    assert ctx.status is None and [c.method for c in sent] == ["Rollback"]
    assert sent[0].actor == f"key:{hash_key('admin')[:12]}"
    states = {v.version: v.state for v in answer.status.versions}
    assert answer.status.serving_version == 1 and states[2] == events_pb2.ROLLOUT_STATE_ROLLED_BACK
    # the writer's refusal comes back with its code
    ctx = Context()
    with pytest.raises(AbortedError):
        asyncio.run(follower.Approve(admin_pb2.ApproveRequest(model="m", version=2), ctx))  # type: ignore[arg-type]
    assert ctx.status is not None and ctx.status[0] == grpc.StatusCode.NOT_FOUND  # no candidate any more
    # reads are answered where they arrive
    ctx = Context()
    status = asyncio.run(follower.RolloutStatus(admin_pb2.RolloutStatusRequest(model="m"), ctx))  # type: ignore[arg-type]
    assert ctx.status is None and status.status.serving_version == 1 and len(sent) == 2


def test_an_owner_that_does_not_answer_is_deadline_exceeded_and_a_late_command_is_dropped() -> None:
    writer, follower, sent = admin_pair()
    ctx = Context(remaining=30.0)
    started = time.monotonic()
    with pytest.raises(AbortedError):
        asyncio.run(follower.Rollback(admin_pb2.RollbackRequest(model="silent"), ctx))  # type: ignore[arg-type]
    assert ctx.status is not None and ctx.status[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not answer in time" in ctx.status[1] and time.monotonic() - started < 5
    late = events_pb2.GatewayCommand()
    late.CopyFrom(sent[0])
    late.model, late.expires_unix_ms = "m", int(time.time() * 1000) - 1
    late.request = admin_pb2.RollbackRequest(model="m").SerializeToString()
    result = writer.apply(late)
    assert result.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and "not applied" in result.details
    assert (
        writer.apply(events_pb2.GatewayCommand(model="m", method="ListModels")).code
        == (grpc.StatusCode.INVALID_ARGUMENT.value[0])
    )
    status = asyncio.run(writer.RolloutStatus(admin_pb2.RolloutStatusRequest(model="m"), Context()))  # type: ignore[arg-type]
    assert status.status.versions[1].state == events_pb2.ROLLOUT_STATE_CANARY  # nothing applied


def test_the_callers_deadline_bounds_the_wait() -> None:
    _, follower, _ = admin_pair()
    ctx = Context(remaining=0.1)
    started = time.monotonic()
    with pytest.raises(AbortedError):
        asyncio.run(follower.Rollback(admin_pb2.RollbackRequest(model="silent"), ctx))  # type: ignore[arg-type]
    assert ctx.status is not None and ctx.status[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.3
