"""The hot path: ``inference.GRPCInferenceService`` forwarded to Triton as bytes.

One generic handler serves every method of the Open Inference Protocol's
service (ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
ModelInfer, ModelConfig, RepositoryIndex) with bytes in and bytes out: no
message is parsed or built on the way through. ``ModelInfer``:

1. checks the caller's API key (UNAUTHENTICATED), refuses a request larger
   than ``max_message_bytes`` (RESOURCE_EXHAUSTED; the server's own limit
   normally refuses it first);
2. reads the routing fields (:func:`wire.route_fields`; malformed framing is
   INVALID_ARGUMENT); a model the routing table does not know, or an explicit
   version that is not one of the route's, is NOT_FOUND;
3. picks the version (:meth:`RoutingTable.pick`) unless the client named one,
   appends it, and a generated ``id`` where the client gave none (Triton
   echoes it in its response, so the client can give feedback on it): one
   copy of the request;
4. forwards it with the client's remaining deadline (``default_timeout_s``
   when it set none) and returns Triton's bytes; Triton's errors reach the
   client with Triton's code and details;
5. reports the answer to :class:`Outcomes` (client errors such as
   INVALID_ARGUMENT count as ok: they say nothing about the version) and
   offers the pair to the inference log.

Server-side failures are UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED, UNKNOWN and
NOT_FOUND (the gateway forwards only versions its table holds: a Triton
without one has lost it). UNAVAILABLE and NOT_FOUND are first retried on the
other Triton servers (:class:`TritonPool`). An INTERNAL or UNKNOWN answer to a
request that does not parse, or whose inputs cannot be right (a negative
dimension, raw contents of the wrong size: :func:`wire.input_problem`), is the
client's fault: INVALID_ARGUMENT, reported as ok -- so garbage never counts
against a version (Triton 2.51 answers an unparsable request with INTERNAL,
and passes a dimension of 2**40 on to the backend).

A canary request (the table picked the candidate) that fails server-side is
reported as the candidate's failure and sent again to the stable version
within what is left of its deadline: no client request fails because of a
rollout. A request that named the candidate explicitly is not moved to
another version.

Shadow: where :meth:`RoutingTable.mirror` says so, a request answered by the
stable version is also sent to the candidate from a background task (at most
``shadow_max_in_flight`` at once, dropped and counted past that); the task
compares the two answers' top-1 labels (decoded there, after the client was
answered) and reports :meth:`Outcomes.shadowed`.

Metadata: ModelReady, ModelMetadata and ModelConfig without a version get the
stable version appended (so they describe what serves); an explicit version
must be one of the route's (NOT_FOUND otherwise). ModelReady of a model the
table does not know (or with no serving version yet) answers "not ready"
itself, as Triton does for a model it does not have; ModelMetadata and
ModelConfig of one are NOT_FOUND. ServerLive, ServerMetadata and
RepositoryIndex are forwarded as they are. ServerReady is answered by the
gateway: ready when at least one Triton server is ready (the pool's
health checks), byte-identical to Triton's answer when it is -- a load
balancer in front of several gateways asks the gateway, not one Triton.

Authentication: every method but ServerLive and ServerReady (which probes ask
without credentials) needs a key when keys are configured. The client's
metadata is not forwarded to Triton (the key stays at the gateway).

Prometheus: ``cdl_gateway_requests_total{model,version,code}`` and
``cdl_gateway_request_seconds{model,version}`` (ModelInfer; requests refused
before a route was found count under ``model=""``), and
``cdl_gateway_shadow_dropped_total``. The label children are bound once per
(model, version) and kept in a dict.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Histogram

from cdl import tracing
from cdl.errors import InvalidInputError
from cdl.logging import get_logger
from cdl.v1 import open_inference_pb2 as pb
from services.gateway import wire
from services.gateway.auth import ApiKeys
from services.gateway.backends import SERVICE, NoServerError, TritonPool
from services.gateway.inference_log import InferenceLog, top_labels
from services.gateway.routing import Outcomes, Route, RoutingTable

__all__ = ["METHODS", "REQUESTS", "REQUEST_SECONDS", "SHADOW_DROPPED", "InferenceService"]

log = get_logger(__name__)

#: the methods of ``inference.GRPCInferenceService`` the gateway serves
METHODS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelConfig",
    "RepositoryIndex",
)

REQUESTS = Counter(
    "cdl_gateway_requests_total",
    "ModelInfer requests answered by the gateway, by model, version and gRPC status code",
    ["model", "version", "code"],
)
REQUEST_SECONDS = Histogram(
    "cdl_gateway_request_seconds",
    "Time from forwarding a ModelInfer request to Triton to its answer, by model and version",
    ["model", "version"],
    buckets=(0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.5, 10.0),
)
SHADOW_DROPPED = Counter(
    "cdl_gateway_shadow_dropped_total", "Mirrored requests not sent because too many were in flight", ["model"]
)

Context: TypeAlias = "grpc.aio.ServicerContext[bytes, bytes]"
Behavior: TypeAlias = Callable[[bytes, Context], Awaitable[bytes]]

_INFER = f"/{SERVICE}/ModelInfer"
_OK = grpc.StatusCode.OK
_NOT_FOUND = grpc.StatusCode.NOT_FOUND
#: failures that say something about the version that answered (the rest are the client's)
#: (NOT_FOUND too: a version the routing table holds that Triton does not have)
_SERVER_SIDE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.NOT_FOUND,
    }
)
#: gRPC status codes by number (the native lane reports them so)
_CODES = {c.value[0]: c for c in grpc.StatusCode}
#: metadata the native lane hands a request over with: the version it picked
_LANE_HINT = "x-cdl-lane-version"
#: ... and Triton's failure of the lane's forward: its code, details, and how long it took
_LANE_CODE = "x-cdl-lane-code"
_LANE_DETAILS = "x-cdl-lane-details-bin"
_LANE_LATENCY = "x-cdl-lane-latency-us"
#: a deadline further away than this is no deadline (grpc reports "infinite" as a huge number)
_NO_DEADLINE_S = 1e8
_READY = b"\x08\x01"  # ServerReadyResponse / ModelReadyResponse(ready=true)
_NOT_READY = b""  # ... (ready=false): proto3 sends nothing


#: codes a server gives a request it could not parse or a backend failed on; then the gateway
#: checks whether the request was the client's fault
_CHECK_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
#: codes a ModelInfer or model-scoped request is retried on another server for: the gateway only
#: forwards versions its routing table holds, so a server without the model has lost it
_RETRY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND})


def _client_fault(data: bytes) -> str | None:
    """Why a ``ModelInferRequest`` Triton failed on was malformed (None: it was not): it does not
    parse, or its inputs cannot be right (error path only; a full parse)."""
    try:
        pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return "malformed ModelInferRequest"
    return wire.input_problem(data)


class _Fail(Exception):  # noqa: N818 (a status to send, not an error of the gateway)
    """A status for the client: raised inside a handler, turned into ``context.abort`` outside it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _version_of(version: str, route: Route) -> int:
    """The route's version a request names explicitly; NOT_FOUND when it is not one of them."""
    if version.isascii() and version.isdigit():
        v = int(version)
        if v in route.versions():
            return v
    raise _Fail(
        _NOT_FOUND,
        f"version {version!r} of model {route.model!r} is not served (serving: "
        + ", ".join(str(v) for v in route.versions())
        + ")",
    )


