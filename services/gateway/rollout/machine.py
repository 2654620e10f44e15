"""Rollouts: the per-model state machine that decides what serves (pure logic).

:class:`RolloutManager` owns, for each model, the stable version, the
candidate being rolled out, its mode (canary, shadow or manual) and its canary
step. It writes the :class:`~services.gateway.routing.RoutingTable` the hot
path reads and implements :class:`~services.gateway.routing.Outcomes`, so it
sees every answer (:class:`VersionWindow` per version). It decides; it never
does I/O itself. What Triton must do comes back as data, :class:`Transition`:

* ``state`` — what to publish on ``model.deployed`` (None: nothing);
* ``action`` — what the app must make Triton do:

  - :attr:`Action.LOAD`: make every server hold exactly ``load`` (keeping
    ``fallback`` serving if that fails), then call :meth:`RolloutManager.loaded`;
  - :attr:`Action.WARM`: send warm-up requests to ``version`` on every server,
    then call :meth:`RolloutManager.warmed`;
  - :attr:`Action.SYNC`: make every server hold exactly ``load`` (``()``:
    unload the model); no call back (a rolled back, failed or drained version
    leaves Triton).

A candidate enters the routing table only once it is loaded and warm on every
server. The first version of a model is then promoted at once; later ones go
by mode (``docs/gateway.md``, "Rollout").

Durability: every change that gives a version more traffic than it had (a
candidate entering the table, a step up, a promotion) is first handed to the
``persist`` callback (``state.RolloutStore.save``) and takes effect for
clients only once that returned; a change that takes traffic away (rollback,
failure, a lower share) takes effect at once and is persisted right after.
If ``persist`` fails, the increase waits and is retried at the next
:meth:`~RolloutManager.tick`.

Threads: :meth:`~RolloutManager.served` and :meth:`~RolloutManager.shadowed`
(the hot path, on the event loop) take one lock for a few counter updates;
a candidate reaching ``max_errors`` is rolled back right there (the table
change is in memory; its transition comes out of the next ``tick``). Every
other mutating method may call ``persist`` (object-store I/O): call them off
the event loop (``asyncio.to_thread``). The manager must be the only writer of
its table.

Several gateway instances (docs/gateway.md, "Replicas"): each
model has one writer, the instance whose consumer group holds the model's
partition. Its manager *owns* the model and drives it as above. Every other
instance's manager *follows* it (:meth:`RolloutManager.follow`): the model's
state and route are those of the writer's latest ``rollout.json`` (its
``route``: what the writer applies once the document is durable), nothing is
decided, persisted or loaded for it, and admin calls on it raise
:class:`NotOwnerError` (the app hands them to the owner). When partitions move,
:meth:`~RolloutManager.release` stops driving the models that left (saving
what is not saved yet) and :meth:`~RolloutManager.restore` resumes those that
arrived from their documents.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast, get_args

from cdl.errors import ConfigError, DecodeError, InvalidInputError, NotFoundError, PermanentError, UnavailableError
from cdl.latency import LatencyHistogram
from cdl.logging import get_logger
from services.gateway.routing import Route, RoutingTable
from services.gateway.settings import GatewaySettings, RolloutMode

__all__ = [
    "Action",
    "NotOwnerError",
    "Phase",
    "RolloutManager",
    "RolloutPolicy",
    "RolloutState",
    "RolloutStatus",
    "Transition",
    "VersionStatus",
    "VersionWindow",
    "route_of",
]

log = get_logger(__name__)

FORMAT = 1
"""Version of the document :meth:`RolloutManager.to_json` writes."""

Persist = Callable[[str, dict[str, Any]], None]


class NotOwnerError(UnavailableError):
    """The model's rollout is driven by another gateway instance (its partition's owner): a change
    must be made there (the app hands admin calls to it, docs/gateway.md)."""


class RolloutState(StrEnum):
    """The states of ``cdl.v1.RolloutState`` (proto name: ``ROLLOUT_STATE_<value>``)."""

    UNSPECIFIED = "UNSPECIFIED"
    LOADED = "LOADED"
    CANARY = "CANARY"
    PROMOTED = "PROMOTED"
    ROLLED_BACK = "ROLLED_BACK"
    FAILED = "FAILED"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    SHADOW = "SHADOW"

    @property
    def proto_name(self) -> str:
        """The enum value's name in events.proto (``events_pb2.RolloutState.Value(...)``)."""
        return f"ROLLOUT_STATE_{self.value}"


class Phase(StrEnum):
    """Where a model's rollout is (persisted in ``rollout.json``)."""

    IDLE = "idle"
    """No candidate: the stable version serves alone."""
    LOADING = "loading"
    """The candidate is being loaded on the Triton servers."""
    WARMING = "warming"
    """Loaded; warm-up requests are being sent."""
    CANARY = "canary"
    """The candidate answers a share of live requests."""
    SHADOW = "shadow"
    """A share of live requests is mirrored to the candidate; clients never see its answers."""
    AWAITING_APPROVAL = "awaiting_approval"
    """Loaded and warm, no traffic, waiting for Approve (manual mode)."""


_TRAFFIC_PHASES = frozenset({Phase.CANARY, Phase.SHADOW, Phase.AWAITING_APPROVAL})


class Action(StrEnum):
    """What a :class:`Transition` asks the app to make Triton do (see the module docstring)."""

    NONE = "none"
    LOAD = "load"
    WARM = "warm"
    SYNC = "sync"


