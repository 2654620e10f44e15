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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeAlias

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Histogram

from cdl import tracing
from cdl.auth import ApiKeys, KeyBudget
from cdl.errors import (
    BudgetExceededError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    TooLargeError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from cdl.logging import get_logger
from cdl.v1 import open_inference_pb2 as pb
from services.gateway.dataplane import statistics, wire
from services.gateway.dataplane.backends import SERVICE, NoServerError, TritonPool
from services.gateway.inference_log import HttpExchange, InferenceLog, top_labels
from services.gateway.routing import Outcomes, Route, RoutingTable
from services.gateway.status import failure

__all__ = ["METHODS", "REFUSED", "REQUESTS", "REQUEST_SECONDS", "SHADOW_DROPPED", "InferenceService"]

log = get_logger(__name__)

#: the methods of ``inference.GRPCInferenceService`` the gateway serves
METHODS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
)
#: ... and those it refuses (PERMISSION_DENIED): they would change what the gateway owns
REFUSED = (
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
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
#: a call's invocation metadata (grpc's, or pairs from another transport, e.g. HTTP headers)
Metadata: TypeAlias = Iterable[tuple[str, str | bytes]]
#: a unary method, transport-free: (request, metadata, timeout) -> the serialized answer
Body: TypeAlias = Callable[[bytes, Metadata, float], Awaitable[bytes]]
_NO_KEY = "missing or wrong API key (authorization: Bearer <key>)"

_INFER = f"/{SERVICE}/ModelInfer"
_STATISTICS = f"/{SERVICE}/ModelStatistics"
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


def _version_of(version: str, route: Route) -> int:
    """The route's version a request names explicitly; NOT_FOUND when it is not one of them."""
    if version.isascii() and version.isdigit():
        v = int(version)
        if v in route.versions():
            return v
    raise NotFoundError(
        f"version {version!r} of model {route.model!r} is not served (serving: "
        + ", ".join(str(v) for v in route.versions())
        + ")"
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
        stream_window: int = 64,
        budget: KeyBudget | None = None,
    ) -> None:
        """``behind_lane``: this server listens behind the native lane (``services.gateway.dataplane.lane``),
        which hands over requests with the version it picked; ``stream_window``: requests of one
        ModelStreamInfer stream in flight at once; ``budget``: each key's request budget (behind
        the lane, which spends it for every call it is given, only a stream's requests spend it here)."""
        self._budget = budget if budget else None
        self._stream_window = max(1, stream_window)
        #: every unary method as ``body(request, metadata, timeout)`` (transport-free)
        self._bodies: dict[str, Body] = {
            "ServerLive": self._forwarder("ServerLive", auth=False),
            "ServerReady": self._server_ready,
            "ModelReady": self._model_scoped("ModelReady"),
            "ServerMetadata": self._forwarder("ServerMetadata"),
            "ModelMetadata": self._model_scoped("ModelMetadata"),
            "ModelInfer": self.infer,
            "ModelConfig": self._model_scoped("ModelConfig"),
            "ModelStatistics": self._statistics,
            "RepositoryIndex": self._forwarder("RepositoryIndex"),
        } | {name: self._refuse(name) for name in REFUSED}
        self._trace_sample = trace_sample
        self._behind_lane = behind_lane
        self._table = table
        self._pool = pool
        self._outcomes = outcomes
        self._log = log if log is not None and log.enabled else None
        self._keys = keys
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
        """Method name -> bytes-in, bytes-out handler, for every method in :data:`METHODS` and
        :data:`REFUSED` (for ``server.add_registered_method_handlers(SERVICE, ...)``)."""
        behaviors: dict[str, Behavior] = {name: self._unary(body) for name, body in self._bodies.items()}
        behaviors["ModelInfer"] = self.model_infer
        handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
            name: grpc.unary_unary_rpc_method_handler(b) for name, b in behaviors.items()
        }
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(self.model_stream_infer)
        return handlers

    async def call(
        self, method: str, request: bytes, metadata: Metadata, timeout: float | None = None, from_lane: bool = False
    ) -> bytes:
        """A unary method of the service, whichever transport brought it (REST does): Triton's
        or the gateway's serialized answer, or an exception for
        :func:`~services.gateway.status.failure`. ``from_lane``: a ModelInfer the native lane
        handed over (its hand-over in ``metadata``)."""
        timeout = self._default_timeout if timeout is None else timeout
        if method == "ModelInfer":
            return await self.infer(request, metadata, timeout, from_lane)
        body = self._bodies.get(method)
        if body is None:
            raise UnimplementedError(f"unknown method {method[:64]!r}")
        return await body(request, metadata, timeout)

    def handler(self) -> grpc.GenericRpcHandler:
        """One generic handler for the whole service (``server.add_generic_rpc_handlers((h,))``)."""
        return grpc.method_handlers_generic_handler(SERVICE, self.method_handlers())

    # ------------------------------------------------------------- helpers

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
            return await self.infer(request, context.invocation_metadata() or (), self._timeout(context), True)
        except Exception as exc:  # noqa: BLE001 (failure() logs what the gateway did not expect)
            code, details = failure(exc)
        await context.abort(code, details)

    async def infer(
        self, request: bytes, metadata: Metadata, timeout: float, from_lane: bool = False, streamed: bool = False
    ) -> bytes:
        """One serialized ``ModelInferRequest`` routed, forwarded and reported, whichever transport
        brought it (a unary call, a stream, HTTP): Triton's serialized response, or an exception
        for :func:`failure`. ``metadata`` carries the key (and the native lane's hand-over when
        ``from_lane``); ``timeout`` is what is left of the caller's deadline; ``streamed``: one
        request of a ModelStreamInfer stream (each spends the key's budget)."""
        try:
            self.check_key(metadata, spend=True if streamed else None)
        except UnauthenticatedError:
            self._count("", 0, grpc.StatusCode.UNAUTHENTICATED)
            raise
        except BudgetExceededError:
            self._count("", 0, grpc.StatusCode.RESOURCE_EXHAUSTED)
            raise
        if len(request) > self._max_bytes:
            self._count("", 0, grpc.StatusCode.RESOURCE_EXHAUSTED)
            raise TooLargeError(
                f"request of {len(request)} bytes is larger than the gateway's limit of {self._max_bytes}"
            )
        try:
            name, version, request_id = wire.route_fields(request)
        except InvalidInputError:
            self._count("", 0, grpc.StatusCode.INVALID_ARGUMENT)
            raise
        route = self._table.get(name)
        if route is None:
            self._count("", 0, _NOT_FOUND)
            raise NotFoundError(f"unknown model {name!r}")
        picked = not version
        lane_v, lane_failure = self._lane_meta(metadata) if from_lane and self._behind_lane else (0, None)
        if picked:
            v = lane_v if lane_v in route.versions() else 0
            v = v or self._table.pick(route)
            if not v:
                self._count(name, 0, grpc.StatusCode.UNAVAILABLE)
                raise UnavailableError(f"model {name!r} has no serving version yet")
            suffix = self._version_field(v)
        else:
            try:
                v = _version_of(version, route)
            except NotFoundError:
                self._count(name, 0, _NOT_FOUND)
                raise
            suffix = b"" if version == str(v) else self._version_field(v)
        if not request_id:
            request_id = self._id_prefix + str(next(self._ids))
            suffix += wire.id_field(request_id)
        data = request + suffix if suffix else request

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

    def _lane_meta(self, metadata: Metadata) -> tuple[int, tuple[grpc.aio.AioRpcError, float] | None]:
        """What the native lane handed a request over with (the lane drops these keys from what
        clients send): the version it picked (``x-cdl-lane-version``; 0 for none), and Triton's
        failure of its forward (``x-cdl-lane-code``, ``-details-bin``, ``-latency-us``), as the
        error the pool would have raised and the seconds it took; None when it did not fail."""
        picked, code, details, latency_us = 0, None, b"", 0
        for key, value in metadata:
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
        """A ModelInfer the native lane served (``services.gateway.dataplane.lane``), reported as the hot path
        reports its own: outcomes, metrics, and the log (``request`` empty: not sampled)."""
        status = _CODES.get(code, grpc.StatusCode.UNKNOWN)
        if status is _OK:
            self._served_ok(model, version, latency_s)
        else:
            self._outcomes.served(model, version, status not in _SERVER_SIDE, latency_s)
            self._count(model, version, status)
        if self._log is not None and request:
            self._log.put(model, version, request_id, request, response, latency_s, status.name, when)

    def lane_served_http(
        self,
        model: str,
        version: int,
        latency_s: float,
        when: float,
        request_id: str,
        request: bytes,
        response: bytes,
        request_json_length: int,
        response_json_length: int,
    ) -> None:
        """An infer request the native lane served on its REST port: counted as one served over
        gRPC, and logged in the same protobuf form (the bodies are read back in the log's thread;
        ``request`` empty: not sampled)."""
        self._served_ok(model, version, latency_s)
        if self._log is None or not request:
            return
        bodies = HttpExchange(request, response, request_json_length or None, response_json_length or None)
        self._log.put(model, version, request_id, bodies, b"", latency_s, "OK", when)

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
                raise InvalidInputError(f"{fault} (Triton: {exc.details()})")
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

    async def _server_ready(self, request: bytes, metadata: Metadata, timeout: float) -> bytes:
        """Ready when at least one Triton server is (see the module docstring)."""
        return _READY if self._pool.ready_count() else _NOT_READY

    def check_key(self, metadata: Metadata, spend: bool | None = None) -> None:
        """UNAUTHENTICATED unless ``metadata`` carries an allowed key (or keys are off); then one
        request of the key's budget spent (RESOURCE_EXHAUSTED when it is over): by default where
        no native lane spent it already, always with ``spend``, never with ``spend=False``."""
        if not self._keys.open and not self._keys.check(metadata):
            raise UnauthenticatedError(_NO_KEY)
        if self._budget is not None and (not self._behind_lane if spend is None else spend):
            self._budget.take(metadata)

    def _unary(self, body: Body) -> Behavior:
        """A unary method: ``body(request, metadata, timeout)``, its failures statuses by :func:`failure`."""

        async def behavior(request: bytes, context: Context) -> bytes:
            try:
                return await body(request, context.invocation_metadata() or (), self._timeout(context))
            except Exception as exc:  # noqa: BLE001 (failure() logs what the gateway did not expect)
                code, details = failure(exc)
            await context.abort(code, details)

        return behavior

    def _forwarder(self, method: str, auth: bool = True) -> Body:
        path = f"/{SERVICE}/{method}"

        async def forward(request: bytes, metadata: Metadata, timeout: float) -> bytes:
            if auth:
                self.check_key(metadata)
            return await self._pool.call(path, request, timeout)

        return forward

    def _model_scoped(self, method: str) -> Body:
        """ModelReady / ModelMetadata / ModelConfig: the version resolved against the route."""
        path = f"/{SERVICE}/{method}"
        ready = method == "ModelReady"

        async def forward(request: bytes, metadata: Metadata, timeout: float) -> bytes:
            self.check_key(metadata)
            name, version = wire.name_version(request)
            route = self._table.get(name)
            if route is None or not route.versions():
                if ready:
                    return _NOT_READY
                raise NotFoundError(f"unknown model {name!r}")
            if version:
                try:
                    _version_of(version, route)
                except NotFoundError:
                    if ready:
                        return _NOT_READY
                    raise
                data = request
            else:
                data = request + self._version_field(route.stable or route.versions()[0])
            return await self._pool.call(path, data, timeout, retry=_RETRY)

        return forward

    async def _statistics(self, request: bytes, metadata: Metadata, timeout: float) -> bytes:
        """ModelStatistics of the served versions, summed over the Triton servers
        (:mod:`services.gateway.dataplane.statistics`); a model or version not served is NOT_FOUND."""
        self.check_key(metadata)
        name, version = statistics.parse_request(request)
        routes = self._table.all()
        if name:
            route = routes.get(name)
            if route is None or not route.versions():
                raise NotFoundError(f"unknown model {name!r}")
            if version:
                _version_of(version, route)
            routes = {name: route}
        served = {m: {str(v) for v in r.versions() if not version or str(v) == version} for m, r in routes.items()}
        if not any(served.values()):
            return b""
        answers = await self._pool.call_each(_STATISTICS, request, timeout)
        return statistics.merge(answers, served)

    def _refuse(self, method: str) -> Body:
        """A method that must not pass through: the gateway owns Triton's repository, memory,
        tracing and logging (PERMISSION_DENIED after the key check; never forwarded)."""

        async def refuse(request: bytes, metadata: Metadata, timeout: float) -> bytes:
            self.check_key(metadata)
            raise PermissionDeniedError(
                f"{method} is not available through the gateway: it owns the Triton servers' "
                "model repository, shared memory, tracing and logging (cdl's rollout loads and unloads models)"
            )

        return refuse

    # ------------------------------------------------------------- ModelStreamInfer

    async def model_stream_infer(self, requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        """ModelStreamInfer: each request in the stream routed, forwarded and reported as a unary
        ModelInfer (at the table's state when it arrives, so a stream outlives a rollout), up to
        ``stream_window`` of them in flight; answers in the order of the requests, a failed
        request as the response's ``error_message`` (the stream goes on). A stream without a
        valid key is refused as a whole (UNAUTHENTICATED)."""
        metadata = tuple(context.invocation_metadata() or ())
        try:
            self.check_key(metadata, spend=False)  # each of its requests spends the budget
        except UnauthenticatedError as exc:
            await context.abort(*failure(exc))
        pending: asyncio.Queue[asyncio.Task[bytes] | None] = asyncio.Queue(maxsize=self._stream_window)

        async def read() -> None:
            try:
                async for request in requests:
                    task = asyncio.create_task(self._stream_one(request, metadata, context))
                    try:
                        await pending.put(task)
                    except asyncio.CancelledError:  # the stream ended: this one is not answered
                        task.cancel()
                        raise
            finally:
                await pending.put(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await pending.get()) is not None:
                yield await task
            await reader  # the client's half-close, or its error
        finally:
            reader.cancel()
            while not pending.empty():
                left = pending.get_nowait()
                if left is not None:
                    left.cancel()

    async def _stream_one(self, request: bytes, metadata: Metadata, context: Context) -> bytes:
        try:
            return wire.stream_response(await self.infer(request, metadata, self._timeout(context), streamed=True))
        except Exception as exc:  # noqa: BLE001 (failure() logs what the gateway did not expect)
            try:
                request_id = wire.route_fields(request)[2]
            except InvalidInputError:
                request_id = ""
            return wire.stream_error(failure(exc)[1], request_id)
