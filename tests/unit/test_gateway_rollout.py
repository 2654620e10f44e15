"""The rollout state machine with a fake clock: what it decides, what it asks Triton for, what the table says."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cdl.errors import ConfigError, InvalidInputError, NotFoundError, PermanentError
from services.gateway.rollout.machine import (
    Action,
    Phase,
    RolloutManager,
    RolloutPolicy,
    RolloutState,
    Transition,
    VersionWindow,
)
from services.gateway.routing import Route, RoutingTable
from services.gateway.settings import GatewaySettings

S = RolloutState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Persisted:
    """A persist hook that remembers each document and what the table said when it was written."""

    def __init__(self, table: RoutingTable) -> None:
        self.table = table
        self.docs: list[tuple[str, dict[str, Any]]] = []
        self.routes_at_save: list[Route | None] = []
        self.fail = False

    def __call__(self, model: str, doc: dict[str, Any]) -> None:
        if self.fail:
            raise OSError("object store down")
        json.dumps(doc)  # it must be JSON
        self.docs.append((model, doc))
        self.routes_at_save.append(self.table.get(model))

    def last(self, model: str = "m") -> dict[str, Any]:
        return next(doc for name, doc in reversed(self.docs) if name == model)


POLICY = RolloutPolicy(
    canary_steps=(0.1, 0.5, 1.0),
    min_samples=10,
    step_min_s=1.0,
    max_errors=3,
    max_error_rate=0.05,
    max_latency_ratio=2.0,
    min_agreement=0.9,
    min_feedback=50,
    drain_s=1.0,
)


def make(policy: RolloutPolicy = POLICY) -> tuple[RolloutManager, RoutingTable, Clock, Persisted]:
    table, clock = RoutingTable(), Clock()
    persisted = Persisted(table)
    return RolloutManager(table, policy, clock, persisted), table, clock, persisted


def only(ts: list[Transition]) -> Transition:
    assert len(ts) == 1, ts
    return ts[0]


def serve_first(mgr: RolloutManager, model: str = "m", version: int = 1) -> None:
    t = only(mgr.begin(model, version))
    assert (t.action, t.load, t.state) == (Action.LOAD, (version,), None)
    only(mgr.loaded(model, version, True))
    assert only(mgr.warmed(model, version, True)).state is S.PROMOTED


def start_candidate(mgr: RolloutManager, model: str = "m", version: int = 2) -> Transition:
    only(mgr.begin(model, version))
    only(mgr.loaded(model, version, True))
    return only(mgr.warmed(model, version, True))


def drive(
    mgr: RolloutManager,
    table: RoutingTable,
    n: int,
    model: str = "m",
    stable_s: float = 0.010,
    candidate_s: float = 0.010,
    candidate_ok: bool = True,
) -> dict[int, int]:
    """``n`` requests routed by the table as the hot path does; returns answers per version."""
    counts: dict[int, int] = {}
    for _ in range(n):
        route = table.get(model)
        assert route is not None
        version = table.pick(route)
        counts[version] = counts.get(version, 0) + 1
        is_candidate = version == route.candidate
        mgr.served(model, version, candidate_ok or not is_candidate, candidate_s if is_candidate else stable_s)
    return counts


# --------------------------------------------------------------------------- first version


def test_first_version_goes_straight_to_serving_once_loaded_and_warm() -> None:
    mgr, table, _, persisted = make()
    load = only(mgr.begin("m", 1))
    assert load == Transition("m", 1, None, 0.0, "loading v1", 0, Action.LOAD, (1,), ())
    assert not load.published
    assert table.get("m") is None and mgr.wanted_versions("m") == (1,)
    assert mgr.status("m").phase is Phase.LOADING

    loaded = only(mgr.loaded("m", 1, True))
    assert (loaded.state, loaded.action) == (S.LOADED, Action.WARM)
    assert table.get("m") is None  # not before it is warm

    promoted = only(mgr.warmed("m", 1, True))
    assert (promoted.state, promoted.traffic, promoted.previous_version) == (S.PROMOTED, 1.0, 0)
    assert promoted.reason == "first version"
    assert table.get("m") == Route("m", 1)
    assert persisted.routes_at_save[-1] is None  # written before it took effect
    assert persisted.last()["stable"] == 1
    status = mgr.status("m")
    assert (status.stable, status.candidate, status.state, status.phase) == (1, 0, S.PROMOTED, Phase.IDLE)
    assert [(v.version, v.state, v.traffic) for v in status.versions] == [(1, S.PROMOTED, 1.0)]
    assert S.PROMOTED.proto_name == "ROLLOUT_STATE_PROMOTED"


def test_first_version_that_fails_to_load_serves_nothing() -> None:
    mgr, table, _, _ = make()
    only(mgr.begin("m", 1))
    failed = only(mgr.loaded("m", 1, False, "failed to load 'm' version 1: bad onnx"))
    assert (failed.state, failed.action, failed.load) == (S.FAILED, Action.SYNC, ())
    assert table.get("m") is None and mgr.wanted_versions("m") == ()
    assert mgr.status("m").versions[0].state is S.FAILED
    serve_first(mgr, "m", 2)  # the next version is a first version again
    assert table.get("m") == Route("m", 2)


# --------------------------------------------------------------------------- canary


def test_canary_steps_up_and_promotes_with_good_stats() -> None:
    mgr, table, clock, persisted = make()
    serve_first(mgr)
    load = only(mgr.begin("m", 2))
    assert (load.action, load.load, load.fallback, load.previous_version) == (Action.LOAD, (1, 2), (1,), 1)
    assert table.get("m") == Route("m", 1)  # loading changes nothing for clients
    only(mgr.loaded("m", 2, True))
    assert table.get("m") == Route("m", 1)
    canary = only(mgr.warmed("m", 2, True))
    assert (canary.state, canary.traffic, canary.version, canary.previous_version) == (S.CANARY, 0.1, 2, 1)
    assert table.get("m") == Route("m", 1, 2, canary=0.1)
    assert persisted.routes_at_save[-1] == Route("m", 1)  # durable before the candidate took traffic

    shares = []
    for _ in range(2):
        drive(mgr, table, 200)
        assert mgr.tick() == []  # enough samples, but not yet step_min_s at this step
        clock.advance(1.0)
        step = only(mgr.tick())
        assert step.state is S.CANARY
        shares.append(step.traffic)
        route = table.get("m")
        assert route is not None and route.canary == step.traffic
    assert shares == [0.5, 1.0]

    counts = drive(mgr, table, 50)
    assert counts == {2: 50}  # the last step: the candidate answers everything
    clock.advance(1.0)
    promoted = only(mgr.tick())
    assert (promoted.state, promoted.traffic, promoted.previous_version) == (S.PROMOTED, 1.0, 1)
    assert promoted.action is Action.NONE  # v1 drains first
    assert "canary passed every step" in promoted.reason
    assert table.get("m") == Route("m", 2)
    assert mgr.wanted_versions("m") == (1, 2)
    assert persisted.last()["stable"] == 2 and persisted.last()["previous"] == 1

    clock.advance(1.0)
    drained = only(mgr.tick())
    assert (drained.state, drained.action, drained.load, drained.version) == (None, Action.SYNC, (2,), 1)
    assert mgr.wanted_versions("m") == (2,)
    assert mgr.tick() == []


def test_canary_waits_for_min_samples() -> None:
    mgr, table, clock, _ = make()
    serve_first(mgr)
    start_candidate(mgr)
    drive(mgr, table, 50)  # 5 candidate requests at 10%
    clock.advance(10.0)
    assert mgr.tick() == []
    drive(mgr, table, 50)
    assert only(mgr.tick()).traffic == 0.5


def test_share_schedule_in_the_routing_table() -> None:
    mgr, table, _, _ = make(RolloutPolicy(canary_steps=(0.1, 0.25, 1.0), min_samples=10, step_min_s=0.0))
    serve_first(mgr)
    start_candidate(mgr)
    assert drive(mgr, table, 1000) == {1: 900, 2: 100}
    only(mgr.tick())
    assert drive(mgr, table, 1000) == {1: 750, 2: 250}
    only(mgr.tick())
    assert drive(mgr, table, 1000) == {2: 1000}
    assert only(mgr.tick()).state is S.PROMOTED
    assert drive(mgr, table, 10) == {2: 10}


def test_errors_roll_back_at_once_after_max_errors() -> None:
    mgr, table, _, persisted = make()
    serve_first(mgr)
    start_candidate(mgr)
    for i in range(2):
        mgr.served("m", 2, False, 0.001)
        assert table.get("m") == Route("m", 1, 2, canary=0.1), i
    mgr.served("m", 2, False, 0.001)  # the third: traffic 0 right there, in the hot path's call
    assert table.get("m") == Route("m", 1)
    rolled = only(mgr.tick())  # the transition comes out of the next tick
    assert (rolled.state, rolled.traffic, rolled.version, rolled.previous_version) == (S.ROLLED_BACK, 0.0, 2, 1)
    assert rolled.reason == "3 candidate errors (max_errors 3)"
    assert persisted.last()["candidate"] == 0 and persisted.last()["state"] == "ROLLED_BACK"
    assert mgr.status("m").versions[-1].state is S.ROLLED_BACK
    mgr.served("m", 2, False, 0.001)  # late answers of the old candidate change nothing
    assert mgr.tick() == []


def test_rollback_within_one_tick_when_errors_come_through_routed_traffic() -> None:
    mgr, table, clock, _ = make()
    serve_first(mgr)
    start_candidate(mgr)
    counts = drive(mgr, table, 100, candidate_ok=False)
    assert counts[2] == 3  # the third failure took the candidate out of the table
    assert table.get("m") == Route("m", 1)
    assert only(mgr.tick()).state is S.ROLLED_BACK
    assert mgr.wanted_versions("m") == (1, 2)  # draining
    clock.advance(1.0)
    assert only(mgr.tick()).load == (1,)


def test_error_rate_rolls_back_once_min_samples() -> None:
    policy = RolloutPolicy(canary_steps=(0.5, 1.0), min_samples=20, max_errors=1000, step_min_s=0.0)
    mgr, _, _, _ = make(policy)
    serve_first(mgr)
    start_candidate(mgr)
    for i in range(19):
        mgr.served("m", 1, True, 0.01)
        mgr.served("m", 2, i % 3 != 0, 0.01)
    assert mgr.tick() == []
    mgr.served("m", 1, True, 0.01)
    mgr.served("m", 2, True, 0.01)
    rolled = only(mgr.tick())
    assert rolled.state is S.ROLLED_BACK and rolled.reason.startswith("error rate 0.350 vs stable 0.000")


def test_five_times_slower_p99_rolls_back_once_min_samples() -> None:
    mgr, table, clock, _ = make()
    serve_first(mgr)
    start_candidate(mgr)
    counts = drive(mgr, table, 90, stable_s=0.004, candidate_s=0.020)
    assert counts[2] == 9
    clock.advance(5.0)
    assert mgr.tick() == []  # 9 < min_samples
    drive(mgr, table, 10, stable_s=0.004, candidate_s=0.020)
    rolled = only(mgr.tick())
    assert rolled.state is S.ROLLED_BACK
    words = rolled.reason.split()  # "p99 latency 19.6 ms vs stable 3.9 ms (max x2.0)"
    assert words[:2] == ["p99", "latency"] and abs(float(words[2]) - 20) < 1 and abs(float(words[6]) - 4) < 0.2
    assert table.get("m") == Route("m", 1)


def test_slightly_slower_candidate_is_promoted() -> None:
    mgr, table, clock, _ = make()
    serve_first(mgr)
    start_candidate(mgr)
    for _ in range(3):
        drive(mgr, table, 200, stable_s=0.004, candidate_s=0.006)
        clock.advance(1.0)
        mgr.tick()
    assert table.get("m") == Route("m", 2)


def test_accuracy_on_feedback_rolls_back() -> None:
    mgr, _, _, _ = make()
    serve_first(mgr)
    start_candidate(mgr)
    mgr.observe_health("m", 1, 0.95, 500)
    mgr.observe_health("m", 2, 0.90, 40)
    assert mgr.tick() == []  # not enough feedback on the candidate yet
    mgr.observe_health("m", 2, 0.90, 30)  # windows add up: 70 labelled answers
    rolled = only(mgr.tick())
    assert rolled.state is S.ROLLED_BACK and rolled.reason.startswith("accuracy on feedback 0.900 vs stable 0.950")


# --------------------------------------------------------------------------- shadow and manual


def shadow_policy() -> RolloutPolicy:
    return RolloutPolicy(modes={"m": "shadow"}, min_samples=50, step_min_s=1.0, min_agreement=0.9, shadow_share=0.5)


def test_shadow_promotes_with_high_agreement_and_clients_never_see_it() -> None:
    mgr, table, clock, _ = make(shadow_policy())
    serve_first(mgr)
    shadow = start_candidate(mgr)
    assert (shadow.state, shadow.traffic) == (S.SHADOW, 0.0)
    route = table.get("m")
    assert route == Route("m", 1, 2, shadow=0.5)
    mirrored = 0
    for _ in range(200):
        assert table.pick(route) == 1
        mgr.served("m", 1, True, 0.01)
        if table.mirror(route):
            mirrored += 1
            mgr.shadowed("m", 2, True, 0.012, agrees=mirrored % 20 != 0)
    assert mirrored == 100
    assert mgr.tick() == []  # step_min_s
    clock.advance(1.0)
    promoted = only(mgr.tick())
    assert promoted.state is S.PROMOTED and promoted.reason == "shadow agreement 0.950 over 100 requests"
    assert table.get("m") == Route("m", 2)


def test_shadow_rolls_back_with_low_agreement() -> None:
    mgr, table, clock, _ = make(shadow_policy())
    serve_first(mgr)
    start_candidate(mgr)
    clock.advance(1.0)
    for i in range(49):
        mgr.shadowed("m", 2, True, 0.01, agrees=i % 2 == 0)
    mgr.shadowed("m", 2, True, 0.01, agrees=None)  # not comparable: not counted
    assert mgr.tick() == []
    mgr.shadowed("m", 2, True, 0.01, agrees=False)
    rolled = only(mgr.tick())
    assert rolled.state is S.ROLLED_BACK and rolled.reason == "shadow agreement 0.500 over 50 requests (min 0.9)"
    assert table.get("m") == Route("m", 1)


def test_shadow_errors_roll_back_too() -> None:
    mgr, table, _, _ = make(shadow_policy())
    serve_first(mgr)
    start_candidate(mgr)
    for _ in range(3):
        mgr.shadowed("m", 2, False, 0.01, agrees=None)
    assert table.get("m") == Route("m", 1)
    assert only(mgr.tick()).state is S.ROLLED_BACK


def test_manual_waits_for_approve() -> None:
    mgr, table, clock, _ = make(RolloutPolicy(mode="manual", canary_steps=(0.5, 1.0), min_samples=5))
    serve_first(mgr)
    waiting = start_candidate(mgr)
    assert (waiting.state, waiting.traffic) == (S.AWAITING_APPROVAL, 0.0)
    assert table.get("m") == Route("m", 1, 2)  # nameable explicitly, no share
    clock.advance(3600.0)
    mgr.served("m", 2, True, 0.01)
    assert mgr.tick() == []
    with pytest.raises(NotFoundError):
        mgr.approve("m", 3)
    approved = only(mgr.approve("m", 2, approver="ana"))
    assert (approved.state, approved.traffic) == (S.CANARY, 0.5)
    assert approved.reason.startswith("approved by ana: canary at 50%")
    assert table.get("m") == Route("m", 1, 2, canary=0.5)
    with pytest.raises(PermanentError):
        mgr.approve("m", 2)


# --------------------------------------------------------------------------- superseding, failures, admin


def test_a_newer_version_supersedes_the_candidate() -> None:
    mgr, table, _, _ = make()
    serve_first(mgr)
    start_candidate(mgr)
    rolled, load = mgr.begin("m", 3)
    assert (rolled.state, rolled.version, rolled.reason) == (S.ROLLED_BACK, 2, "superseded by v3")
    assert table.get("m") == Route("m", 1)  # at once
    assert (load.action, load.version, load.load, load.fallback) == (Action.LOAD, 3, (1, 2, 3), (1, 2))
    assert mgr.loaded("m", 2, True) == []  # stale answers are ignored
    assert mgr.begin("m", 3) == [] and mgr.begin("m", 2) == []  # replays
    only(mgr.loaded("m", 3, True))
    assert only(mgr.warmed("m", 3, True)).state is S.CANARY
    assert table.get("m") == Route("m", 1, 3, canary=0.1)


def test_superseding_a_candidate_still_loading() -> None:
    mgr, table, _, _ = make()
    serve_first(mgr)
    only(mgr.begin("m", 2))
    rolled, load = mgr.begin("m", 3)
    assert (rolled.state, rolled.action, rolled.load) == (S.ROLLED_BACK, Action.SYNC, (1,))  # it never had traffic
    assert load.load == (1, 3)
    assert table.get("m") == Route("m", 1)


def test_failed_load_or_warm_changes_nothing_for_clients() -> None:
    mgr, table, _, _ = make()
    serve_first(mgr)
    only(mgr.begin("m", 2))
    failed = only(mgr.loaded("m", 2, False, "failed to load 'm' version 2: Protobuf parsing failed"))
    assert (failed.state, failed.action, failed.load, failed.previous_version) == (S.FAILED, Action.SYNC, (1,), 1)
    assert "Protobuf parsing failed" in failed.reason
    assert table.get("m") == Route("m", 1)
    only(mgr.begin("m", 3))
    only(mgr.loaded("m", 3, True))
    failed = only(mgr.warmed("m", 3, False, "warm-up request failed"))
    assert (failed.state, failed.load) == (S.FAILED, (1,))
    assert table.get("m") == Route("m", 1)
    assert mgr.wanted_versions("m") == (1,)


def test_operator_promote_rollback_and_set_traffic() -> None:
    mgr, table, clock, _ = make()
    serve_first(mgr)
    start_candidate(mgr)
    pinned = only(mgr.set_traffic("m", 0.3))
    assert (pinned.state, pinned.traffic) == (S.CANARY, 0.3)
    assert table.get("m") == Route("m", 1, 2, canary=0.3)
    drive(mgr, table, 500)
    clock.advance(10.0)
    assert mgr.tick() == []  # pinned: no automatic step-up
    with pytest.raises(InvalidInputError):
        mgr.set_traffic("m", 1.5)
    promoted = only(mgr.promote("m", 2))
    assert (promoted.state, promoted.reason) == (S.PROMOTED, "promoted by operator")
    assert table.get("m") == Route("m", 2)
    assert mgr.promote("m", 2) == []
    with pytest.raises(PermanentError):
        mgr.rollback("m")
    start_candidate(mgr, version=3)
    rolled = only(mgr.rollback("m", "looks wrong"))
    assert (rolled.state, rolled.reason, rolled.version) == (S.ROLLED_BACK, "looks wrong", 3)
    assert table.get("m") == Route("m", 2)
    with pytest.raises(NotFoundError):
        mgr.status("nope")
    with pytest.raises(PermanentError):
        mgr.set_traffic("m", 0.5)


def test_promote_refuses_a_candidate_not_yet_warm() -> None:
    mgr, _, _, _ = make()
    serve_first(mgr)
    only(mgr.begin("m", 2))
    with pytest.raises(PermanentError):
        mgr.promote("m", 2)


# --------------------------------------------------------------------------- durability


def test_state_round_trips_through_json_and_resumes_mid_canary() -> None:
    mgr, table, clock, persisted = make()
    serve_first(mgr)
    start_candidate(mgr)
    drive(mgr, table, 200)
    clock.advance(1.0)
    assert only(mgr.tick()).traffic == 0.5
    doc = json.loads(json.dumps(persisted.last()))
    assert doc == mgr.to_json("m")
    assert (doc["stable"], doc["candidate"], doc["phase"], doc["step"], doc["mode"]) == (1, 2, "canary", 1, "canary")

    # a new gateway process: the stable serves at once, the candidate only once loaded and warm again
    mgr2, table2, clock2, persisted2 = make()
    load = only(mgr2.restore({"m": doc}))
    assert (load.action, load.version, load.load, load.fallback) == (Action.LOAD, 2, (1, 2), (1,))
    assert table2.get("m") == Route("m", 1)
    assert mgr2.status("m").phase is Phase.LOADING
    assert mgr2.to_json("m")["phase"] == "canary"  # a crash now resumes the same way
    only(mgr2.loaded("m", 2, True))
    resumed = only(mgr2.warmed("m", 2, True))
    assert (resumed.state, resumed.traffic) == (S.CANARY, 0.5)
    assert resumed.reason.startswith("resumed: canary at 50% (step 2/3)")
    assert table2.get("m") == Route("m", 1, 2, canary=0.5)
    drive(mgr2, table2, 100)
    clock2.advance(1.0)
    assert only(mgr2.tick()).traffic == 1.0
    assert persisted2.last()["step"] == 2


def test_restore_of_an_idle_model_and_of_bad_documents() -> None:
    mgr, _, _, _ = make()
    serve_first(mgr)
    start_candidate(mgr)
    only(mgr.rollback("m", "bad"))
    doc = mgr.to_json("m")
    assert doc["last"] == {"version": 2, "state": "ROLLED_BACK", "reason": "bad"}
    mgr2, table2, _, _ = make()
    sync = only(mgr2.restore({"m": doc, "x": {"model": "x"}, "y": {**doc, "model": "y", "phase": "canary"}}))
    assert (sync.action, sync.load, sync.state) == (Action.SYNC, (1,), None)
    assert table2.get("m") == Route("m", 1) and table2.get("x") is None and table2.get("y") is None
    assert mgr2.begin("m", 2) == []  # the rolled back version is not rolled out again
    assert [v.state for v in mgr2.status("m").versions] == [S.PROMOTED, S.ROLLED_BACK]


def test_resume_a_first_version_that_was_loading() -> None:
    mgr, _, _, _ = make()
    only(mgr.begin("m", 1))
    mgr2, table2, _, _ = make()
    load = only(mgr2.restore({"m": mgr.to_json("m")}))
    assert (load.action, load.load) == (Action.LOAD, (1,))
    only(mgr2.loaded("m", 1, True))
    assert only(mgr2.warmed("m", 1, True)).state is S.PROMOTED
    assert table2.get("m") == Route("m", 1)


def test_traffic_increase_waits_until_the_state_is_saved() -> None:
    mgr, table, _, persisted = make()
    serve_first(mgr)
    persisted.fail = True
    only(mgr.begin("m", 2))
    only(mgr.loaded("m", 2, True))
    assert only(mgr.warmed("m", 2, True)).state is S.CANARY
    assert table.get("m") == Route("m", 1)  # not durable: no traffic yet
    assert mgr.tick() == []
    assert table.get("m") == Route("m", 1)
    persisted.fail = False
    mgr.tick()
    assert table.get("m") == Route("m", 1, 2, canary=0.1)
    persisted.fail = True
    for _ in range(3):
        mgr.served("m", 2, False, 0.01)
    assert table.get("m") == Route("m", 1)  # taking traffic away never waits


# --------------------------------------------------------------------------- pieces


def test_version_window_quantiles_and_counts() -> None:
    w = VersionWindow()
    assert w.quantile(0.5) is None and w.error_rate == 0.0 and w.agreement is None
    for i in range(1, 1001):
        w.record(True, i / 1000)
    w.record(False, 50.0)  # errors do not count towards latency
    assert w.requests == 1001 and w.errors == 1 and w.answered == 1000
    p50, p99 = w.quantile(0.5), w.quantile(0.99)
    assert p50 is not None and p99 is not None
    assert abs(p50 - 0.5) / 0.5 < 0.05 and abs(p99 - 0.99) / 0.99 < 0.05
    w.record(True, 1e-9)
    w.record(True, 1e9)
    assert w.quantile(0.0) is not None and w.quantile(1.0) is not None
    w.compare(True)
    w.compare(None)
    w.compare(False)
    assert (w.compared, w.agreed, w.agreement) == (2, 1, 0.5)
    w.accuracy, w.feedback = 0.9, 10
    w.reset(5.0)
    assert (w.requests, w.answered, w.started, w.accuracy) == (0, 0, 5.0, 0.9)


def test_policy_from_settings_and_validation() -> None:
    settings = GatewaySettings(rollout_modes={"digits": "shadow"}, canary_steps=[0.2, 1.0], min_samples=7)
    policy = RolloutPolicy.from_settings(settings)
    assert policy.canary_steps == (0.2, 1.0) and policy.min_samples == 7
    assert policy.mode_of("digits") == "shadow" and policy.mode_of("other") == "canary"
    for steps in [(), (0.5, 0.2), (0.0, 1.0), (0.5, 1.5)]:
        with pytest.raises(ConfigError):
            RolloutPolicy(canary_steps=steps)
    with pytest.raises(ConfigError):
        RolloutPolicy(shadow_share=0.0)


def test_models_lists_every_model() -> None:
    mgr, _, _, _ = make()
    serve_first(mgr, "b")
    serve_first(mgr, "a")
    start_candidate(mgr, "a")
    statuses = mgr.models()
    assert [s.model for s in statuses] == ["a", "b"]
    a = statuses[0]
    assert (a.stable, a.candidate, a.state, a.traffic, a.phase) == (1, 2, S.CANARY, 0.1, Phase.CANARY)
    assert [(v.version, v.state, v.traffic) for v in a.versions] == [(1, S.PROMOTED, 0.9), (2, S.CANARY, 0.1)]
    with pytest.raises(InvalidInputError):
        mgr.begin("a", 0)


# --------------------------------------------------------------------------- control: the pure parts


def test_config_override_names_exactly_the_wanted_versions() -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from cdl.triton import ModelSpec, TensorSpec, render_config
    from services.gateway.rollout.control import config_override, warmup_inputs

    spec = ModelSpec("m", (TensorSpec("input", "float32", (4, -1)),), (TensorSpec("output", "float32", (3,)),), 8)
    cfg = text_format.Parse(render_config(spec), model_config_pb2.ModelConfig())
    assert cfg.version_policy.WhichOneof("policy_choice") == "latest"
    doc = json.loads(config_override(cfg, [3, 1, 3]))
    assert doc["version_policy"] == {"specific": {"versions": ["1", "3"]}}
    assert doc["name"] == "m" and doc["max_batch_size"] == 8 and doc["backend"] == "python"
    assert cfg.version_policy.WhichOneof("policy_choice") == "latest"  # the parsed config is left alone

    (tensor,) = warmup_inputs(cfg)
    assert (tensor.name(), tensor.shape(), tensor.datatype()) == ("input", [1, 4, 1], "FP32")
    cfg.max_batch_size = 0
    cfg.input[0].data_type = model_config_pb2.TYPE_STRING
    (tensor,) = warmup_inputs(cfg)
    assert (tensor.shape(), tensor.datatype()) == ([4, 1], "BYTES")


def test_serving_json_shape_and_bucket_match_the_registry() -> None:
    from cdl.registry import MODELS_BUCKET as REGISTRY_BUCKET
    from services.gateway.rollout import state

    assert state.MODELS_BUCKET == REGISTRY_BUCKET


def test_rollout_documents_are_read_only_by_the_group_that_wrote_them() -> None:
    """Two gateway deployments on one object store (the tests' gateways share one, and the Triton
    servers) never resume, follow or load each other's rollouts."""
    from services.gateway.rollout.state import RolloutStore
    from tests.fakes import MemoryStore

    store = MemoryStore()
    ours, theirs, old = RolloutStore(store, "g1"), RolloutStore(store, "g2"), RolloutStore(store)
    doc = {"model": "m", "stable": 1}
    ours.save("m", doc)
    assert ours.load("m") == doc and ours.load_all() == {"m": doc}  # (the group's name not handed on)
    assert theirs.load("m") is None and theirs.load_all() == {}
    old.save("n", {"model": "n", "stable": 2})  # written before documents named their group
    assert ours.load("n") == {"model": "n", "stable": 2} and set(theirs.load_all()) == {"n"}
    assert old.load("m") == doc  # a store without a group reads every document