@dataclass(frozen=True, slots=True)
class Transition:
    """One step of a rollout, as data: an event to publish and/or an action for Triton."""

    model: str
    version: int
    state: RolloutState | None
    """What to publish on ``model.deployed``; None: nothing to publish."""
    traffic: float = 0.0
    """Share of live requests ``version`` answers after this transition."""
    reason: str = ""
    previous_version: int = 0
    """The stable version before this transition."""
    action: Action = Action.NONE
    load: tuple[int, ...] = ()
    """LOAD, SYNC: the versions every Triton server must hold (``()``: none, unload the model)."""
    fallback: tuple[int, ...] = ()
    """LOAD: the versions that must keep serving if the load fails."""
    actor: str = ""
    """Who caused it: empty for the rollout's own steps, an admin key's id (cdl.auth.key_id)
    for a ModelAdmin call; published as ``actor`` ("gateway" when empty)."""

    @property
    def published(self) -> bool:
        return self.state is not None


@dataclass(frozen=True)
class RolloutPolicy:
    """The rollout rules (built from :class:`GatewaySettings`, see its field docstrings)."""

    mode: RolloutMode = "canary"
    modes: Mapping[str, RolloutMode] = field(default_factory=dict)
    canary_steps: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    shadow_share: float = 1.0
    min_samples: int = 20
    step_min_s: float = 1.0
    max_error_rate: float = 0.05
    max_errors: int = 3
    max_latency_ratio: float = 2.0
    min_agreement: float = 0.9
    max_accuracy_drop: float = 0.02
    min_feedback: int = 50
    latency_floor_s: float = 0.001
    """A slower p99 rolls back only when it is also this much slower in absolute terms (noise on
    sub-millisecond models)."""
    drain_s: float = 1.0
    """A version that had traffic (an old stable, a rolled back canary) stays loaded this long after
    it lost it, so requests already on their way to it finish."""

    def __post_init__(self) -> None:
        steps = self.canary_steps
        if not steps or any(not 0.0 < s <= 1.0 for s in steps) or list(steps) != sorted(set(steps)):
            raise ConfigError("canary_steps must be increasing shares in (0, 1]", canary_steps=list(steps))
        if not 0.0 < self.shadow_share <= 1.0:
            raise ConfigError("shadow_share must be in (0, 1]", shadow_share=self.shadow_share)
        modes = set(get_args(RolloutMode))
        for name, mode in {"": self.mode, **self.modes}.items():
            if mode not in modes:
                raise ConfigError("unknown rollout mode", model=name, mode=mode, modes=sorted(modes))

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> RolloutPolicy:
        return cls(
            mode=settings.rollout_mode,
            modes=dict(settings.rollout_modes),
            canary_steps=tuple(settings.canary_steps),
            shadow_share=settings.shadow_share,
            min_samples=settings.min_samples,
            step_min_s=settings.step_min_s,
            max_error_rate=settings.max_error_rate,
            max_errors=settings.max_errors,
            max_latency_ratio=settings.max_latency_ratio,
            min_agreement=settings.min_agreement,
            max_accuracy_drop=settings.max_accuracy_drop,
            min_feedback=settings.min_feedback,
            drain_s=settings.drain_s,
        )

    def mode_of(self, model: str) -> RolloutMode:
        return self.modes.get(model, self.mode)


# --------------------------------------------------------------------------- windows


class VersionWindow:
    """Counters of one version since its window began: requests, errors, latency, shadow agreement.

    Latency goes into fixed log-spaced buckets (O(1) memory, one bisect per answer);
    only answers (``ok``) count towards latency. Accuracy on feedback comes from the
    monitor (:meth:`RolloutManager.observe_health`) and survives :meth:`reset`.
    """

    __slots__ = (
        "_latency",
        "accuracy",
        "agreed",
        "answered",
        "compared",
        "errors",
        "feedback",
        "requests",
        "started",
    )

    def __init__(self, started: float = 0.0) -> None:
        self.started = started
        self.requests = 0
        self.errors = 0
        self.answered = 0
        self.compared = 0
        self.agreed = 0
        self.accuracy: float | None = None
        self.feedback = 0
        self._latency = LatencyHistogram()

    def reset(self, started: float) -> None:
        self.started = started
        self.requests = self.errors = self.answered = self.compared = self.agreed = 0
        self._latency = LatencyHistogram()

    def record(self, ok: bool, latency_s: float) -> None:
        self.requests += 1
        if ok:
            self.answered += 1
            self._latency.add(latency_s)
        else:
            self.errors += 1

    def compare(self, agrees: bool | None) -> None:
        if agrees is not None:
            self.compared += 1
            self.agreed += agrees

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    def quantile(self, q: float) -> float | None:
        """Latency quantile ``q`` of the answers (seconds; None without answers)."""
        return self._latency.quantile(q)


# --------------------------------------------------------------------------- status


@dataclass(frozen=True, slots=True)
class VersionStatus:
    """One version of a model, as ModelAdmin shows it."""

    version: int
    state: RolloutState
    traffic: float
    reason: str
    requests: int = 0
    errors: int = 0
    p50_s: float | None = None
    p99_s: float | None = None
    agreement: float | None = None
    accuracy: float | None = None


