"""API keys for cdl's gRPC APIs (gateway inference and admin, ingest).

Callers send ``authorization: Bearer <key>`` metadata. Settings hold only the
SHA-256 hex digests of the keys they accept, never the keys. A key once
verified is remembered (a small bounded dict from key to verdict), so the
digest is not computed per request. An empty list of digests means the API
is open (the default outside the local stack, which generates a key).

:class:`AuthInterceptor` is the sync gRPC server interceptor (ingest); the
gateway's asyncio hot path calls :meth:`ApiKeys.allowed` itself.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

__all__ = ["ApiKeys", "AuthInterceptor", "bearer", "hash_key"]

_CACHE_MAX = 1024


def hash_key(key: str) -> str:
    """The digest settings store for ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The key of an ``authorization: Bearer <key>`` entry, or None."""
    for name, value in metadata or ():
        if name == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, key = text.partition(" ")
            return key.strip() if scheme.lower() == "bearer" and key.strip() else None
    return None


class ApiKeys:
    """The keys an API accepts (as digests), and a separate set for admin calls."""

    def __init__(self, hashes: Sequence[str], admin_hashes: Sequence[str] = ()) -> None:
        self._hashes = tuple(h.lower() for h in hashes)
        self._admin = tuple(h.lower() for h in admin_hashes) or self._hashes
        self._verified: dict[tuple[str, bool], bool] = {}

    @property
    def open(self) -> bool:
        """No key is required."""
        return not self._hashes

    def allowed(self, key: str | None, admin: bool = False) -> bool:
        """Whether ``key`` may call (an admin method when ``admin``)."""
        wanted = self._admin if admin else self._hashes
        if not wanted:
            return True
        if not key:
            return False
        known = self._verified.get((key, admin))
        if known is not None:
            return known
        digest = hash_key(key)
        ok = any(hmac.compare_digest(digest, h) for h in wanted)
        if len(self._verified) >= _CACHE_MAX:
            self._verified.clear()
        self._verified[(key, admin)] = ok
        return ok

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None, admin: bool = False) -> bool:
        return self.allowed(bearer(metadata), admin)


Handler = Any  # grpc.RpcMethodHandler


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without an accepted key with UNAUTHENTICATED (sync servers).

    ``exempt`` names full methods anyone may call (the health service).
    """

    def __init__(self, keys: ApiKeys, exempt: Iterable[str] = ("/grpc.health.v1.Health/Check",)) -> None:
        self._keys = keys
        self._exempt = frozenset(exempt)
        self._deny: dict[tuple[bool, bool], Handler] = {
            (False, False): grpc.unary_unary_rpc_method_handler(_deny),
            (True, False): grpc.stream_unary_rpc_method_handler(_deny),
            (False, True): grpc.unary_stream_rpc_method_handler(_deny),
            (True, True): grpc.stream_stream_rpc_method_handler(_deny),
        }

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        if self._keys.open or handler_call_details.method in self._exempt:
            return continuation(handler_call_details)
        if self._keys.check(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self._deny[(bool(handler.request_streaming), bool(handler.response_streaming))]


def _deny(request: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key (authorization: Bearer <key>)")
