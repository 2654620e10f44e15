"""The gateway's REST/HTTP v2 endpoint (the Open Inference Protocol's HTTP binding, as
KServe and Triton serve it), on its own port (``http_port``), with aiohttp.

Each call is translated (:mod:`services.gateway.dataplane.http_codec`) into the gRPC method the
gRPC endpoint serves and answered by the same :class:`~services.gateway.dataplane.server.InferenceService`
body, so the same API keys (``Authorization: Bearer <key>``), routing, canary and shadow
split, inference log and rollback accounting apply; errors are the protocol's JSON error
body ``{"error": "..."}`` with the HTTP status of the gRPC code
(:func:`~services.gateway.status.http_failure`).

===========================================================  ==========================
``GET  /v2/health/live``, ``/v2/health/ready``               ServerLive / ServerReady
``GET  /v2``                                                 ServerMetadata
``GET  /v2/models/{m}[/versions/{v}]``                       ModelMetadata
``GET  /v2/models/{m}[/versions/{v}]/ready``                 ModelReady (200 or 400)
``GET  /v2/models/{m}[/versions/{v}]/config``                ModelConfig
``GET  /v2/models[/{m}[/versions/{v}]]/stats``               ModelStatistics
``POST /v2/models/{m}[/versions/{v}]/infer``                 ModelInfer (JSON or binary)
``POST /v2/repository/index``                                RepositoryIndex
repository load/unload, shared memory, trace, logging        403, never forwarded
===========================================================  ==========================

Health needs no key; everything else does, as on the gRPC endpoint. A body larger than
``max_message_bytes`` is refused (413) before it is read whole.

Behind the native lane (``behind_lane``; :meth:`RestApi.start_unix`) this server listens on a
unix socket and the lane serves the public port: it forwards infer requests on the common
path to Triton's HTTP port itself and hands everything else here, infer requests with its
hand-over headers (the version it picked, Triton's failure), taken as the gRPC server takes
the lane's metadata.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import socket
import ssl
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web
from tritonclient.grpc import service_pb2

from cdl.errors import InvalidInputError, NotFoundError, TooLargeError, UnimplementedError
from cdl.logging import get_logger
from services.gateway.dataplane.http_codec import HEADER_LENGTH, infer_request, infer_response, message_json, parse_json
from services.gateway.dataplane.server import InferenceService, Metadata
from services.gateway.status import http_failure

__all__ = ["RestApi"]

log = get_logger(__name__)

_MODEL = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/[a-z]+)?(?P<more>/.*)?$")
#: refused paths (by prefix), each with the gRPC method it would be: refused as that one is
_REFUSED = {
    "/v2/repository/models/": "RepositoryModelLoad",
    "/v2/systemsharedmemory": "SystemSharedMemoryRegister",
    "/v2/cudasharedmemory": "CudaSharedMemoryRegister",
    "/v2/trace": "TraceSetting",
    "/v2/logging": "LogSettings",
}
T = TypeVar("T")
_JSON = "application/json"
#: bodies larger than this are translated in a worker thread, not on the event loop
_INLINE_BYTES = 64 << 10


def _flag(body: bytes, key: str) -> bool:
    """A boolean member of a JSON object body (false when the body is empty)."""
    if not body.strip():
        return False
    doc = parse_json(body)
    return isinstance(doc, dict) and doc.get(key) is True


async def _translate(size: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, in a worker thread when it translates more than ``_INLINE_BYTES``: a large
    body is not parsed on the event loop (the gRPC server's too)."""
    if size > _INLINE_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


#: the native lane's hand-over headers, named as the gRPC metadata keys the service reads (its
#: details come base64-encoded in ``x-cdl-lane-details``, for the key ``x-cdl-lane-details-bin``)
_LANE_HEADERS = ("x-cdl-lane-version", "x-cdl-lane-code", "x-cdl-lane-latency-us")


def _lane_metadata(request: web.Request) -> list[tuple[str, str | bytes]]:
    """What the native lane handed an infer request over with (it drops these headers from what
    clients send; only the lane reaches this server then)."""
    out: list[tuple[str, str | bytes]] = [
        (key, request.headers[key]) for key in _LANE_HEADERS if key in request.headers
    ]
    details = request.headers.get("x-cdl-lane-details")
    if details is not None:
        try:
            out.append(("x-cdl-lane-details-bin", base64.b64decode(details, validate=True)))
        except (binascii.Error, ValueError):
            out.append(("x-cdl-lane-details-bin", details.encode()))
    return out


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(doc, separators=(",", ":")).encode(), status=status, content_type=_JSON)