@dataclass(frozen=True, slots=True)
class RolloutStatus:
    """A read-only snapshot of one model's rollout."""

    model: str
    stable: int
    """The serving version (0: none yet)."""
    candidate: int
    """The version being rolled out (0: none)."""
    phase: Phase
    mode: RolloutMode
    state: RolloutState
    """The state of the latest transition."""
    traffic: float
    """The candidate's share of live requests."""
    reason: str
    """The reason of the latest transition."""
    step: int
    versions: tuple[VersionStatus, ...]


# --------------------------------------------------------------------------- per model


@dataclass
class _Model:
    name: str
    mode: RolloutMode
    stable: int = 0
    previous: int = 0
    stable_reason: str = ""
    candidate: int = 0
    phase: Phase = Phase.IDLE
    step: int = 0
    share: float | None = None  # a canary share pinned by set_traffic
    state: RolloutState = RolloutState.UNSPECIFIED
    reason: str = ""
    cand_state: RolloutState = RolloutState.UNSPECIFIED
    highest: int = 0
    last: tuple[int, RolloutState, str] | None = None  # the last candidate that did not make it
    resume: tuple[Phase, int, float | None] | None = None  # where a restored rollout goes back to
    since: float = 0.0  # when the current step began
    errors_total: int = 0  # candidate errors over the whole rollout
    windows: dict[int, VersionWindow] = field(default_factory=dict)
    retiring: dict[int, float] = field(default_factory=dict)  # version -> when it may be unloaded
    generation: int = 0
    dirty: bool = False
    owned: bool = True
    """This instance drives the rollout (it is the model's writer); False: another one does."""
    held: bool = False
    """Not owned, but the state is still the one this instance drove (released, not followed since):
    given back unchanged, it resumes without a reload."""
    doc_route: Route | None = None
    """A followed model's route, as its writer's document says."""

    def window(self, version: int) -> VersionWindow:
        w = self.windows.get(version)
        if w is None:
            w = self.windows[version] = VersionWindow()
        return w

    def wanted(self) -> tuple[int, ...]:
        versions = {self.stable, *self.retiring}
        if self.phase is not Phase.IDLE:
            versions.add(self.candidate)
        versions.discard(0)
        return tuple(sorted(versions))

    def route(self, policy: RolloutPolicy) -> Route | None:
        if not self.owned and not self.held:
            return self.doc_route
        if not self.stable:
            return None
        if self.phase is Phase.CANARY:
            share = self.share if self.share is not None else policy.canary_steps[self.step]
            return Route(self.name, self.stable, self.candidate, canary=share)
        if self.phase is Phase.SHADOW:
            return Route(self.name, self.stable, self.candidate, shadow=policy.shadow_share)
        if self.phase is Phase.AWAITING_APPROVAL:
            return Route(self.name, self.stable, self.candidate)
        return Route(self.name, self.stable)

    def to_json(self, policy: RolloutPolicy) -> dict[str, Any]:
        phase, step, share = self.resume if self.resume else (self.phase, self.step, self.share)
        route = self.route(policy)
        return {
            "format": FORMAT,
            "model": self.name,
            "stable": self.stable,
            "previous": self.previous,
            "stable_reason": self.stable_reason,
            "candidate": self.candidate if phase is not Phase.IDLE else 0,
            "mode": self.mode,
            "phase": phase.value,
            "step": step,
            "share": share,
            "state": self.state.value,
            "reason": self.reason,
            "candidate_state": self.cand_state.value,
            "highest": self.highest,
            "last": None
            if self.last is None
            else {"version": self.last[0], "state": self.last[1].value, "reason": self.last[2]},
            # what the writer routes once this document is saved: the instances that follow it
            # route the same (route_of)
            "route": None
            if route is None
            else {"stable": route.stable, "candidate": route.candidate, "canary": route.canary, "shadow": route.shadow},
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], policy: RolloutPolicy) -> _Model:
        try:
            if int(doc.get("format", 0)) > FORMAT:
                raise ValueError(f"format {doc['format']} is newer than {FORMAT}")
            mode = str(doc["mode"])
            if mode not in get_args(RolloutMode):
                raise ValueError(f"unknown mode {mode!r}")
            last = doc.get("last")
            m = cls(
                name=str(doc["model"]),
                mode=cast(RolloutMode, mode),
                stable=int(doc["stable"]),
                previous=int(doc.get("previous", 0)),
                stable_reason=str(doc.get("stable_reason", "")),
                candidate=int(doc["candidate"]),
                phase=Phase(doc["phase"]),
                step=int(doc.get("step", 0)),
                share=None if doc.get("share") is None else float(doc["share"]),
                state=RolloutState(doc.get("state", "UNSPECIFIED")),
                reason=str(doc.get("reason", "")),
                cand_state=RolloutState(doc.get("candidate_state", "UNSPECIFIED")),
                highest=int(doc.get("highest", 0)),
                last=None if not last else (int(last["version"]), RolloutState(last["state"]), str(last["reason"])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DecodeError("bad rollout state document", error=str(exc)) from exc
        if (m.phase is Phase.IDLE) != (m.candidate == 0) or m.stable < 0 or m.candidate < 0:
            raise DecodeError("inconsistent rollout state document", model=m.name, phase=m.phase, candidate=m.candidate)
        m.step = min(max(m.step, 0), len(policy.canary_steps) - 1)
        m.highest = max(m.highest, m.stable, m.candidate)
        return m


def route_of(doc: Mapping[str, Any], policy: RolloutPolicy) -> Route | None:
    """The route a rollout document says its writer applies: its ``route``, or for a document
    written before it had one, the route its phase, step and share give under ``policy``."""
    if "route" not in doc:
        m = _Model.from_json(doc, policy)
        m.owned = True
        return m.route(policy)
    r = doc["route"]
    if r is None:
        return None
    try:
        route = Route(
            str(doc["model"]),
            int(r["stable"]),
            int(r.get("candidate", 0)),
            canary=float(r.get("canary", 0.0)),
            shadow=float(r.get("shadow", 0.0)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DecodeError("bad route in rollout state document", error=str(exc)) from exc
    if route.stable <= 0 or route.candidate < 0 or not (0.0 <= route.canary <= 1.0 and 0.0 <= route.shadow <= 1.0):
        raise DecodeError("inconsistent route in rollout state document", route=str(route))
    return route


def _is_reduction(old: Route | None, new: Route | None) -> bool:
    """Whether ``new`` gives no version more traffic than ``old`` did (safe before it is durable)."""
    if new is None or old == new:
        return True
    if old is None or new.stable != old.stable:
        return False
    if not new.candidate:
        return True
    return new.candidate == old.candidate and new.canary <= old.canary and new.shadow <= old.shadow


# --------------------------------------------------------------------------- the manager


class RolloutManager:
    """Decides every model's rollout; see the module docstring for the contract with the app."""

    def __init__(
        self,
        table: RoutingTable,
        policy: RolloutPolicy,
        clock: Callable[[], float],
        persist: Persist | None = None,
    ) -> None:
        self.table = table
        self.policy = policy
        self._clock = clock
        self._persist = persist
        self._models: dict[str, _Model] = {}
        self._pending: list[Transition] = []
        self._lock = threading.Lock()  # state and windows; held briefly, never across I/O
        self._sync_lock = threading.Lock()  # one persist-then-apply at a time

    # ------------------------------------------------------------------ Outcomes (hot path)

    def served(self, model: str, version: int, ok: bool, latency_s: float) -> None:
        with self._lock:
            m = self._models.get(model)
            if m is None:
                return
            w = m.windows.get(version)
            if w is None:
                return
            w.record(ok, latency_s)
            if not ok and version == m.candidate and m.phase in _TRAFFIC_PHASES and m.owned:
                self._candidate_error(m)

    def shadowed(self, model: str, version: int, ok: bool, latency_s: float, agrees: bool | None) -> None:
        with self._lock:
            m = self._models.get(model)
            if m is None or version != m.candidate or m.phase not in _TRAFFIC_PHASES:
                return
            w = m.window(version)
            w.record(ok, latency_s)
            w.compare(agrees)
            if not ok and m.owned:
                self._candidate_error(m)

    def _candidate_error(self, m: _Model) -> None:
        m.errors_total += 1
        if m.errors_total >= self.policy.max_errors:
            reason = f"{m.errors_total} candidate errors (max_errors {self.policy.max_errors})"
            self._pending.extend(self._rollback(m, reason, self._clock()))

    def observe_health(self, model: str, version: int, accuracy: float, count: int) -> None:
        """Accuracy on feedback of ``version`` over ``count`` more labelled requests (one closed
        window of ``model.health``): the windows add up, so the rule compares accuracy on all the
        feedback each version got."""
        if count <= 0:
            return
        with self._lock:
            m = self._models.get(model)
            if m is None or version not in (m.stable, m.candidate):
                return
            w = m.window(version)
            before = (w.accuracy or 0.0) * w.feedback
            w.feedback += count
            w.accuracy = (before + accuracy * count) / w.feedback

    # ------------------------------------------------------------------ reads

    def wanted_versions(self, model: str) -> tuple[int, ...]:
        """The versions the Triton servers must hold for ``model`` right now."""
        with self._lock:
            m = self._models.get(model)
            return m.wanted() if m else ()

    def models(self) -> list[RolloutStatus]:
        with self._lock:
            return [self._status(m) for _, m in sorted(self._models.items())]

    def status(self, model: str) -> RolloutStatus:
        with self._lock:
            return self._status(self._get(model))

    def to_json(self, model: str) -> dict[str, Any]:
        """The durable state of ``model``'s rollout (``rollout.json``)."""
        with self._lock:
            return self._get(model).to_json(self.policy)

    def owns(self, model: str) -> bool:
        """Whether this instance drives ``model``'s rollout (False for a model it does not know)."""
        with self._lock:
            m = self._models.get(model)
            return m is not None and m.owned

    def owned(self) -> list[str]:
        """The models this instance drives."""
        with self._lock:
            return sorted(name for name, m in self._models.items() if m.owned)

    def followed(self, under_way_only: bool = False) -> list[str]:
        """The models another instance drives, which this one routes as their documents say
        (``under_way_only``: those with a rollout under way)."""
        with self._lock:
            return sorted(
                name
                for name, m in self._models.items()
                if not m.owned and not (under_way_only and m.phase is Phase.IDLE and not m.retiring)
            )

    # ------------------------------------------------------------------ rollout events

    def begin(self, model: str, version: int) -> list[Transition]:
        """A new version passed compression (``model.compressed``, ok): start rolling it out.

        A version not newer than every version already begun is ignored (a replayed
        event). A candidate still in progress is rolled back ("superseded by vN").
        """
        if version <= 0:
            raise InvalidInputError("model versions start at 1", model=model, version=version)
        with self._lock:
            m = self._models.get(model)
            if m is None:
                m = self._models[model] = _Model(model, self.policy.mode_of(model))
            if not m.owned:  # its event reached this instance: Kafka made it the model's writer
                log.warning("a followed model's new version arrived here: driving it", model=model, version=version)
                m.owned, m.held, m.doc_route = True, False, None
            if version <= m.highest:
                log.info("rollout ignored: not a newer version", model=model, version=version, highest=m.highest)
                return []
            m.highest = version
            out: list[Transition] = []
            if m.candidate:
                out += self._rollback(m, f"superseded by v{version}", self._clock())
            m.candidate, m.phase, m.step, m.share, m.resume = version, Phase.LOADING, 0, None, None
            m.mode = self.policy.mode_of(model)
            m.cand_state, m.state, m.reason = RolloutState.UNSPECIFIED, RolloutState.UNSPECIFIED, f"loading v{version}"
            out.append(self._load_transition(m))
            self._changed(m)
        self._sync()
        return out

    def loaded(self, model: str, version: int, ok: bool, reason: str = "") -> list[Transition]:
        """The app's answer to :attr:`Action.LOAD`: ``version`` loaded on every server (or not, and why)."""
        with self._lock:
            m = self._models.get(model)
            if m is None or not m.owned or m.candidate != version or m.phase is not Phase.LOADING:
                return []  # stale: superseded, rolled back or handed to another instance meanwhile
            if not ok:
                out = self._fail(m, reason or "load failed")
            else:
                m.phase = Phase.WARMING
                reason = reason or "loaded on every server"
                self._mark(m, RolloutState.LOADED, reason)
                out = [Transition(model, version, RolloutState.LOADED, 0.0, reason, m.stable, Action.WARM, m.wanted())]
            self._changed(m)
        self._sync()
        return out

    def warmed(self, model: str, version: int, ok: bool, reason: str = "") -> list[Transition]:
        """The app's answer to :attr:`Action.WARM`; the candidate now enters the routing table."""
        now = self._clock()
        with self._lock:
            m = self._models.get(model)
            if m is None or not m.owned or m.candidate != version or m.phase is not Phase.WARMING:
                return []
            if not ok:
                out = self._fail(m, reason or "warm-up failed")
            elif not m.stable:
                out = self._promote(m, "first version", now)
            elif m.resume is not None:
                phase, step, share = m.resume
                m.resume = None
                out = self._enter(m, phase, now, step, share, resumed=True)
            else:
                phase = {"canary": Phase.CANARY, "shadow": Phase.SHADOW, "manual": Phase.AWAITING_APPROVAL}[m.mode]
                out = self._enter(m, phase, now)
            self._changed(m)
        self._sync()
        return out

    def busy(self) -> bool:
        """Whether :meth:`tick` has anything to do: a rollout under way, versions draining,
        state not saved yet, or transitions waiting (cheap: the app asks every 100 ms and
        ticks, in a thread, only then)."""
        with self._lock:
            return bool(self._pending) or any(
                m.owned and (m.phase is not Phase.IDLE or m.retiring or m.dirty) for m in self._models.values()
            )

    def tick(self) -> list[Transition]:
        """Decide on the evidence so far (call every ~100 ms): step up, promote, roll back, unload drained versions."""
        now = self._clock()
        with self._lock:
            out, self._pending = self._pending, []
            for m in self._models.values():
                if not m.owned:
                    continue
                if m.phase in _TRAFFIC_PHASES:
                    out += self._evaluate(m, now)
                if m.retiring:
                    done = [v for v, t in m.retiring.items() if now >= t]
                    for v in done:
                        del m.retiring[v]
                        m.windows.pop(v, None)
                    if done:
                        out.append(
                            Transition(m.name, max(done), None, 0.0, "drained", m.stable, Action.SYNC, m.wanted())
                        )
        self._sync()
        return out

    # ------------------------------------------------------------------ admin

    def approve(self, model: str, version: int, approver: str = "") -> list[Transition]:
        """Manual mode: the candidate waiting for approval becomes a canary at the first step."""
        now = self._clock()
        with self._lock:
            m = self._candidate_of(model, version)
            if m.phase is not Phase.AWAITING_APPROVAL:
                raise PermanentError("version is not awaiting approval", model=model, version=version, phase=m.phase)
            out = self._enter(m, Phase.CANARY, now, reason="approved" + (f" by {approver}" if approver else ""))
            self._changed(m)
        self._sync()
        return out

    def promote(self, model: str, version: int) -> list[Transition]:
        """Make the candidate ``version`` stable now (it must be loaded and warm)."""
        now = self._clock()
        with self._lock:
            m = self._get_owned(model)
            if version == m.stable and not m.candidate:
                return []
            m = self._candidate_of(model, version)
            if m.phase not in _TRAFFIC_PHASES:
                raise PermanentError("version is not loaded and warm yet", model=model, version=version, phase=m.phase)
            out = self._promote(m, "promoted by operator", now)
            self._changed(m)
        self._sync()
        return out

    def rollback(self, model: str, reason: str = "") -> list[Transition]:
        """Abandon the candidate in progress (traffic 0 at once); the stable version keeps serving."""
        now = self._clock()
        with self._lock:
            m = self._get_owned(model)
            if not m.candidate:
                raise PermanentError("no rollout in progress", model=model, stable=m.stable)
            out = self._rollback(m, reason or "rolled back by operator", now)
        self._sync()
        return out

    def set_traffic(self, model: str, share: float) -> list[Transition]:
        """Pin the candidate's canary share; automatic step-ups pause (rollback rules still apply)
        until it is promoted or rolled back."""
        if not 0.0 <= share <= 1.0 or math.isnan(share):
            raise InvalidInputError("traffic share must be within [0, 1]", model=model, share=share)
        now = self._clock()
        with self._lock:
            m = self._get_owned(model)
            if not m.candidate or m.phase not in _TRAFFIC_PHASES:
                raise PermanentError("no loaded candidate to send traffic to", model=model, phase=m.phase)
            out = self._enter(m, Phase.CANARY, now, m.step, share, reason=f"traffic set to {share:.0%} by operator")
            self._changed(m)
        self._sync()
        return out

    # ------------------------------------------------------------------ restart

    def restore(self, docs: Mapping[str, Mapping[str, Any]]) -> list[Transition]:
        """Resume from ``rollout.json`` documents (``state.RolloutStore.load_all``): at start, or
        for the models whose partitions this instance was just given (it becomes their writer).

        The stable versions serve at once. A candidate that was loading, warming or
        taking traffic is loaded and warmed again (LOAD, then WARM) and then goes back
        to the phase and step it was at; nothing serves that was not promoted. Bad
        documents are logged and skipped. A model this instance already drives is left
        as it is; one it released (:meth:`release`) whose document is still the one it
        saved, with no load or warm-up under way, resumes where it was, without a reload
        (a rebalance that gave its partition back).
        """
        out: list[Transition] = []
        with self._lock:
            for name, doc in sorted(docs.items()):
                cur = self._models.get(name)
                if cur is not None and cur.owned:
                    continue
                if (
                    cur is not None
                    and cur.held
                    and cur.phase not in (Phase.LOADING, Phase.WARMING)
                    and dict(doc) == cur.to_json(self.policy)
                ):
                    cur.owned, cur.held = True, False
                    log.info("rollout resumed where this instance left it", model=name, phase=cur.phase.value)
                    continue
                try:
                    m = _Model.from_json(doc, self.policy)
                except DecodeError as exc:
                    log.error("rollout state skipped", model=name, error=str(exc))
                    continue
                if m.phase in _TRAFFIC_PHASES:
                    m.resume = (m.phase, m.step, m.share)
                if m.phase is not Phase.IDLE:
                    m.phase = Phase.LOADING
                    out.append(self._load_transition(m, "resuming"))
                elif m.stable:
                    out.append(Transition(m.name, m.stable, None, 1.0, "restored", m.previous, Action.SYNC, m.wanted()))
                if m.stable:
                    m.window(m.stable)
                self._models[m.name] = m
                self._apply(m)
        return out

    # ------------------------------------------------------------------ replicas

    def follow(self, model: str, doc: Mapping[str, Any] | None) -> bool:
        """Route ``model`` as its writer's document ``doc`` says (another instance drives it).

        Ignored for a model this instance drives, and for no document or a bad one (logged);
        returns whether the model's state was taken from ``doc``. Its windows (this instance's
        requests) are kept; nothing is decided, saved or loaded for it here.
        """
        if doc is None:
            return False
        try:
            m = _Model.from_json(doc, self.policy)
            if m.name != model:
                raise DecodeError("rollout state document of another model", model=model, document=m.name)
            route = route_of(doc, self.policy)
        except DecodeError as exc:
            log.error("rollout state not followed", model=model, error=str(exc))
            return False
        with self._lock:
            cur = self._models.get(model)
            if cur is not None and (cur.owned or (cur.held and dict(doc) == cur.to_json(self.policy))):
                return False  # driven here, or released and not changed since (it may come back)
            m.owned, m.held, m.doc_route = False, False, route
            if cur is not None:
                m.windows = cur.windows
            for v in m.wanted():
                m.window(v)
            self._models[model] = m
            self._apply(m)
        return True

    def release(self, models: Collection[str]) -> list[str]:
        """Stop driving ``models`` (their partitions went to another instance); returns those released.

        What is not saved yet is saved first (the next writer restores from the document),
        and no save is under way when this returns. They keep their route until they are
        followed (:meth:`follow`) or given back (:meth:`restore`); transitions already handed
        out for them should make Triton do nothing more (:meth:`owns` says so).
        """
        with self._sync_lock:
            self._sync_held()
            with self._lock:
                out = []
                for name in sorted(models):
                    m = self._models.get(name)
                    if m is None or not m.owned:
                        continue
                    m.owned, m.held, m.dirty = False, True, False
                    out.append(name)
        if out:
            log.info("rollouts handed to another instance", models=out)
        return out

    # ------------------------------------------------------------------ internals (lock held)

    def _get(self, model: str) -> _Model:
        m = self._models.get(model)
        if m is None:
            raise NotFoundError("no such model", model=model)
        return m

    def _get_owned(self, model: str) -> _Model:
        m = self._get(model)
        if not m.owned:
            raise NotOwnerError("another gateway instance drives this model's rollout", model=model)
        return m

    def _candidate_of(self, model: str, version: int) -> _Model:
        m = self._get_owned(model)
        if not m.candidate or m.candidate != version:
            raise NotFoundError(
                "not the candidate being rolled out", model=model, version=version, candidate=m.candidate
            )
        return m

    def _mark(self, m: _Model, state: RolloutState, reason: str) -> None:
        m.state, m.reason = state, reason
        if m.candidate:
            m.cand_state = state

    def _load_transition(self, m: _Model, reason: str = "") -> Transition:
        keep = tuple(v for v in m.wanted() if v != m.candidate)
        why = reason or f"loading v{m.candidate}"
        return Transition(m.name, m.candidate, None, 0.0, why, m.stable, Action.LOAD, m.wanted(), keep)

    def _enter(
        self,
        m: _Model,
        phase: Phase,
        now: float,
        step: int = 0,
        share: float | None = None,
        *,
        resumed: bool = False,
        reason: str = "",
    ) -> list[Transition]:
        """The candidate takes (or changes) traffic in ``phase``."""
        steps = self.policy.canary_steps
        if m.phase not in _TRAFFIC_PHASES or resumed:  # the rollout's reference period starts now
            m.window(m.stable).reset(now)
            m.errors_total = 0
        m.window(m.candidate).reset(now)
        m.phase, m.step, m.share, m.since = phase, min(step, len(steps) - 1), share, now
        traffic = 0.0
        if phase is Phase.CANARY:
            traffic = share if share is not None else steps[m.step]
            state, why = RolloutState.CANARY, f"canary at {traffic:.0%} (step {m.step + 1}/{len(steps)})"
            if share is not None:
                why = f"canary pinned at {traffic:.0%}"
        elif phase is Phase.SHADOW:
            state, why = RolloutState.SHADOW, f"shadowing {self.policy.shadow_share:.0%} of requests"
        else:
            state, why = RolloutState.AWAITING_APPROVAL, "awaiting approval"
        if resumed:
            why = f"resumed: {why}"
        if reason:
            why = f"{reason}: {why}"
        self._mark(m, state, why)
        return [Transition(m.name, m.candidate, state, traffic, why, m.stable)]

    def _promote(self, m: _Model, reason: str, now: float) -> list[Transition]:
        old, version = m.stable, m.candidate
        m.previous, m.stable, m.stable_reason = old, version, reason
        m.candidate, m.phase, m.step, m.share, m.resume = 0, Phase.IDLE, 0, None, None
        m.state, m.reason, m.cand_state = RolloutState.PROMOTED, reason, RolloutState.UNSPECIFIED
        action = self._drop(m, old, had_traffic=True, now=now)
        m.windows = {
            version: m.windows.get(version) or VersionWindow(now),
            **{v: m.windows[v] for v in m.retiring if v in m.windows},
        }
        return [Transition(m.name, version, RolloutState.PROMOTED, 1.0, reason, old, action, m.wanted())]

    def _rollback(self, m: _Model, reason: str, now: float) -> list[Transition]:
        version, had_traffic = m.candidate, m.phase in _TRAFFIC_PHASES
        m.candidate, m.phase, m.step, m.share, m.resume = 0, Phase.IDLE, 0, None, None
        m.state, m.reason, m.cand_state = RolloutState.ROLLED_BACK, reason, RolloutState.UNSPECIFIED
        m.last = (version, RolloutState.ROLLED_BACK, reason)
        action = self._drop(m, version, had_traffic=had_traffic, now=now)
        self._changed(m)
        log.warning("rollout rolled back", model=m.name, version=version, reason=reason)
        return [Transition(m.name, version, RolloutState.ROLLED_BACK, 0.0, reason, m.stable, action, m.wanted())]

    def _fail(self, m: _Model, reason: str) -> list[Transition]:
        version = m.candidate
        m.candidate, m.phase, m.step, m.share, m.resume = 0, Phase.IDLE, 0, None, None
        m.state, m.reason, m.cand_state = RolloutState.FAILED, reason, RolloutState.UNSPECIFIED
        m.last = (version, RolloutState.FAILED, reason)
        m.windows.pop(version, None)
        log.warning("rollout failed", model=m.name, version=version, reason=reason)
        return [Transition(m.name, version, RolloutState.FAILED, 0.0, reason, m.stable, Action.SYNC, m.wanted())]

    def _drop(self, m: _Model, version: int, *, had_traffic: bool, now: float) -> Action:
        """``version`` leaves service: SYNC now, or drained first when it had traffic."""
        if not version:
            return Action.NONE
        if had_traffic and self.policy.drain_s > 0:
            m.retiring[version] = now + self.policy.drain_s
            return Action.NONE
        m.windows.pop(version, None)
        return Action.SYNC

    def _verdict(self, m: _Model) -> str | None:
        """Why the candidate must be rolled back, or None."""
        p = self.policy
        cand, stable = m.window(m.candidate), m.window(m.stable)
        if m.errors_total >= p.max_errors:
            return f"{m.errors_total} candidate errors (max_errors {p.max_errors})"
        if cand.requests >= p.min_samples:
            base = stable.error_rate if stable.requests >= p.min_samples else 0.0
            if cand.error_rate > base + p.max_error_rate:
                return f"error rate {cand.error_rate:.3f} vs stable {base:.3f} (max +{p.max_error_rate})"
        if cand.answered >= p.min_samples and stable.answered >= p.min_samples:
            c99, s99 = cand.quantile(0.99), stable.quantile(0.99)
            c50, s50 = cand.quantile(0.5), stable.quantile(0.5)
            # a slower version moves its whole distribution; a blip on a busy machine moves only
            # the tail of a few samples: both p99 and the median must be over the ratio
            if (
                c99 is not None
                and s99 is not None
                and c50 is not None
                and s50 is not None
                and c99 > p.max_latency_ratio * s99
                and c99 - s99 > p.latency_floor_s
                and c50 > p.max_latency_ratio * s50
            ):
                return (
                    f"p99 latency {c99 * 1e3:.1f} ms vs stable {s99 * 1e3:.1f} ms, median {c50 * 1e3:.1f} ms "
                    f"vs {s50 * 1e3:.1f} ms (max x{p.max_latency_ratio})"
                )
        ca, sa = cand.accuracy, stable.accuracy
        enough = cand.feedback >= p.min_feedback and stable.feedback >= p.min_feedback
        if ca is not None and sa is not None and enough and ca < sa - p.max_accuracy_drop:
            return f"accuracy on feedback {ca:.3f} vs stable {sa:.3f} (max drop {p.max_accuracy_drop})"
        return None

    def _evaluate(self, m: _Model, now: float) -> list[Transition]:
        p = self.policy
        reason = self._verdict(m)
        if reason is not None:
            return self._rollback(m, reason, now)
        cand = m.window(m.candidate)
        if now - m.since < p.step_min_s:
            return []
        out: list[Transition] = []
        if m.phase is Phase.CANARY and m.share is None and cand.requests >= p.min_samples:
            p99 = cand.quantile(0.99)
            evidence = f"{cand.requests} requests, {cand.errors} errors" + (
                f", p99 {p99 * 1e3:.1f} ms" if p99 is not None else ""
            )
            if m.step + 1 < len(p.canary_steps):
                out = self._enter(m, Phase.CANARY, now, m.step + 1, reason=evidence)
            else:
                out = self._promote(m, f"canary passed every step ({evidence} at the last)", now)
        elif m.phase is Phase.SHADOW and cand.compared >= p.min_samples:
            agreement = cand.agreed / cand.compared
            evidence = f"shadow agreement {agreement:.3f} over {cand.compared} requests"
            if agreement >= p.min_agreement:
                out = self._promote(m, evidence, now)
            else:
                out = self._rollback(m, f"{evidence} (min {p.min_agreement})", now)
        if out:
            self._changed(m)
        return out

    def _status(self, m: _Model) -> RolloutStatus:
        route = m.route(self.policy)
        traffic = route.canary if route else 0.0
        versions: list[VersionStatus] = []
        if m.stable:
            versions.append(self._version_status(m, m.stable, RolloutState.PROMOTED, 1.0 - traffic, m.stable_reason))
        if m.candidate:
            reason = m.reason if m.cand_state is m.state else ""
            versions.append(self._version_status(m, m.candidate, m.cand_state, traffic, reason))
        if m.last and m.last[0] not in (m.stable, m.candidate):
            versions.append(VersionStatus(m.last[0], m.last[1], 0.0, m.last[2]))
        return RolloutStatus(
            m.name, m.stable, m.candidate, m.phase, m.mode, m.state, traffic, m.reason, m.step, tuple(versions)
        )

    def _version_status(
        self, m: _Model, version: int, state: RolloutState, traffic: float, reason: str
    ) -> VersionStatus:
        w = m.windows.get(version)
        if w is None:
            return VersionStatus(version, state, traffic, reason)
        return VersionStatus(
            version,
            state,
            traffic,
            reason,
            w.requests,
            w.errors,
            w.quantile(0.5),
            w.quantile(0.99),
            w.agreement,
            w.accuracy,
        )

    def _changed(self, m: _Model) -> None:
        """After a change of ``m``: traffic taken away applies now; traffic given waits for :meth:`_sync`."""
        m.generation += 1
        m.dirty = True
        if _is_reduction(self.table.get(m.name), m.route(self.policy)):
            self._apply(m)

    def _apply(self, m: _Model) -> None:
        route = m.route(self.policy)
        if route is None:
            if self.table.get(m.name) is not None:
                self.table.remove(m.name)
        elif self.table.get(m.name) != route:
            self.table.set(route)

    # ------------------------------------------------------------------ persist, then apply (no lock held)

    def _sync(self) -> None:
        """Persist changed models, then let the traffic they gained take effect."""
        with self._sync_lock:
            self._sync_held()

    def _sync_held(self) -> None:
        """:meth:`_sync`, with ``_sync_lock`` held."""
        with self._lock:
            names = [name for name, m in self._models.items() if m.dirty and m.owned]
        for name in names:
            with self._lock:
                m = self._models[name]
                if not m.owned:
                    continue
                doc, generation = m.to_json(self.policy), m.generation
                m.dirty = False
            if self._persist is not None:
                try:
                    self._persist(name, doc)
                except Exception as exc:  # noqa: BLE001 - any failure: retry at the next tick
                    log.warning("rollout state not saved; traffic increase deferred", model=name, error=str(exc))
                    with self._lock:
                        m.dirty = True
                    continue
            with self._lock:
                if m.generation == generation:
                    self._apply(m)
