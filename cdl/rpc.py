"""gRPC transport helpers: the error interceptor and health service.

The interceptor is the one place where cdl's error hierarchy becomes gRPC
status codes, for all four kinds of rpc (unary and streaming, on either side):

- a servicer's own ``context.abort(code, details)`` (or ``abort_with_status``)
  reaches the caller unchanged;
- a raised :class:`~cdl.errors.CdlError` subclass reaches the caller as its
  :attr:`~cdl.errors.CdlError.grpc_code` with the error's message as details;
- anything else is logged with its traceback and reaches the caller as
  ``INTERNAL`` with a generic message naming only the exception's class.

For server-streaming rpcs the mapping also covers errors raised while the
response stream is being produced, after some messages have been sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cdl.errors import CdlError
from cdl.logging import get_logger

__all__ = ["ErrorInterceptor", "add_health", "add_port", "status_code"]

log = get_logger(__name__)

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Behavior: TypeAlias = Callable[[Any, Any], Any]


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status of an exception (INTERNAL for anything unexpected)."""
    if isinstance(exc, CdlError):
        return getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)
    return grpc.StatusCode.INTERNAL


class _Context:
    """The servicer's view of its :class:`grpc.ServicerContext`, noting whether it aborted.

    grpc's synchronous ``abort`` records the status on the call and raises a
    plain ``Exception``, which cannot be told from an application error by its
    type; this proxy remembers that the servicer aborted, so the interceptor
    lets grpc send the servicer's status instead of replacing it. Everything
    else is the real context's.
    """

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context
        self.aborted = False

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        self.aborted = True
        self._context.abort(code, details)

    def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self.aborted = True
        self._context.abort_with_status(status)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _fail(method: str, context: grpc.ServicerContext, view: _Context, exc: Exception) -> None:
    """Set the rpc's status for ``exc`` raised by a servicer (via ``context.abort``, which raises).

    Returns, for the caller to re-raise ``exc``, only where the status is
    already settled: the servicer aborted, or the call is over.
    """
    if view.aborted:
        return  # the servicer's own abort: grpc already holds its status
    if isinstance(exc, CdlError):
        context.abort(status_code(exc), str(exc))
    if isinstance(exc, grpc.RpcError) and not context.is_active():
        return  # the call is over (e.g. the client cancelled its request stream)
    log.exception("unhandled error in rpc", method=method, error=type(exc).__name__)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


def _wrap_unary_response(method: str, behavior: Behavior) -> Behavior:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
        view = _Context(context)
        try:
            return behavior(request, view)
        except Exception as exc:
            _fail(method, context, view, exc)
            raise

    return wrapper


def _wrap_stream_response(method: str, behavior: Behavior) -> Behavior:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        view = _Context(context)
        try:
            yield from behavior(request, view)
        except Exception as exc:
            _fail(method, context, view, exc)
            raise

    return wrapper


def _rewrap(method: str, handler: Handler) -> Handler:
    """The same handler with its behavior wrapped, whichever of the four kinds it is."""
    common: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_wrap_unary_response(method, handler.unary_unary), **common)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_wrap_stream_response(method, handler.unary_stream), **common)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_wrap_unary_response(method, handler.stream_unary), **common)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(_wrap_stream_response(method, handler.stream_stream), **common)
    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps servicer errors to gRPC status codes on every rpc of a (sync) server; see the module doc."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return _rewrap(handler_call_details.method, handler)


def add_port(server: grpc.Server | grpc.aio.Server, address: str, cert_file: str = "", key_file: str = "") -> int:
    """Bind ``server`` to ``address``: TLS with the PEM ``cert_file`` (its chain) and
    ``key_file`` when given, plaintext otherwise; returns the port bound."""
    if not cert_file:
        return server.add_insecure_port(address)
    creds = grpc.ssl_server_credentials([(Path(key_file).read_bytes(), Path(cert_file).read_bytes())])
    return server.add_secure_port(address, creds)


def add_health(server: grpc.Server | grpc.aio.Server, services: Iterable[str]) -> health.HealthServicer:
    """Register the standard gRPC health service, SERVING for ``services`` and the server."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *services]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer
