"""The floor the gateway is measured against: a bare byte-forwarding gRPC proxy.

A generic ``grpc.aio`` handler with no routing, authentication, logging or
metrics: every ``inference.GRPCInferenceService`` call's bytes go to one
Triton server over one channel and its bytes come back. Not a product; the
baseline of ``bench/gateway.py``. argv: listen port, Triton host:port.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc

METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")


async def main(port: int, target: str) -> None:
    channel = grpc.aio.insecure_channel(target)
    calls = {m: channel.unary_unary(f"/inference.GRPCInferenceService/{m}") for m in METHODS}

    def forward(method: str) -> Any:
        call = calls[method]

        async def handle(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            return bytes(await call(request))

        return grpc.unary_unary_rpc_method_handler(handle)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {m: forward(m) for m in METHODS}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
