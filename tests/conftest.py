"""Test tiers, a folder each: unit (pure Python: no servers, no compilers; the fast tier),
native (C and Go builds, sanitizers, the race detector, fuzzing), integration (real servers),
e2e (the CLI). ``scripts/test.sh <tier>`` runs one.

The local stack (real Kafka, MinIO and Triton) is started once per test
session. Where it cannot start, tests that need it fail under CI (CI=true)
and are skipped with the reason elsewhere.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cdl.errors import CdlError
from cdl.store import ObjectStore
from cdl_tools.settings import StackSettings
from cdl_tools.stack import LocalStack, service_env, stack_store, use_stack_identity
from cdl_tools.stack._procs import port_pool
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


#: where a stack shared by several pytest processes lives (pytest-xdist's workers, or the
#: phases of scripts/test.sh): started by the first that needs it, stopped by whoever set it
SHARED_STACK = "CDL_TEST_SHARED_STACK"


def pytest_configure(config: pytest.Config) -> None:
    """With workers (``-n``), one stack for all of them: its directory goes to the workers in
    their environment, and this (the controller) stops it at the end."""
    worker = getattr(config, "workerinput", None)
    if worker is not None and not os.environ.get("CDL_STACK_PORT_RANGE"):
        # each worker (and what it starts: the demo's stack, services) picks ports in its own
        # slice: two picks of one port by two workers, before either bound it, failed a start
        pool, count = port_pool(), int(worker["workercount"])
        size = len(pool) // count
        low = pool.start + size * int(worker["workerid"].removeprefix("gw"))
        os.environ["CDL_STACK_PORT_RANGE"] = f"{low}-{low + size - 1}"
    if os.environ.get(SHARED_STACK) or worker is not None or not config.getoption("numprocesses", None):
        return
    os.environ[SHARED_STACK] = tempfile.mkdtemp(prefix="cdl-test-stack-")
    config.stash[_OWNED] = Path(os.environ[SHARED_STACK])


def pytest_unconfigure(config: pytest.Config) -> None:
    owned = config.stash.get(_OWNED, None)
    if owned is not None:
        stop_shared_stack(owned)


_OWNED = pytest.StashKey[Path]()


def stop_shared_stack(shared: Path) -> None:
    """Stop the stack a :data:`SHARED_STACK` directory holds (if one started) and remove it."""
    if (shared / "stack" / "stack.json").exists():
        LocalStack(_stack_settings(shared / "stack")).down(purge=True)
    shutil.rmtree(shared, ignore_errors=True)


#: the shared stack's broker: SASL_SSL with a user per service and ACLs, as a secured
#: deployment runs (docs/security.md), unless this variable says ``plaintext``
TEST_KAFKA_SECURITY = "CDL_TEST_KAFKA_SECURITY"


def _stack_settings(state_dir: Path) -> StackSettings:
    security = os.environ.get(TEST_KAFKA_SECURITY, "sasl_ssl")
    assert security in ("sasl_ssl", "plaintext"), f"{TEST_KAFKA_SECURITY}={security}: sasl_ssl or plaintext"
    return StackSettings(state_dir=state_dir, triton_servers=2, services=[], kafka_security=security)


def start_stack(local: LocalStack) -> dict[str, Any]:
    """``local.up()``; a stack that does not start fails the test under CI, skips it elsewhere."""
    try:
        return local.up()
    except CdlError as exc:
        local.down(purge=True)
        message = f"local stack did not start: {exc} (run scripts/setup.sh)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def _shared(shared: Path) -> dict[str, Any]:
    """The shared stack: started here if no process started it yet (one at a time, by a lock)."""
    shared.mkdir(parents=True, exist_ok=True)
    local = LocalStack(_stack_settings(shared / "stack"))
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held while the first process starts it (a minute at most)
        if (shared / "up").exists():
            return local.read_state()
        state = start_stack(local)
        (shared / "up").touch()
        return state


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The session's local stack: its state (endpoints) as written to stack.json. One per test
    session, or one for all the processes that share :data:`SHARED_STACK`."""
    shared = os.environ.get(SHARED_STACK)
    local = None if shared else LocalStack(_stack_settings(tmp_path_factory.mktemp("stack")))
    state = start_stack(local) if local is not None else _shared(Path(str(shared)))
    # what the stack gives its services: the services and settings the tests start read it,
    # but its Kafka identities (which a process that starts another stack's services would pass
    # on): this process (the tests' producers and readers) is the stack's operator, its admin,
    # towards this broker only; a process the tests start gets kafka_env(state)
    os.environ.update({k: v for k, v in service_env(state).items() if k not in kafka_env(state)})
    use_stack_identity(state)
    try:
        yield state
    finally:
        if local is not None:
            local.down(purge=True)


def admin_env(stack: dict[str, Any], prefix: str = "CDL_") -> dict[str, str]:
    """The variables that make a cdl process (a service: ``prefix`` ``CDL_<SERVICE>_``) the
    stack's Kafka admin on a secured broker; nothing on a plaintext one. The tests' services and
    workers use the tests' own topics (``test.*``), which no service's grant names; least
    privilege itself is tested in tests/integration/secure/ and by the demo's e2e test."""
    if not stack.get("kafka_users"):
        return {}
    password = Path(stack["state_dir"]) / "keys" / "kafka" / "admin.password"
    return {prefix + "KAFKA_SASL_USERNAME": "admin", prefix + "KAFKA_SASL_PASSWORD_FILE": str(password)}


def kafka_env(stack: dict[str, Any]) -> dict[str, str]:
    """The variables that make a cdl process the stack's Kafka admin (nothing on a plaintext
    broker): what a worker the tests start needs besides the endpoints."""
    secured = {k: v for k, v in service_env(stack).items() if "_KAFKA_S" in k}
    return {k: v for k, v in secured.items() if not k.endswith(("_SASL_USERNAME", "_SASL_PASSWORD_FILE"))} | (
        admin_env(stack)
    )


def bootstrap_of(stack: dict[str, Any]) -> str:
    """The Kafka bootstrap servers of ``stack``."""
    return str(stack["kafka"]["bootstrap"])


def store_of(stack: dict[str, Any]) -> ObjectStore:
    """The object store (MinIO) of ``stack``."""
    return stack_store(stack)


# the session stack's; a folder with a stack of its own registers the same under its scope
kafka_bootstrap = pytest.fixture(scope="session", name="kafka_bootstrap")(bootstrap_of)
object_store = pytest.fixture(scope="session", name="object_store")(store_of)


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