class InferenceService:
    """The gateway's ``inference.GRPCInferenceService``; see the module docstring."""

    def __init__(
        self,
        table: RoutingTable,
        pool: TritonPool,
        outcomes: Outcomes,
        log: InferenceLog | None,
        keys: ApiKeys,
        default_timeout_s: float = 10.0,
        max_message_bytes: int = 16 << 20,
        shadow_max_in_flight: int = 64,
        trace_sample: float = 0.0,
        behind_lane: bool = False,
    ) -> None:
        """``behind_lane``: this server listens behind the native lane (``services.gateway.lane``),
        which hands over requests with the version it picked."""
        self._trace_sample = trace_sample
        self._behind_lane = behind_lane
        self._table = table
        self._pool = pool
        self._outcomes = outcomes
        self._log = log if log is not None and log.enabled else None
        self._keys = keys
        self._open = keys.open
        self._default_timeout = default_timeout_s
        self._max_bytes = max_message_bytes
        self._shadow_max = shadow_max_in_flight
        self._shadows: set[asyncio.Task[None]] = set()
        self._id_prefix = f"gw-{secrets.token_hex(4)}-"
        self._ids = itertools.count(1)
        self._version_fields: dict[int, bytes] = {}
        self._metrics: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._codes: dict[tuple[str, int, grpc.StatusCode], Any] = {}

    @property
    def id_prefix(self) -> str:
        """What the ids this service generates begin with (``gw-<hex>-``)."""
        return self._id_prefix

    # ------------------------------------------------------------- registration

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[bytes, bytes]]:
        """Method name -> bytes-in, bytes-out unary handler, for every method in :data:`METHODS`
        (for ``server.add_registered_method_handlers(SERVICE, ...)``)."""
        behaviors: dict[str, Behavior] = {
            "ServerLive": self._forwarder("ServerLive", auth=False),
            "ServerReady": self.server_ready,
            "ModelReady": self._model_scoped("ModelReady"),
            "ServerMetadata": self._forwarder("ServerMetadata"),
            "ModelMetadata": self._model_scoped("ModelMetadata"),
            "ModelInfer": self.model_infer,
            "ModelConfig": self._model_scoped("ModelConfig"),
            "RepositoryIndex": self._forwarder("RepositoryIndex"),
        }
        return {name: grpc.unary_unary_rpc_method_handler(b) for name, b in behaviors.items()}

    def handler(self) -> grpc.GenericRpcHandler:
        """One generic handler for the whole service (``server.add_generic_rpc_handlers((h,))``)."""
        return grpc.method_handlers_generic_handler(SERVICE, self.method_handlers())

    # ------------------------------------------------------------- helpers

    def _authorized(self, context: Context) -> bool:
        return self._open or self._keys.check(context.invocation_metadata())

    def _timeout(self, context: Context) -> float:
        remaining = context.time_remaining()
        if remaining is None or remaining > _NO_DEADLINE_S:
            return self._default_timeout
        return max(remaining, 0.0)

    def _version_field(self, version: int) -> bytes:
        field = self._version_fields.get(version)
        if field is None:
            field = self._version_fields[version] = wire.version_field(str(version))
        return field

    def _count(self, model: str, version: int, code: grpc.StatusCode) -> None:
        child = self._codes.get((model, version, code))
        if child is None:
            child = self._codes[(model, version, code)] = REQUESTS.labels(
                model=model, version=str(version), code=code.name
            )
        child.inc()

    def _ok_metrics(self, model: str, version: int) -> tuple[Any, Any]:
        pair = self._metrics.get((model, version))
        if pair is None:
            pair = self._metrics[(model, version)] = (
                REQUESTS.labels(model=model, version=str(version), code="OK"),
                REQUEST_SECONDS.labels(model=model, version=str(version)),
            )
        return pair

    # ------------------------------------------------------------- ModelInfer

    async def model_infer(self, request: bytes, context: Context) -> bytes:
        """ModelInfer: route, forward, report (see the module docstring); a sampled request gets a
        span, the child of the client's ``traceparent`` metadata when it sent one."""
        if self._trace_sample and random.random() < self._trace_sample:
            parent = next((v for k, v in context.invocation_metadata() or () if k == "traceparent"), None)
            with tracing.span("gateway ModelInfer", parent if isinstance(parent, str) else None):
                return await self._model_infer(request, context)
        return await self._model_infer(request, context)

    async def _model_infer(self, request: bytes, context: Context) -> bytes:
        try:
            return await self._infer(request, context)
        except _Fail as fail:
            code, details = fail.code, fail.details
        except grpc.aio.AioRpcError as exc:  # Triton's answer, passed through
            code, details = exc.code(), exc.details() or ""
        except NoServerError as exc:
            code, details = grpc.StatusCode.UNAVAILABLE, str(exc)
        except Exception as exc:  # never UNKNOWN from a crash
            log.exception("ModelInfer failed in the gateway", error=type(exc).__name__)
            code, details = grpc.StatusCode.INTERNAL, f"gateway error: {type(exc).__name__}"
        await context.abort(code, details)

    async def _infer(self, request: bytes, context: Context) -> bytes:
        if not self._open and not self._keys.check(context.invocation_metadata()):
            self._count("", 0, grpc.StatusCode.UNAUTHENTICATED)
            raise _Fail(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key (authorization: Bearer <key>)")
        if len(request) > self._max_bytes:
            self._count("", 0, grpc.StatusCode.RESOURCE_EXHAUSTED)
            raise _Fail(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request of {len(request)} bytes is larger than the gateway's limit of {self._max_bytes}",
            )
        try:
            name, version, request_id = wire.route_fields(request)
        except InvalidInputError as exc:
            self._count("", 0, grpc.StatusCode.INVALID_ARGUMENT)
            raise _Fail(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        route = self._table.get(name)
        if route is None:
            self._count("", 0, _NOT_FOUND)
            raise _Fail(_NOT_FOUND, f"unknown model {name!r}")
        picked = not version
        lane_v, lane_failure = self._lane_meta(context) if self._behind_lane else (0, None)
        if picked:
            v = lane_v if lane_v in route.versions() else 0
            v = v or self._table.pick(route)
            if not v:
                self._count(name, 0, grpc.StatusCode.UNAVAILABLE)
                raise _Fail(grpc.StatusCode.UNAVAILABLE, f"model {name!r} has no serving version yet")
            suffix = self._version_field(v)
        else:
            try:
                v = _version_of(version, route)
            except _Fail:
                self._count(name, 0, _NOT_FOUND)
                raise
            suffix = b"" if version == str(v) else self._version_field(v)
        if not request_id:
            request_id = self._id_prefix + str(next(self._ids))
            suffix += wire.id_field(request_id)
        data = request + suffix if suffix else request
        timeout = self._timeout(context)

        start = time.perf_counter()
        try:
            if lane_failure is not None and (not picked or v == lane_v):
                # Triton's answer to the lane's forward of this request: not sent again
                start -= lane_failure[1]
                raise lane_failure[0]
            response = await self._pool.call(_INFER, data, timeout, retry=_RETRY)
        except grpc.aio.AioRpcError as exc:
            if not self._failed(exc, name, v, route, picked, data, request_id, time.perf_counter() - start):
                raise
            # a canary request failed server-side: the stable version answers it
            v = route.stable
            left = timeout - (time.perf_counter() - start)
            if left <= 0:
                raise
            log.info("canary request failed, retried on the stable version", model=name, code=exc.code().name)
            data += self._version_field(v)
            start = time.perf_counter()
            try:
                response = await self._pool.call(_INFER, data, left, retry=_RETRY)
            except grpc.aio.AioRpcError as again:
                self._failed(again, name, v, route, False, data, request_id, time.perf_counter() - start)
                raise
        latency = time.perf_counter() - start
        self._served_ok(name, v, latency)
        if self._log is not None:
            self._log.offer(name, v, request_id, data, response, latency, "OK")
        if picked and route.shadow > 0.0 and v == route.stable and self._table.mirror(route):
            self._mirror(route, data, response, timeout)
        return response

    def _served_ok(self, name: str, v: int, latency: float) -> None:
        self._outcomes.served(name, v, True, latency)
        ok, seconds = self._ok_metrics(name, v)
        ok.inc()
        seconds.observe(latency)

    def _lane_meta(self, context: Context) -> tuple[int, tuple[grpc.aio.AioRpcError, float] | None]:
        """What the native lane handed a request over with (the lane drops these keys from what
        clients send): the version it picked (``x-cdl-lane-version``; 0 for none), and Triton's
        failure of its forward (``x-cdl-lane-code``, ``-details-bin``, ``-latency-us``), as the
        error the pool would have raised and the seconds it took; None when it did not fail."""
        picked, code, details, latency_us = 0, None, b"", 0
        for key, value in context.invocation_metadata() or ():
            if key == _LANE_HINT and isinstance(value, str) and value.isdigit():
                picked = int(value)
            elif key == _LANE_CODE and isinstance(value, str) and value.isdigit():
                code = _CODES.get(int(value))
            elif key == _LANE_DETAILS and isinstance(value, bytes):
                details = value
            elif key == _LANE_LATENCY and isinstance(value, str) and value.isdigit():
                latency_us = int(value)
        if code is None or code is _OK:
            return picked, None
        meta = grpc.aio.Metadata()
        error = grpc.aio.AioRpcError(code, meta, meta, details.decode(errors="replace"))
        return picked, (error, latency_us / 1e6)

    def lane_served(
        self,
        model: str,
        version: int,
        code: int,
        latency_s: float,
        when: float,
        request_id: str,
        request: bytes,
        response: bytes,
    ) -> None:
        """A ModelInfer the native lane served (``services.gateway.lane``), reported as the hot path
        reports its own: outcomes, metrics, and the log (``request`` empty: not sampled)."""
        status = _CODES.get(code, grpc.StatusCode.UNKNOWN)
        if status is _OK:
            self._served_ok(model, version, latency_s)
        else:
            self._outcomes.served(model, version, status not in _SERVER_SIDE, latency_s)
            self._count(model, version, status)
        if self._log is not None and request:
            self._log.put(model, version, request_id, request, response, latency_s, status.name, when)

    def _failed(
        self,
        exc: grpc.aio.AioRpcError,
        name: str,
        v: int,
        route: Route,
        picked: bool,
        data: bytes,
        request_id: str,
        latency: float,
    ) -> bool:
        """Report a failed forward; whether it was a canary request to retry on the stable version."""
        code = exc.code()
        server_side = code in _SERVER_SIDE
        if code in _CHECK_CODES:
            fault = _client_fault(data)
            if fault is not None:
                # the client's fault, whatever the code says (and it says nothing about the version)
                self._outcomes.served(name, v, True, latency)
                self._count(name, v, grpc.StatusCode.INVALID_ARGUMENT)
                raise _Fail(grpc.StatusCode.INVALID_ARGUMENT, f"{fault} (Triton: {exc.details()})")
        self._outcomes.served(name, v, not server_side, latency)
        self._count(name, v, code)
        if self._log is not None:
            self._log.offer(name, v, request_id, data, b"", latency, code.name)
        return server_side and picked and v == route.candidate and bool(route.stable) and v != route.stable

    # ------------------------------------------------------------- shadow

    def _mirror(self, route: Route, data: bytes, response: bytes, timeout: float) -> None:
        if len(self._shadows) >= self._shadow_max:
            SHADOW_DROPPED.labels(model=route.model).inc()
            return
        task = asyncio.create_task(self._shadow(route.model, route.candidate, data, response, timeout))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(self, model: str, candidate: int, data: bytes, answer: bytes, timeout: float) -> None:
        start = time.perf_counter()
        try:
            response = await self._pool.call(_INFER, data + self._version_field(candidate), timeout, retry=_RETRY)
        except (grpc.aio.AioRpcError, NoServerError) as exc:
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
            self._outcomes.shadowed(model, candidate, code not in _SERVER_SIDE, time.perf_counter() - start, None)
            return
        except Exception:
            log.exception("shadow request failed in the gateway", model=model, version=candidate)
            return
        latency = time.perf_counter() - start
        mine, theirs = top_labels(response), top_labels(answer)
        agrees = None if mine is None or theirs is None else mine[0] == theirs[0]
        self._outcomes.shadowed(model, candidate, True, latency, agrees)

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait for mirrored requests in flight (at shutdown, in tests)."""
        if self._shadows:
            await asyncio.wait(set(self._shadows), timeout=timeout_s)

    # ------------------------------------------------------------- the other methods

    async def server_ready(self, request: bytes, context: Context) -> bytes:
        """Ready when at least one Triton server is (see the module docstring)."""
        return _READY if self._pool.ready_count() else _NOT_READY

    def _forwarder(self, method: str, auth: bool = True) -> Behavior:
        path = f"/{SERVICE}/{method}"

        async def forward(request: bytes, context: Context) -> bytes:
            try:
                if auth and not self._authorized(context):
                    raise _Fail(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")
                return await self._pool.call(path, request, self._timeout(context))
            except _Fail as fail:
                code, details = fail.code, fail.details
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
            except NoServerError as exc:
                code, details = grpc.StatusCode.UNAVAILABLE, str(exc)
            except Exception as exc:
                log.exception("forwarding failed in the gateway", method=method, error=type(exc).__name__)
                code, details = grpc.StatusCode.INTERNAL, f"gateway error: {type(exc).__name__}"
            await context.abort(code, details)

        return forward

    def _model_scoped(self, method: str) -> Behavior:
        """ModelReady / ModelMetadata / ModelConfig: the version resolved against the route."""
        path = f"/{SERVICE}/{method}"
        ready = method == "ModelReady"

        async def forward(request: bytes, context: Context) -> bytes:
            try:
                if not self._authorized(context):
                    raise _Fail(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")
                try:
                    name, version = wire.name_version(request)
                except InvalidInputError as exc:
                    raise _Fail(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
                route = self._table.get(name)
                if route is None or not route.versions():
                    if ready:
                        return _NOT_READY
                    raise _Fail(_NOT_FOUND, f"unknown model {name!r}")
                if version:
                    try:
                        _version_of(version, route)
                    except _Fail:
                        if ready:
                            return _NOT_READY
                        raise
                    data = request
                else:
                    data = request + self._version_field(route.stable or route.versions()[0])
                return await self._pool.call(path, data, self._timeout(context), retry=_RETRY)
            except _Fail as fail:
                code, details = fail.code, fail.details
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
            except NoServerError as exc:
                code, details = grpc.StatusCode.UNAVAILABLE, str(exc)
            except Exception as exc:
                log.exception("forwarding failed in the gateway", method=method, error=type(exc).__name__)
                code, details = grpc.StatusCode.INTERNAL, f"gateway error: {type(exc).__name__}"
            await context.abort(code, details)

        return forward
