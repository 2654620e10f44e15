"""The pool's readiness checks: a server slow to answer keeps its place for a few checks (a busy
machine is not a dead server), one that refuses the call leaves at the first.

The server is an in-process gRPC server answering ``ServerReady`` after a delay the test sets
(the pool's health logic, not Triton's: the pool against real Tritons is in
tests/integration/test_gateway_proxy.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import grpc.aio

from cdl.v1 import open_inference_pb2 as pb
from services.gateway.dataplane.backends import TritonPool

SERVICE = "inference.GRPCInferenceService"


class _ReadyServer:
    """Answers ServerReady(ready=true) after ``delay`` seconds."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.calls = 0
        self.server = grpc.aio.server()
        self.port = 0

    async def _ready(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return pb.ServerReadyResponse(ready=True).SerializeToString()

    async def start(self) -> str:
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"ServerReady": grpc.unary_unary_rpc_method_handler(self._ready)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{self.port}"


async def _until(cond: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.02)
    return cond()


def test_a_slow_server_keeps_its_place_until_it_misses_several_checks_in_a_row() -> None:
    async def scenario() -> None:
        srv = _ReadyServer()
        endpoint = await srv.start()
        changes: list[bool] = []
        # checks every 0.5 s, each with a 0.5 s deadline; slow answers take 1.5 s
        pool = TritonPool([endpoint], health_interval_s=0.5, health_misses=3)
        pool.subscribe(lambda: changes.append(pool.servers()[0].ready))
        try:
            await pool.start()
            assert pool.servers()[0].ready and changes == [True]
            # slow for two checks, then quick again: never out of the pool
            srv.delay = 1.5
            calls = srv.calls
            assert await _until(lambda: srv.calls >= calls + 2, 10)
            srv.delay = 0.0
            calls = srv.calls
            assert await _until(lambda: srv.calls >= calls + 3, 10)
            assert changes == [True], "a server two checks late left the pool"
            # slow for good: out after the third check in a row
            srv.delay = 1.5
            assert await _until(lambda: not pool.servers()[0].ready, 15)
            assert changes == [True, False]
            srv.delay = 0.0
            assert await _until(lambda: pool.servers()[0].ready, 10)
            assert changes == [True, False, True]
        finally:
            await pool.close()
            await srv.server.stop(None)

    asyncio.run(scenario())


def test_a_server_that_refuses_the_call_leaves_at_the_first_check() -> None:
    async def scenario() -> None:
        srv = _ReadyServer()
        endpoint = await srv.start()
        # many misses allowed: only a late answer is forgiven, a refused call is not
        pool = TritonPool([endpoint], health_interval_s=0.1, health_misses=1000)
        try:
            await pool.start()
            assert pool.servers()[0].ready
            await srv.server.stop(None)
            stopped = time.monotonic()
            assert await _until(lambda: not pool.servers()[0].ready, 5)
            assert time.monotonic() - stopped < 2.0
        finally:
            await pool.close()

    asyncio.run(scenario())
