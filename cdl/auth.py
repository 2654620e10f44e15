"""API keys for cdl's gRPC APIs (gateway inference and admin, ingest).

Callers send ``authorization: Bearer <key>`` metadata. Settings hold only the
keys' SHA-256 hex digests (:func:`hash_key` makes one), never the keys. A
presented key is hashed and compared with every allowed digest in constant
time (:func:`hmac.compare_digest`, no early exit); a key once verified is
remembered in a small dict keyed by the metadata value, so the hot path does
not hash per request. Only verified keys are remembered (so callers cannot
grow it with wrong ones), and at most ``_CACHE_MAX`` distinct values (past
that the cache starts over).

Keys have scopes: an inference key (``api_key_hashes``) serves inference, an admin key
(``admin_key_hashes``) the admin rpcs, and neither is the other -- an inference key never rolls
back a model. An empty list means no check only where no key is set at all: a gateway with
inference keys and no admin key refuses every admin call; one with neither is open (a laptop;
it says so at start).

:class:`AuthInterceptor` guards a sync gRPC server (ingest); the gateway's
asyncio hot path calls :meth:`ApiKeys.check` itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from cdl.errors import BudgetExceededError, ConfigError
from cdl.logging import get_logger

__all__ = ["ApiKeys", "AuthInterceptor", "KeyBudget", "KeysFile", "bearer", "hash_key", "key_id", "read_keys_file"]

_CACHE_MAX = 256
_BUDGETS_MAX = 65536
_log = get_logger("cdl.auth")
_INFER = 1
_ADMIN = 2


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of ``key``, as settings store it."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """Who a call's key says it is, for an audit: ``key:`` and the first 12 hex digits of its
    SHA-256 (what settings hold, so an operator can tell the keys apart; never the key itself),
    or ``anonymous`` without one."""
    key = _token(bearer(metadata) or "")
    return f"key:{hash_key(key)[:12]}" if key else "anonymous"


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The value of the ``authorization`` metadata entry (None when there is none)."""
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


@dataclass(frozen=True)
class _KeySet:
    """One generation of keys: a rotation replaces it whole, the cache of verified values with it."""

    infer: tuple[bytes, ...]
    admin: tuple[bytes, ...]
    verified: dict[str, int] = field(default_factory=dict)


def _digests(hashes: Sequence[str]) -> tuple[bytes, ...]:
    return tuple(h.strip().lower().encode() for h in hashes if h.strip())


class ApiKeys:
    """The keys allowed to call inference and admin rpcs; see the module docstring."""

    def __init__(self, hashes: Sequence[str], admin_hashes: Sequence[str] = ()) -> None:
        self._set = _KeySet(_digests(hashes), _digests(admin_hashes))

    @property
    def open(self) -> bool:
        """No key is needed for inference."""
        return not self._set.infer

    @property
    def inference_digests(self) -> tuple[str, ...]:
        """The inference keys' digests now (what the native lane is given)."""
        return tuple(h.decode() for h in self._set.infer)

    def same(self, hashes: Sequence[str], admin_hashes: Sequence[str] = ()) -> bool:
        """Whether these are the keys now."""
        return (_digests(hashes), _digests(admin_hashes)) == (self._set.infer, self._set.admin)

    def replace(self, hashes: Sequence[str], admin_hashes: Sequence[str] = ()) -> None:
        """Rotate: these keys from now on, the old ones (and what was verified with them) no more.
        A check in flight uses one generation throughout, and caches into that generation only."""
        self._set = _KeySet(_digests(hashes), _digests(admin_hashes))

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None, admin: bool = False) -> bool:
        """Whether ``metadata`` (a call's invocation metadata) carries a key allowed for the call."""
        ks = self._set  # one generation for the whole check (a rotation may replace it meanwhile)
        allowed = ks.admin if admin else ks.infer
        if not allowed:  # admin with no admin key: open only where inference is open too
            return not (admin and ks.infer)
        header = bearer(metadata)
        if header is None:
            return False
        roles = ks.verified.get(header)
        if roles is None:
            roles = _verify(ks, header)
            if not roles:
                return False
            if len(ks.verified) >= _CACHE_MAX:
                ks.verified.clear()
            ks.verified[header] = roles
        return bool(roles & (_ADMIN if admin else _INFER))


def _token(header: str) -> str:
    """The key of an authorization value (``bearer <key>``, any case, spaces around), or ""."""
    scheme, _, key = header.strip().partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" else ""


def _verify(ks: _KeySet, header: str) -> int:
    key = _token(header)
    if not key:
        return 0
    digest = hash_key(key).encode()
    roles = 0
    for h in ks.infer:
        if hmac.compare_digest(digest, h):
            roles |= _INFER
    for h in ks.admin:
        if hmac.compare_digest(digest, h):
            roles |= _ADMIN
    return roles


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


