"""API keys of the gateway (cdl/auth.py): digests, bearer metadata, scopes (inference, admin), the cache."""

from __future__ import annotations

import hashlib

import pytest

from cdl import auth
from cdl.auth import ApiKeys, hash_key


def _md(value: str | bytes | None, *extra: tuple[str, str]) -> list[tuple[str, str | bytes]]:
    md: list[tuple[str, str | bytes]] = [("user-agent", "grpc-python"), *extra]
    if value is not None:
        md.append(("authorization", value))
    return md


def test_hash_key_is_sha256_hex() -> None:
    assert hash_key("s3cret") == hashlib.sha256(b"s3cret").hexdigest()


def test_no_digests_means_open() -> None:
    keys = ApiKeys([], [])
    assert keys.open
    assert keys.check(None) and keys.check(_md(None)) and keys.check(_md("Bearer x"), admin=True)


def test_inference_keys() -> None:
    keys = ApiKeys([hash_key("k1"), hash_key("k2").upper()], [])
    assert not keys.open
    assert keys.check(_md("Bearer k1"))
    assert keys.check(_md("Bearer k2"))  # digests compared case-insensitively
    assert keys.check(_md("bearer   k1 "))  # scheme case-insensitive, spaces trimmed
    assert keys.check(_md(b"Bearer k1"))
    for bad in [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic k1",
        "k1",
        "Bearer k3",
        "Bearer k1k1",
        f"Bearer {hash_key('k1')}",
    ]:
        assert not keys.check(_md(bad)), bad
    # scopes: an inference key is never an admin key; with inference keys and no admin key, no
    # admin call is allowed (an endpoint is not open because another one is keyed)
    for md in (_md("Bearer k1"), _md("Bearer k3"), None):
        assert not keys.check(md, admin=True)


def test_separate_admin_keys() -> None:
    keys = ApiKeys([hash_key("user")], [hash_key("root")])
    assert keys.check(_md("Bearer user"))
    assert not keys.check(_md("Bearer user"), admin=True)
    assert keys.check(_md("Bearer root"), admin=True)
    assert not keys.check(_md("Bearer root"))  # an admin key is not an inference key unless listed
    both = ApiKeys([hash_key("user"), hash_key("root")], [hash_key("root")])
    assert both.check(_md("Bearer root")) and both.check(_md("Bearer root"), admin=True)


def test_admin_only_keys_leave_inference_open() -> None:
    keys = ApiKeys([], [hash_key("root")])
    assert keys.open
    assert keys.check(None)
    assert not keys.check(None, admin=True)
    assert keys.check(_md("Bearer root"), admin=True)


def test_verified_keys_are_not_hashed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = ApiKeys([hash_key("k1")], [])
    calls: list[str] = []
    real = auth.hash_key

    def counting(key: str) -> str:
        calls.append(key)
        return real(key)

    monkeypatch.setattr(auth, "hash_key", counting)
    for _ in range(100):
        assert keys.check(_md("Bearer k1"))
    assert calls == ["k1"]
    # wrong keys are hashed every time and never remembered (nobody can fill the cache)
    for i in range(1000):
        assert not keys.check(_md(f"Bearer wrong{i}"))
    assert len(keys._set.verified) == 1


def test_cache_is_bounded() -> None:
    keys = ApiKeys([hash_key("k1")], [])
    for i in range(auth._CACHE_MAX * 3):
        assert keys.check(_md("Bearer " + " " * i + "k1"))  # distinct values of one valid key
    assert len(keys._set.verified) <= auth._CACHE_MAX
