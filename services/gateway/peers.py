"""Several gateway processes on one port: process 0 drives the rollouts, the others follow it.

With ``processes`` > 1 the gateway that was started (the *driver*) binds its
port with SO_REUSEPORT and starts ``processes - 1`` *followers* on the same
port (``multiprocessing``, spawned); the kernel spreads client connections
over the processes, so a many-core machine is used. Only the driver consumes
``model.compressed``, loads versions on Triton, ticks the rollouts and writes
``rollout.json``. Each follower, over a pipe to the driver:

- routes exactly as the driver's *saved* rollout documents say
  (:meth:`RolloutManager.follow`): the driver sends each document down every
  follower's pipe right after saving it, and a new follower first gets all of
  them. A follower therefore never routes more than is saved, and a rollback
  reaches it as soon as it is saved;
- reports what it served (version, ok, latency, shadow agreement) every 50 ms
  (:class:`DriverLink` is its :class:`~services.gateway.routing.Outcomes`);
  the driver counts them as its own, so rollout decisions see every process's
  traffic. At most ``max_pending`` outcomes wait; beyond that they are dropped
  and counted (``cdl_gateway_peer_outcomes_dropped_total``);
- forwards ``ModelAdmin`` calls to the driver: whichever process a client
  reaches, the answer (and the change) is the driver's;
- serves inference itself, logs its own requests to ``inference.logged``,
  health-checks the Triton servers and exposes its own metrics port.

A follower exits when its pipe closes (the driver died; whatever restarts
the driver starts new followers). The driver starts a follower again when one
dies (after a second). Transport-free: messages are tuples over
``multiprocessing`` connections (pickled), no grpc or Kafka here.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from prometheus_client import Counter

from cdl import errors
from cdl.errors import CdlError, UnavailableError
from cdl.logging import get_logger
from services.gateway.routing import Outcomes

__all__ = ["DriverLink", "Followers"]

log = get_logger(__name__)

DROPPED = Counter(
    "cdl_gateway_peer_outcomes_dropped_total", "Outcomes a follower could not report to the driver (queue full)"
)

#: one served request: (shadow?, model, version, ok, latency_s, agrees)
_Outcome = tuple[bool, str, int, bool, float, bool | None]
#: (method, request bytes) -> response bytes; raises CdlError
AdminCall = Callable[[str, bytes], bytes]
#: what a spawned follower runs: (its end of the pipe, its index from 1, settings overrides)
FollowerMain = Callable[[Connection, int, dict[str, Any]], None]

FLUSH_S = 0.05
RESTART_S = 1.0


def _error(kind: str, message: str) -> CdlError:
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, CdlError):
        return cls(message)
    return CdlError(message)


# --------------------------------------------------------------------------- follower side


class DriverLink:
    """A follower's end of the pipe: outcomes up, admin calls up and their replies down,
    rollout documents down (to ``on_docs``); ``on_lost`` when the driver is gone."""

    def __init__(
        self,
        conn: Connection,
        on_docs: Callable[[Mapping[str, Mapping[str, Any]]], None],
        on_lost: Callable[[], None],
        max_pending: int = 100_000,
    ) -> None:
        self._conn = conn
        self._on_docs = on_docs
        self._on_lost = on_lost
        self._max = max_pending
        self._outcomes: deque[_Outcome] = deque()
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._replies: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._closed = threading.Event()
        self.first_docs = threading.Event()
        self._threads = [
            threading.Thread(target=self._receive, name="cdl-gateway-peer-recv", daemon=True),
            threading.Thread(target=self._flush, name="cdl-gateway-peer-send", daemon=True),
        ]

    def start(self) -> DriverLink:
        for t in self._threads:
            t.start()
        return self

    # Outcomes (hot path: an append)
    def served(self, model: str, version: int, ok: bool, latency_s: float) -> None:
        if len(self._outcomes) >= self._max:
            DROPPED.inc()
            return
        self._outcomes.append((False, model, version, ok, latency_s, None))

    def shadowed(self, model: str, version: int, ok: bool, latency_s: float, agrees: bool | None) -> None:
        if len(self._outcomes) >= self._max:
            DROPPED.inc()
            return
        self._outcomes.append((True, model, version, ok, latency_s, agrees))

    def call(self, method: str, request: bytes, timeout_s: float = 30.0) -> bytes:
        """An admin call carried out by the driver; its CdlError is raised here."""
        call_id = next(self._ids)
        done, slot = threading.Event(), list[Any]()
        self._replies[call_id] = (done, slot)
        try:
            self._send(("call", call_id, method, request))
            if not done.wait(timeout_s):
                raise UnavailableError("the driving gateway process did not answer", method=method)
        finally:
            self._replies.pop(call_id, None)
        response, error = slot
        if error is not None:
            raise _error(*error)
        assert isinstance(response, bytes)
        return response

    def close(self) -> None:
        self._closed.set()
        self._conn.close()

    def _send(self, msg: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError) as exc:
            raise UnavailableError("the driving gateway process is gone", error=str(exc)) from exc

    def _flush(self) -> None:
        while not self._closed.wait(FLUSH_S):
            n = len(self._outcomes)
            if not n:
                continue
            batch = [self._outcomes.popleft() for _ in range(n)]
            try:
                self._send(("out", batch))
            except UnavailableError:
                return

    def _receive(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "docs":
                    self._on_docs(msg[1])
                    self.first_docs.set()
                elif msg[0] == "reply":
                    _, call_id, response, error = msg
                    waiting = self._replies.get(call_id)
                    if waiting is not None:
                        waiting[1].extend((response, error))
                        waiting[0].set()
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("message from the driving gateway process not understood")
        if not self._closed.is_set():
            log.warning("the driving gateway process is gone; this follower stops")
            self._on_lost()


# --------------------------------------------------------------------------- driver side


#: messages a follower may have waiting before it counts as stuck and is restarted
MAX_OUTBOX = 10_000


@dataclass
class _Follower:
    index: int
    conn: Connection | None = None
    process: Any = None
    started: float = 0.0
    restarts: int = 0
    thread: threading.Thread | None = field(default=None, repr=False)
    outbox: queue.Queue[tuple[Any, ...] | None] | None = field(default=None, repr=False)


class Followers:
    """The driver's side: starts the followers, keeps them running, counts their outcomes
    (``outcomes``), carries out their admin calls (``admin``), and hands every saved rollout
    document to all of them (:meth:`publish`).

    Nothing is sent on a follower's pipe by the caller's thread: each follower has an outbox
    and one sender thread (a follower that stops reading blocks only that thread; one with
    ``MAX_OUTBOX`` messages waiting is restarted), so a rollout tick never waits on a pipe.
    """

    def __init__(
        self,
        count: int,
        main: FollowerMain,
        overrides: dict[str, Any],
        outcomes: Outcomes,
        admin: AdminCall,
        docs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self._main = main
        self.overrides = overrides
        self._outcomes = outcomes
        self._admin = admin
        self._docs: dict[str, Mapping[str, Any]] = dict(docs or {})
        self._lock = threading.Lock()  # _docs and the outboxes: one order of documents for all
        self._ctx = multiprocessing.get_context("spawn")
        self._followers = [_Follower(i) for i in range(1, count + 1)]
        self._stopping = threading.Event()
        self._calls = itertools.count(1)
        self.calls = 0
        """Admin calls carried out for followers."""

    def start(self) -> None:
        for f in self._followers:
            f.thread = threading.Thread(target=self._supervise, args=(f,), name=f"cdl-gateway-f{f.index}", daemon=True)
            f.thread.start()

    def alive(self) -> int:
        return sum(1 for f in self._followers if f.process is not None and f.process.is_alive())

    def pids(self) -> list[int]:
        return [int(f.process.pid) for f in self._followers if f.process is not None and f.process.is_alive()]

    def seed(self, docs: Mapping[str, Mapping[str, Any]]) -> None:
        """Documents saved before this process started (a follower gets them first)."""
        with self._lock:
            for model, doc in docs.items():
                self._docs.setdefault(model, doc)

    def document(self, model: str) -> Mapping[str, Any] | None:
        """The newest document of ``model`` the followers have (or will get first)."""
        with self._lock:
            return self._docs.get(model)

    def publish(self, model: str, doc: Mapping[str, Any]) -> None:
        """A rollout document: every follower routes by it from now on."""
        with self._lock:
            self._docs[model] = doc
            for f in self._followers:
                self._post(f, ("docs", {model: doc}))

    def _post(self, f: _Follower, msg: tuple[Any, ...]) -> None:
        box = f.outbox
        if box is None:
            return
        if box.qsize() >= MAX_OUTBOX:
            log.error("gateway follower not reading its pipe; restarting it", follower=f.index)
            f.outbox = None
            if f.process is not None and f.process.is_alive():
                f.process.kill()
            return
        box.put(msg)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        for f in self._followers:
            with contextlib.suppress(ValueError, AttributeError, OSError):  # not started yet
                if f.process is not None and f.process.is_alive():
                    f.process.terminate()  # SIGTERM: it drains like any gateway
        deadline = time.monotonic() + timeout_s
        for f in self._followers:
            with contextlib.suppress(ValueError, AttributeError, OSError, AssertionError):
                if f.process is not None:
                    f.process.join(max(0.1, deadline - time.monotonic()))
                    if f.process.is_alive():
                        f.process.kill()
            if f.thread is not None:
                f.thread.join(1)

    def _supervise(self, f: _Follower) -> None:
        while not self._stopping.is_set():
            try:
                self._run_one(f)
            except Exception:
                log.exception("gateway follower could not be run", follower=f.index)
            if self._stopping.is_set():
                return
            f.restarts += 1
            exitcode = f.process.exitcode if f.process is not None else None
            log.warning("gateway follower stopped; starting it again", follower=f.index, exitcode=exitcode)
            self._stopping.wait(RESTART_S)

    def _run_one(self, f: _Follower) -> None:
        mine, theirs = self._ctx.Pipe(duplex=True)
        try:
            f.process = self._ctx.Process(
                target=self._main, args=(theirs, f.index, self.overrides), name=f"cdl-gateway-{f.index}", daemon=True
            )
            f.process.start()
        finally:
            theirs.close()
        f.started = time.monotonic()
        box: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        sender = threading.Thread(target=self._send_all, args=(mine, box), name=f"cdl-gateway-f{f.index}-send")
        sender.daemon = True
        with self._lock:  # every document so far first, then each one as published
            box.put(("docs", dict(self._docs)))
            f.outbox, f.conn = box, mine
        sender.start()
        log.info("gateway follower started", follower=f.index, pid=f.process.pid)
        try:
            self._serve(f, mine, box)
        finally:
            with self._lock:
                f.outbox, f.conn = None, None
            box.put(None)
            sender.join(5)
            mine.close()
            f.process.join(5)
            if f.process.is_alive():
                f.process.kill()
                f.process.join(5)

    @staticmethod
    def _send_all(conn: Connection, box: queue.Queue[tuple[Any, ...] | None]) -> None:
        while (msg := box.get()) is not None:
            try:
                conn.send(msg)
            except (OSError, ValueError):
                return  # the follower is gone; its supervisor starts it again

    def _serve(self, f: _Follower, conn: Connection, box: queue.Queue[tuple[Any, ...] | None]) -> None:
        outcomes = self._outcomes
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            try:
                if msg[0] == "out":
                    for shadow, model, version, ok, latency, agrees in msg[1]:
                        if shadow:
                            outcomes.shadowed(model, version, ok, latency, agrees)
                        else:
                            outcomes.served(model, version, ok, latency)
                elif msg[0] == "call":
                    _, call_id, method, request = msg
                    self.calls = next(self._calls)
                    try:
                        reply: tuple[Any, ...] = ("reply", call_id, self._admin(method, request), None)
                    except CdlError as exc:
                        reply = ("reply", call_id, None, (type(exc).__name__, str(exc)))
                    except Exception as exc:  # an answer, whatever happened: the follower is waiting
                        log.exception("admin call for a gateway follower failed", method=method)
                        reply = ("reply", call_id, None, ("CdlError", f"{type(exc).__name__}: {exc}"))
                    box.put(reply)
            except Exception:
                log.exception("message from a gateway follower not handled", follower=f.index)
