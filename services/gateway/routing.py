"""The routing table the hot path reads and the rollout manager writes (pure logic).

A :class:`Route` says, for one model, which version serves (``stable``),
which one is being rolled out (``candidate``), and what share of live
requests the candidate gets (``canary``) or sees mirrored (``shadow``). The
table is a dict replaced as a whole on every change, so the hot path reads it
without a lock and never sees half an update.

:class:`Outcomes` is what the hot path reports after each forwarded request;
the rollout manager implements it (and decides from it).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Outcomes", "Route", "RoutingTable"]


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    stable: int
    """The version that serves; 0 while a first version is being loaded."""
    candidate: int = 0
    """The version being rolled out; 0 for none."""
    canary: float = 0.0
    """Share of live requests the candidate answers."""
    shadow: float = 0.0
    """Share of live requests mirrored to the candidate (its answers never reach a client)."""

    def versions(self) -> tuple[int, ...]:
        """The versions a request may name explicitly (the ones loaded for traffic)."""
        return tuple(v for v in (self.stable, self.candidate) if v)


class RoutingTable:
    """Model name -> :class:`Route`; reads are lock-free (see the module docstring)."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        self._tick = itertools.count()
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after each change (in the changing thread: it must not block)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def get(self, model: str) -> Route | None:
        return self._routes.get(model)

    def all(self) -> dict[str, Route]:
        return self._routes

    def set(self, route: Route) -> None:
        routes = dict(self._routes)
        routes[route.model] = route
        self._routes = routes
        self._changed()

    def remove(self, model: str) -> None:
        routes = dict(self._routes)
        routes.pop(model, None)
        self._routes = routes
        self._changed()

    def pick(self, route: Route) -> int:
        """The version that answers the next request without an explicit version.

        Deterministic spreading (no random numbers): of every 1,000 requests the
        candidate answers ``canary`` x 1,000, evenly interleaved.
        """
        if not route.candidate or route.canary <= 0.0 or not route.stable:
            return route.stable or route.candidate
        if route.canary >= 1.0:
            return route.candidate
        n = next(self._tick) % 1000
        return route.candidate if int((n + 1) * route.canary) > int(n * route.canary) else route.stable

    def mirror(self, route: Route) -> bool:
        """Whether the next request is also sent to the shadow candidate."""
        if not route.candidate or route.shadow <= 0.0:
            return False
        if route.shadow >= 1.0:
            return True
        n = next(self._tick) % 1000
        return int((n + 1) * route.shadow) > int(n * route.shadow)


class Outcomes(Protocol):
    """What the hot path reports; the rollout manager implements it."""

    def served(self, model: str, version: int, ok: bool, latency_s: float) -> None:
        """A request answered by ``version`` (``ok``: no server-side failure; client errors
        such as INVALID_ARGUMENT are reported as ok, they say nothing about the version)."""
        ...

    def shadowed(self, model: str, version: int, ok: bool, latency_s: float, agrees: bool | None) -> None:
        """A mirrored request answered by the shadow ``version``; ``agrees``: same top-1 label
        as the answer the client got (None when it could not be compared)."""
        ...
