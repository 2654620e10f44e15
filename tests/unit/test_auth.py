"""API keys and the sync auth interceptor, on a real in-process gRPC server."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from cdl.auth import ApiKeys, AuthInterceptor, hash_key

KEY = "s3cret-key"


@pytest.fixture
def server() -> Iterator[str]:
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def total(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"".join(requests)

    handler = grpc.method_handlers_generic_handler(
        "t.S",
        {"Echo": grpc.unary_unary_rpc_method_handler(echo), "Join": grpc.stream_unary_rpc_method_handler(total)},
    )
    health = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(echo)}
    )
    srv = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[AuthInterceptor(ApiKeys([hash_key(KEY)]))])
    srv.add_generic_rpc_handlers((handler, health))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}"
    srv.stop(0)


def test_interceptor_refuses_unary_and_streaming_calls_without_the_key(server: str) -> None:
    with grpc.insecure_channel(server) as ch:
        echo = ch.unary_unary("/t.S/Echo")
        join = ch.stream_unary("/t.S/Join")
        good = (("authorization", f"Bearer {KEY}"),)
        assert echo(b"hi", metadata=good, timeout=5) == b"hi"
        assert join(iter([b"a", b"b"]), metadata=good, timeout=5) == b"ab"
        for metadata in [(), (("authorization", "Bearer wrong"),)]:
            with pytest.raises(grpc.RpcError) as unary:
                echo(b"hi", metadata=metadata, timeout=5)
            assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as stream:
                join(iter([b"a"]), metadata=metadata, timeout=5)
            assert stream.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # the health service stays open
        assert ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5) == b""


def test_a_keys_id_names_it_for_an_audit_without_revealing_it() -> None:
    from cdl.auth import key_id

    who = key_id([("authorization", f"Bearer {KEY}")])
    assert who == f"key:{hash_key(KEY)[:12]}" and KEY not in who
    assert key_id([("authorization", b"Bearer " + KEY.encode())]) == who
    assert key_id([]) == key_id(None) == key_id([("authorization", "Basic abc")]) == "anonymous"