class RestApi:
    """The aiohttp application; see the module docstring."""

    def __init__(self, service: InferenceService, max_message_bytes: int, behind_lane: bool = False) -> None:
        self._service = service
        self._max_bytes = max_message_bytes
        self._behind_lane = behind_lane
        self.app = web.Application(client_max_size=max_message_bytes)
        self.app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on ``host:port`` (0: any free port), over TLS with ``ssl_context``; returns the port."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=ssl_context).start()
        self.port = int(sock.getsockname()[1])
        return self.port

    async def start_unix(self, path: str) -> None:
        """Listen on the unix socket ``path`` (behind the native lane, which serves the public port)."""
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.UnixSite(self._runner, path).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------- dispatch

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        metadata: list[tuple[str, str | bytes]] = [
            ("authorization", v) for v in request.headers.getall("Authorization", [])
        ]
        if self._behind_lane:
            metadata += _lane_metadata(request)
        try:
            return await self._route(request, metadata)
        except web.HTTPRequestEntityTooLarge:
            status, message = http_failure(
                TooLargeError(f"request body larger than the gateway's limit of {self._max_bytes} bytes")
            )
        except Exception as exc:  # noqa: BLE001 (http_failure() logs what the gateway did not expect)
            status, message = http_failure(exc)
        return _json({"error": message}, status)

    async def _route(self, request: web.Request, metadata: Metadata) -> web.StreamResponse:
        path, method = request.path, request.method
        call = self._service.call
        if path.startswith("/v2/health/"):
            return await self._health(path)
        self._service.check_key(metadata, spend=False)  # before a body is read (the call spends the budget)
        if path == "/v2" and method == "GET":
            answer = await call("ServerMetadata", b"", metadata)
            return _json(message_json(service_pb2.ServerMetadataResponse.FromString(answer)))
        if path == "/v2/repository/index" and method == "POST":
            req = service_pb2.RepositoryIndexRequest(ready=_flag(await request.read(), "ready"))
            answer = await call("RepositoryIndex", req.SerializeToString(), metadata)
            return _json([message_json(m) for m in service_pb2.RepositoryIndexResponse.FromString(answer).models])
        for prefix, refused in _REFUSED.items():
            if path.startswith(prefix):
                await call(refused, b"", metadata)  # the key check, then PERMISSION_DENIED
        if path == "/v2/models/stats" and method == "GET":
            return await self._stats("", "", metadata)
        found = _MODEL.match(path)
        if found is None:
            raise NotFoundError(f"no such endpoint: {method} {path[:200]}")
        model, version, rest = found["model"], found["version"] or "", found["rest"] or ""
        if rest == "/trace":  # a model's trace settings: refused as the server's are
            await call("TraceSetting", b"", metadata)
        if found["more"]:
            raise NotFoundError(f"no such endpoint: {method} {path[:200]}")
        if rest == "/infer" and method == "POST":
            return await self._infer(request, model, version, metadata)
        if method != "GET":
            raise UnimplementedError(f"{method} {path[:200]} is not served")
        return await self._model_get(model, version, rest, metadata)

    async def _health(self, path: str) -> web.Response:
        if path == "/v2/health/live":
            await self._service.call("ServerLive", b"", ())
            return web.Response(status=200)
        if path == "/v2/health/ready":
            ready = await self._service.call("ServerReady", b"", ())
            return web.Response(status=200 if ready else 503)
        raise NotFoundError(f"no such endpoint: {path[:200]}")

    async def _model_get(self, model: str, version: str, rest: str, metadata: Metadata) -> web.Response:
        call = self._service.call
        if rest == "":
            req = service_pb2.ModelMetadataRequest(name=model, version=version).SerializeToString()
            answer = await call("ModelMetadata", req, metadata)
            return _json(message_json(service_pb2.ModelMetadataResponse.FromString(answer)))
        if rest == "/ready":
            req = service_pb2.ModelReadyRequest(name=model, version=version).SerializeToString()
            if service_pb2.ModelReadyResponse.FromString(await call("ModelReady", req, metadata)).ready:
                return web.Response(status=200)
            return _json({"error": f"model {model!r} is not ready"}, 400)
        if rest == "/config":
            req = service_pb2.ModelConfigRequest(name=model, version=version).SerializeToString()
            answer = await call("ModelConfig", req, metadata)
            return _json(message_json(service_pb2.ModelConfigResponse.FromString(answer).config))
        if rest == "/stats":
            return await self._stats(model, version, metadata)
        raise NotFoundError(f"no such endpoint: GET /v2/models/{model[:100]}{rest}")

    async def _stats(self, model: str, version: str, metadata: Metadata) -> web.Response:
        req = service_pb2.ModelStatisticsRequest(name=model, version=version).SerializeToString()
        stats = service_pb2.ModelStatisticsResponse.FromString(
            await self._service.call("ModelStatistics", req, metadata)
        )
        return _json({"model_stats": [message_json(s) for s in stats.model_stats]})

    async def _infer(self, request: web.Request, model: str, version: str, metadata: Metadata) -> web.StreamResponse:
        length_header = request.headers.get(HEADER_LENGTH)
        try:
            header_length = int(length_header) if length_header is not None else None
        except ValueError:
            raise InvalidInputError(f"{HEADER_LENGTH} must be an integer") from None
        raw = await request.read()
        body = await _translate(len(raw), infer_request, model, version, raw, header_length)
        response = await self._service.call("ModelInfer", body.request, metadata, from_lane=self._behind_lane)
        data, json_length = await _translate(len(response), infer_response, response, body)
        if json_length is None:
            return web.Response(body=data, content_type=_JSON)
        return web.Response(
            body=data, content_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)}
        )
