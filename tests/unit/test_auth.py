"""API keys and the sync auth interceptor, on a real in-process gRPC server."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

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


def test_a_key_budget_refuses_past_its_burst_refills_at_its_rate_and_is_per_key() -> None:
    from cdl.auth import KeyBudget
    from cdl.errors import BudgetExceededError, http_status

    budget = KeyBudget(rate=2, burst=3)
    k1, k2 = [("authorization", "Bearer k1")], [("authorization", "Bearer k2")]
    for _ in range(3):
        budget.take(k1, now=100.0)
    with pytest.raises(BudgetExceededError, match="over its request budget") as over:
        budget.take(k1, now=100.0)
    assert over.value.grpc_code == "RESOURCE_EXHAUSTED" and over.value.http_code == 429
    assert http_status("RESOURCE_EXHAUSTED") == 413  # a too large request stays 413
    budget.take(k2, now=100.0)  # another key is served
    budget.take(k1, now=100.5)  # half a second: one more at 2/s
    with pytest.raises(BudgetExceededError):
        budget.take(k1, now=100.5)
    budget.take([], now=100.5)  # no key: left to the key check
    assert not KeyBudget(0) and KeyBudget(0.5).burst == 1


def test_a_keys_file_rotates_keys_and_a_broken_one_keeps_them(tmp_path: Any) -> None:
    import json

    from cdl.auth import ApiKeys, KeysFile, read_keys_file
    from cdl.errors import ConfigError

    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"inference": [hash_key("a")], "admin": [hash_key("x")]}))
    keys = ApiKeys(*read_keys_file(path))
    changes: list[int] = []
    watcher = KeysFile(path, keys, on_change=lambda: changes.append(1))
    a, b, x = ([("authorization", f"Bearer {k}")] for k in ("a", "b", "x"))
    assert not watcher.poll() and keys.check(a) and keys.check(x, admin=True)  # what it started with
    path.write_text(json.dumps({"inference": [hash_key("b")]}))
    assert watcher.poll() and changes == [1]
    assert keys.check(b) and not keys.check(a) and not keys.check(x, admin=True)
    assert keys.inference_digests == (hash_key("b"),)
    for broken in ("{", json.dumps({"inference": []}), json.dumps({"inference": ["not-a-digest"]})):
        path.write_text(broken)
        assert not watcher.poll()
        assert keys.check(b)  # kept
        with pytest.raises(ConfigError):
            read_keys_file(path)
