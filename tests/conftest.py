"""Test tiers, a folder each: unit (pure Python: no servers, no compilers; the fast tier),
native (C and Go builds, sanitizers, the race detector, fuzzing), integration (real servers),
e2e (the CLI). ``scripts/test.sh <tier>`` runs one.

The local stack (real Kafka, MinIO and Triton) is started once per test
session. Where it cannot start, tests that need it fail under CI (CI=true)
and are skipped with the reason elsewhere.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cdl.errors import CdlError
from cdl.store import ObjectStore
from cdl_tools.settings import StackSettings
from cdl_tools.stack import LocalStack, service_env
from tests.helpers import IN_CI


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.path)
        if f"{os.sep}integration{os.sep}" in path:
            item.add_marker(pytest.mark.integration)
        elif f"{os.sep}e2e{os.sep}" in path:
            item.add_marker(pytest.mark.e2e)
        elif f"{os.sep}native{os.sep}" in path:
            item.add_marker(pytest.mark.native)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The session's local stack: its state (endpoints) as written to stack.json."""
    state_dir = tmp_path_factory.mktemp("stack")
    settings = StackSettings(state_dir=state_dir, triton_servers=2, services=[])
    local = LocalStack(settings)
    try:
        state = local.up()
    except CdlError as exc:
        local.down(purge=True)
        message = f"local stack did not start: {exc} (run scripts/setup.sh)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    # what the stack gives its services: the services and settings the tests start read it
    os.environ.update(service_env(state))
    try:
        yield state
    finally:
        local.down(purge=True)


@pytest.fixture(scope="session")
def kafka_bootstrap(stack: dict[str, Any]) -> str:
    return str(stack["kafka"]["bootstrap"])


@pytest.fixture(scope="session")
def object_store(stack: dict[str, Any]) -> ObjectStore:
    m = stack["minio"]
    return ObjectStore(m["endpoint"], m["access_key"], m["secret_key"])


@pytest.fixture(scope="session")
def triton_grpc(stack: dict[str, Any]) -> str:
    return str(stack["triton"][0]["grpc"])


@pytest.fixture(scope="session")
def triton_grpcs(stack: dict[str, Any]) -> list[str]:
    """Both Triton servers of the session's stack (the gateway's tests balance over them)."""
    return [str(t["grpc"]) for t in stack["triton"]]


@pytest.fixture(scope="session")
def triton_https(stack: dict[str, Any]) -> list[str]:
    """The same servers' HTTP endpoints, in ``triton_grpcs``' order."""
    return [str(t["http"]) for t in stack["triton"]]


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> Any:
    """Creates fresh topics (unique names) so tests never see each other's records."""
    from cdl.kafka import ensure_topics

    def make(prefix: str = "t", partitions: int = 1) -> str:
        name = f"test.{prefix}.{uuid.uuid4().hex[:10]}"
        assert ensure_topics(kafka_bootstrap, {name: partitions}) == [name]
        return name

    return make


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
