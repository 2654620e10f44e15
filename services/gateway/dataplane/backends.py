"""The Triton servers behind the gateway: pooled channels, least-outstanding choice, health, retries.

:class:`TritonPool` keeps one ``grpc.aio`` channel per Triton server and calls
it with bytes in and bytes out (no (de)serialiser; one registered multicallable
per method, cached). Each server has an outstanding-request count and a
readiness flag:

- a request goes to the ready server with the fewest outstanding requests
  (ties rotate); where none is ready it goes to any server rather than
  failing at once (a readiness flag can be a moment late);
- a call failing with UNAVAILABLE (the server is down or restarting) is
  retried on another server while its deadline lasts, and the failing server
  is checked again at once; callers may name more codes to retry elsewhere
  (the gateway adds NOT_FOUND for models it knows: a server that lacks one
  has lost it, e.g. restarted in explicit model-control mode);
- a background task asks every server ``ServerReady`` each
  ``health_interval_s``: a server that refuses the call or answers "not
  ready" leaves the choice at once; one that is only slow to answer (its
  deadline passed: a busy machine, not a dead server) leaves after
  ``health_misses`` such checks in a row; one that answers again rejoins it -- after the ``on_ready`` hook (the app's:
  load the models it should hold) returned True, where one is given. Channels
  reconnect with a short backoff (at most ``max_reconnect_backoff_s``), so a
  restarted server rejoins within about a second and a health interval plus
  what the hook takes.

Create and :meth:`start` the pool inside the event loop that serves requests
(grpc.aio channels belong to one loop). The gauges
``cdl_gateway_triton_outstanding{server}`` and ``cdl_gateway_triton_ready{server}``
are read at scrape time, so the hot path updates no metric object.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import grpc
import grpc.aio
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cdl.errors import UnavailableError
from cdl.logging import get_logger
from cdl.v1 import open_inference_pb2 as pb

__all__ = ["RETRY_UNAVAILABLE", "SERVICE", "NoServerError", "ServerInfo", "TritonPool", "channel_options"]

log = get_logger(__name__)

#: the Open Inference Protocol's gRPC service (full name)
SERVICE = "inference.GRPCInferenceService"
_SERVER_READY = f"/{SERVICE}/ServerReady"

Metadata = Sequence[tuple[str, str | bytes]]
ReadyHook = Callable[[str], Awaitable[bool]]
_APPEND_SLACK = 4096
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
#: the codes a call is retried on another server for by default
RETRY_UNAVAILABLE: frozenset[grpc.StatusCode] = frozenset({_UNAVAILABLE})


class NoServerError(UnavailableError):
    """No Triton server could take the request (all down, or all tried within the deadline)."""


class ServerInfo(NamedTuple):
    """One Triton server as metrics and the admin API see it."""

    endpoint: str
    ready: bool
    outstanding: int
    """Requests sent to it and not yet answered."""
    failures: int
    """Calls that failed with UNAVAILABLE (each retried elsewhere when the deadline allowed)."""


def channel_options(max_message_bytes: int, max_reconnect_backoff_s: float = 1.0) -> list[tuple[str, Any]]:
    """Channel arguments of a connection to Triton (the gateway's message limit, keepalive, backoff)."""
    backoff_ms = max(100, int(max_reconnect_backoff_s * 1000))
    return [
        # a request the gateway accepted may have grown by the fields it appended
        ("grpc.max_send_message_length", max_message_bytes + _APPEND_SLACK),
        ("grpc.max_receive_message_length", max_message_bytes),
        # keepalive only while calls are in flight: Triton's default server policy answers pings
        # on an idle connection more often than every 5 minutes with GOAWAY (too_many_pings)
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.initial_reconnect_backoff_ms", min(100, backoff_ms)),
        ("grpc.min_reconnect_backoff_ms", min(100, backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", backoff_ms),
        # the pool retries on another server itself
        ("grpc.enable_retries", 0),
    ]


@dataclass(eq=False)
class _Server:
    endpoint: str
    channel: grpc.aio.Channel
    calls: dict[str, Any] = field(default_factory=dict)
    outstanding: int = 0
    ready: bool = False
    failures: int = 0
    checking: bool = False
    joining: bool = False
    #: readiness checks in a row whose deadline passed
    slow: int = 0

    def method(self, name: str) -> Any:
        """The cached bytes-in, bytes-out multicallable of ``name`` (``/package.Service/Method``)."""
        call = self.calls.get(name)
        if call is None:
            # _registered_method: the channel registers the method once instead of per call
            call = self.calls[name] = self.channel.unary_unary(name, None, None, _registered_method=True)  # type: ignore[call-arg]
        return call


class TritonPool:
    """Channels to the Triton servers; see the module docstring."""

    def __init__(
        self,
        endpoints: Sequence[str],
        max_message_bytes: int = 16 << 20,
        health_interval_s: float = 1.0,
        health_timeout_s: float = 1.0,
        max_reconnect_backoff_s: float = 1.0,
        on_ready: ReadyHook | None = None,
        health_misses: int = 3,
    ) -> None:
        """``on_ready(endpoint)``: awaited when a server turns ready (also the first time); it takes
        requests once that returned True (False or an exception: tried again at the next check)."""
        if not endpoints:
            raise ValueError("a TritonPool needs at least one endpoint")
        self._endpoints = list(endpoints)
        self._options = channel_options(max_message_bytes, max_reconnect_backoff_s)
        self._interval = health_interval_s
        self._health_timeout = min(health_timeout_s, max(health_interval_s, 0.1))
        self._misses = max(1, health_misses)
        self._on_ready = on_ready
        self._servers: list[_Server] = []
        self._rr = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after a server turns ready or not ready (on the event loop: it
        must not block)."""
        self._listeners.append(listener)

    def _set_ready(self, server: _Server, ready: bool) -> None:
        server.ready = ready
        for listener in self._listeners:
            listener()

    # ------------------------------------------------------------- life cycle

    async def start(self) -> None:
        """Open the channels, check every server once and start the health task."""
        if self._servers:
            return
        self._servers = [_Server(e, grpc.aio.insecure_channel(e, options=self._options)) for e in self._endpoints]
        await asyncio.gather(*(self._check(s) for s in self._servers if self._claim(s)))
        self._task = asyncio.create_task(self._health_loop(), name="cdl-gateway-health")
        _POOLS.add(self)

    async def close(self) -> None:
        """Stop the health task and close every channel."""
        self._closed = True
        _POOLS.discard(self)
        tasks = [t for t in (self._task, *self._checks) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await asyncio.gather(*(s.channel.close() for s in self._servers), return_exceptions=True)

    async def __aenter__(self) -> TritonPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------- state

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    def servers(self) -> list[ServerInfo]:
        """Every server's endpoint, readiness, outstanding requests and failures."""
        return [ServerInfo(s.endpoint, s.ready, s.outstanding, s.failures) for s in self._servers]

    def ready_count(self) -> int:
        return sum(1 for s in self._servers if s.ready)

    # ------------------------------------------------------------- calls

    def _choose(self, tried: Sequence[_Server] = ()) -> _Server | None:
        servers = self._servers
        n = len(servers)
        if n == 1:
            s = servers[0]
            return None if tried else s
        start = next(self._rr) % n
        best: _Server | None = None
        fallback: _Server | None = None
        for i in range(n):
            s = servers[(start + i) % n]
            if s in tried:
                continue
            if s.ready:
                if best is None or s.outstanding < best.outstanding:
                    best = s
            elif fallback is None or s.outstanding < fallback.outstanding:
                fallback = s
        return best or fallback

    async def call(
        self,
        method: str,
        request: bytes,
        timeout: float | None,
        metadata: Metadata | None = None,
        retry: frozenset[grpc.StatusCode] = RETRY_UNAVAILABLE,
    ) -> bytes:
        """Forward ``request`` (serialized) to ``method`` on a server; Triton's answer, serialized.

        Errors from Triton are raised as ``grpc.aio.AioRpcError`` (with Triton's code and
        details); those with a code in ``retry`` after no other server could take the request
        within ``timeout`` (seconds, None: no deadline); :class:`NoServerError` when the pool
        is closed or has not started.
        """
        server = self._choose()
        if server is None:
            raise NoServerError("the Triton pool has not started or is closed")
        deadline = time.monotonic() + timeout if timeout is not None else None
        tried: list[_Server] = []
        while True:
            server.outstanding += 1
            try:
                response: bytes = await server.method(method)(request, timeout=timeout, metadata=metadata)
                return response
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in retry:
                    raise
                failure = exc
            finally:
                server.outstanding -= 1
            server.failures += 1
            if failure.code() == _UNAVAILABLE:
                self._suspect(server)
            tried.append(server)
            if deadline is not None:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    raise failure
            nxt = self._choose(tried)
            if nxt is None:
                raise failure
            server = nxt

    async def call_each(self, method: str, request: bytes, timeout: float | None) -> list[bytes]:
        """``request`` to ``method`` on every ready server at once (what is summed over the
        servers, such as statistics): every server's answer, or the first failure -- a sum
        missing a server would go down between two calls (a client's deltas negative).
        :class:`NoServerError` when none is ready."""
        servers = [s for s in self._servers if s.ready]
        if not servers:
            raise NoServerError("no Triton server is ready")
        answers = await asyncio.gather(
            *(s.method(method)(request, timeout=timeout) for s in servers), return_exceptions=True
        )
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return [a for a in answers if isinstance(a, bytes)]

    # ------------------------------------------------------------- health

    def _suspect(self, server: _Server) -> None:
        """Check ``server`` again now (once at a time)."""
        if self._closed or not self._claim(server):
            return
        task = asyncio.create_task(self._check(server))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    @staticmethod
    def _claim(server: _Server) -> bool:
        """Mark a check of ``server`` as under way; False when one already is."""
        if server.checking:
            return False
        server.checking = True
        return True

    async def _check(self, server: _Server) -> None:
        """Ask ``server`` whether it is ready (the caller :meth:`_claim` ed it)."""
        try:
            raw = await server.method(_SERVER_READY)(b"", timeout=self._health_timeout)
            ready = pb.ServerReadyResponse.FromString(raw).ready
            server.slow = 0
        except grpc.aio.AioRpcError as exc:
            ready = False
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and server.ready:
                server.slow += 1
                if server.slow < self._misses:  # slow, not gone (yet): it keeps its place
                    log.info("Triton readiness check timed out", server=server.endpoint, in_a_row=server.slow)
                    return
        except Exception:  # a health check must never end the health task
            log.exception("Triton readiness check failed", server=server.endpoint)
            ready = False
        finally:
            server.checking = False
        if ready == server.ready:
            return
        if not ready:
            log.info("Triton server not ready", server=server.endpoint)
            server.slow = 0
            self._set_ready(server, False)
        elif self._on_ready is None:
            log.info("Triton server ready", server=server.endpoint)
            self._set_ready(server, True)
        elif not server.joining and not self._closed:
            server.joining = True
            task = asyncio.create_task(self._join(server, self._on_ready))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    async def _join(self, server: _Server, hook: ReadyHook) -> None:
        """Run the ``on_ready`` hook for a server that turned ready; it joins when the hook says so."""
        try:
            ok = await hook(server.endpoint)
        except Exception:  # the next health check tries again
            log.exception("Triton server's on_ready hook failed", server=server.endpoint)
            ok = False
        finally:
            server.joining = False
        if ok and not self._closed:
            log.info("Triton server ready", server=server.endpoint)
            self._set_ready(server, True)

    async def _health_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._interval)
            await asyncio.gather(*(self._check(s) for s in self._servers if self._claim(s)))

    async def wait_ready(self, count: int = 1, timeout_s: float = 30.0) -> bool:
        """Wait until at least ``count`` servers are ready (False when ``timeout_s`` passed first)."""
        deadline = time.monotonic() + timeout_s
        while self.ready_count() < count:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True


# ----------------------------------------------------------------- metrics

_POOLS: weakref.WeakSet[TritonPool] = weakref.WeakSet()


class _PoolCollector(Collector):
    """Outstanding requests and readiness per Triton server of every live pool, read at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        outstanding = GaugeMetricFamily(
            "cdl_gateway_triton_outstanding", "Requests sent to a Triton server and not yet answered", labels=["server"]
        )
        ready = GaugeMetricFamily(
            "cdl_gateway_triton_ready", "Whether a Triton server answers ServerReady with true", labels=["server"]
        )
        for pool in list(_POOLS):
            for s in pool.servers():
                outstanding.add_metric([s.endpoint], s.outstanding)
                ready.add_metric([s.endpoint], 1.0 if s.ready else 0.0)
        yield outstanding
        yield ready


REGISTRY.register(_PoolCollector())
