"""The driver/follower pipe of a multi-process gateway (services.gateway.peers), with real
spawned processes standing in for followers (no servers)."""

from __future__ import annotations

import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import pytest

from cdl.errors import NotFoundError
from services.gateway.peers import DriverLink, Followers


class _Counts:
    def __init__(self) -> None:
        self.served: list[tuple[str, int, bool]] = []
        self.shadowed: list[tuple[str, int, bool | None]] = []

    def served_(self, model: str, version: int, ok: bool, latency_s: float) -> None:
        self.served.append((model, version, ok))

    def shadowed_(self, model: str, version: int, ok: bool, latency_s: float, agrees: bool | None) -> None:
        self.shadowed.append((model, version, agrees))


class _Outcomes:
    def __init__(self, counts: _Counts) -> None:
        self.served = counts.served_
        self.shadowed = counts.shadowed_


def follower_main(conn: Connection, index: int, overrides: dict[str, Any]) -> None:
    """A follower: reports what it 'served', echoes the documents it got through an admin
    call, asks for an unknown model (an error comes back), and stays until told to stop."""
    docs: list[dict[str, Any]] = []
    lost = threading.Event()
    link = DriverLink(conn, on_docs=lambda d: docs.append(dict(d)), on_lost=lost.set).start()
    link.first_docs.wait(10)
    for i in range(overrides["n"]):
        link.served("m", 2, i % 10 != 0, 0.001)
    link.shadowed("m", 3, True, 0.002, False)
    while len(docs) < 2 and not lost.is_set():  # the first batch, then one published later
        time.sleep(0.01)
    reply = link.call("Echo", repr([sorted(d) for d in docs]).encode())
    try:
        link.call("Fail", b"")
    except NotFoundError as exc:
        link.call("Echo", f"error {exc}".encode())
    assert reply
    lost.wait(30)


def test_followers_report_outcomes_forward_calls_and_get_every_saved_document() -> None:
    counts = _Counts()
    calls: list[tuple[str, bytes]] = []

    def admin(method: str, request: bytes) -> bytes:
        if method == "Fail":
            raise NotFoundError("no such model", model="x")
        calls.append((method, request))
        return b"ok"

    followers = Followers(2, follower_main, {"n": 500}, _Outcomes(counts), admin, docs={"a": {"stable": 1}})  # type: ignore[arg-type]
    followers.start()
    try:
        deadline = time.monotonic() + 60
        while followers.alive() < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        followers.publish("b", {"stable": 4})
        while len(calls) < 4 or len(counts.served) < 1000:
            assert time.monotonic() < deadline, (calls, len(counts.served))
            time.sleep(0.05)
        assert len(counts.served) == 1000 and sum(1 for _, _, ok in counts.served if not ok) == 100
        assert counts.shadowed == [("m", 3, False), ("m", 3, False)]
        echoes = sorted(r.decode() for m, r in calls)
        # each follower got the documents saved before it started, then the one published later
        assert echoes.count("[['a'], ['b']]") == 2, echoes
        assert echoes.count("error no such model (model='x')") == 2, echoes
        pids = followers.pids()
        assert len(set(pids)) == 2
        os.kill(pids[0], signal.SIGKILL)  # a follower that dies is started again
        while followers.alive() < 2 or pids[0] in followers.pids():
            assert time.monotonic() < deadline + 30
            time.sleep(0.05)
    finally:
        followers.stop()
    assert followers.alive() == 0


def test_a_follower_whose_driver_is_gone_is_told_and_calls_fail_fast() -> None:
    import multiprocessing

    mine, theirs = multiprocessing.Pipe()
    lost = threading.Event()
    link = DriverLink(theirs, on_docs=lambda d: None, on_lost=lost.set).start()
    mine.close()
    assert lost.wait(5)
    from cdl.errors import UnavailableError

    with pytest.raises(UnavailableError):
        link.call("ListModels", b"", timeout_s=1)
    link.close()


def test_documents_that_lower_the_candidates_traffic_are_told_apart() -> None:
    from services.gateway.rollout import document_lowers as _lowers

    canary = {"stable": 1, "candidate": 2, "phase": "canary", "step": 2, "share": None}
    assert _lowers(canary, {**canary, "candidate": 0, "phase": "idle"})  # rolled back
    assert _lowers(canary, {**canary, "phase": "awaiting_approval"})
    assert not _lowers(canary, {**canary, "step": 3})  # stepped up
    assert _lowers(canary, {**canary, "step": 1})
    assert _lowers({**canary, "share": 0.5}, {**canary, "share": 0.2})  # a pinned share lowered
    assert not _lowers({**canary, "share": 0.2}, {**canary, "share": 0.5})
    assert not _lowers(canary, {**canary, "stable": 2, "candidate": 0, "phase": "idle"})  # promoted: save first
    assert not _lowers(None, canary)