class KeyBudget:
    """A request budget per key: a token bucket of ``rate`` requests a second and ``burst``
    at once for each authorization value (so one client cannot starve the others). ``rate``
    0: no budget. The gateway's native lane keeps the same buckets for what it serves."""

    def __init__(self, rate: float, burst: int = 0) -> None:
        self.rate = max(rate, 0.0)
        self.burst = float(burst if burst > 0 else max(1, math.ceil(self.rate)))
        self._buckets: dict[str, list[float]] = {}  # value -> [tokens, last refill]
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return self.rate > 0

    def take(self, metadata: Iterable[tuple[str, str | bytes]] | None, now: float | None = None) -> None:
        """Spend one request of the key in ``metadata``; :class:`BudgetExceededError` when its
        budget is spent (a call without a key is left to the key check)."""
        if not self.rate:
            return
        key = _token(bearer(metadata) or "")
        if not key:
            return
        digest = hash_key(key)  # the key, however its header is spelled ("Bearer", "bearer  ")
        t = time.monotonic() if now is None else now
        with self._lock:
            bucket = self._buckets.get(digest)
            if bucket is None:
                if len(self._buckets) >= _BUDGETS_MAX:  # only valid keys come here: never in practice
                    self._buckets = {}
                bucket = self._buckets[digest] = [self.burst, t]
            bucket[0] = min(self.burst, bucket[0] + (t - bucket[1]) * self.rate)
            bucket[1] = t
            if bucket[0] < 1.0:
                raise BudgetExceededError(
                    f"this key is over its request budget ({self.rate:g}/s, bursts of {self.burst:g}); try again later"
                )
            bucket[0] -= 1.0


_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def read_keys_file(path: str | Path) -> tuple[list[str], list[str]]:
    """The (inference, admin) key digests of a keys file: JSON ``{"inference": [...], "admin":
    [...]}``, each a SHA-256 hex digest (``cdl.auth.hash_key``); :class:`ConfigError` when it
    cannot be read or is not that, or names no inference key."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the keys file {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"the keys file {path} is not a JSON object")
    lists = []
    for kind in ("inference", "admin"):
        value = doc.get(kind, [])
        digests = isinstance(value, list) and all(
            isinstance(h, str) and _DIGEST.match(h.strip().lower()) for h in value
        )
        if not digests:
            raise ConfigError(f"the keys file {path}: {kind!r} must be a list of SHA-256 hex digests")
        lists.append([h.strip().lower() for h in value])
    if not lists[0]:
        raise ConfigError(f"the keys file {path} names no inference key")
    return lists[0], lists[1]


class KeysFile:
    """API keys an operator rotates by rewriting a file (:func:`read_keys_file`): :meth:`poll`
    (every ``interval_s`` in :meth:`watch`'s thread) replaces the keys of ``keys`` when the file
    changed, then calls ``on_change``; a file that went bad keeps the keys as they were (an
    error in the log), so a typo never opens the service or locks everyone out."""

    def __init__(
        self, path: str | Path, keys: ApiKeys, on_change: Callable[[], None] | None = None, admin: bool = True
    ) -> None:
        self._path = Path(path)
        self._keys = keys
        self._on_change = on_change
        self._admin = admin
        self._seen: bytes | None = None  # the first poll applies the file (a change since the start)

    def poll(self) -> bool:
        """Apply the file if it changed since the last look; whether the keys were replaced."""
        try:
            raw = self._path.read_bytes()
        except OSError as exc:
            _log.error("the keys file cannot be read: the keys stay as they were", path=str(self._path), error=str(exc))
            return False
        if raw == self._seen:
            return False
        self._seen = raw
        try:
            infer, admin = read_keys_file(self._path)
        except ConfigError as exc:
            _log.error("the keys file is not valid: the keys stay as they were", error=str(exc))
            return False
        admin = admin if self._admin else []
        if self._keys.same(infer, admin):
            return False
        self._keys.replace(infer, admin)
        _log.info("API keys rotated", path=str(self._path), inference=len(infer), admin=len(admin))
        if self._on_change is not None:
            self._on_change()
        return True

    def watch(self, stop: threading.Event, interval_s: float = 5.0) -> threading.Thread:
        """:meth:`poll` every ``interval_s`` in a daemon thread until ``stop`` is set."""

        def run() -> None:
            while not stop.wait(interval_s):
                try:
                    self.poll()
                except Exception:  # noqa: BLE001 - the watch must never stop
                    _log.exception("watching the keys file failed")

        thread = threading.Thread(target=run, name="cdl-keys-file", daemon=True)
        thread.start()
        return thread
