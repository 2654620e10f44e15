"""gRPC transport helpers: the error interceptor and health service.

The interceptor is the one place where cdl's error hierarchy becomes gRPC
status codes: a servicer raises :class:`~cdl.errors.CdlError` subclasses and
the caller sees the matching code with the error's message as details.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cdl.errors import CdlError
from cdl.logging import get_logger

__all__ = ["AsyncErrorInterceptor", "ErrorInterceptor", "add_health", "status_code"]

log = get_logger(__name__)


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status of an exception (INTERNAL for anything unexpected)."""
    if isinstance(exc, CdlError):
        return getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)
    return grpc.StatusCode.INTERNAL


def _wrap_sync(behavior: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except CdlError as exc:
            context.abort(status_code(exc), str(exc))
        except Exception as exc:
            if isinstance(exc, grpc.RpcError):  # already aborted
                raise
            log.exception("unhandled error in rpc")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    return wrapper


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def _rewrap(handler: Handler, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Handler:
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps :class:`CdlError` to status codes for unary and client-streaming rpcs (sync server)."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return _rewrap(handler, _wrap_sync)


def _wrap_async(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except CdlError as exc:
            await context.abort(status_code(exc), str(exc))
        except Exception as exc:
            if isinstance(exc, grpc.RpcError) or type(exc).__name__ == "AbortError":
                raise
            log.exception("unhandled error in rpc")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    return wrapper


class AsyncErrorInterceptor(grpc.aio.ServerInterceptor):
    """The same mapping for ``grpc.aio`` servers."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _rewrap(handler, _wrap_async)


def add_health(server: grpc.Server | grpc.aio.Server, services: Iterable[str]) -> health.HealthServicer:
    """Register the standard gRPC health service, SERVING for ``services`` and the server."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *services]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer
