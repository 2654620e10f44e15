"""The tests that stop, pause or kill the broker get a stack of their own (Kafka and MinIO,
started once for this folder), so that tests running beside them in another process
(``pytest -n``) keep a broker that stays up. Their ``stack``, ``kafka_bootstrap`` and
``object_store`` are this stack's; the services they start are pointed at it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from cdl_tools.settings import StackSettings
from cdl_tools.stack import LocalStack
from tests.conftest import bootstrap_of, start_stack, store_of

#: what this folder's stack runs: the servers its tests use (no Triton, no PostgreSQL), its broker
#: plaintext (a broker stopped and restarted under the loops; the secured bus is tested elsewhere)
BROKER_STACK: dict[str, Any] = {"triton_servers": 0, "postgres": False, "services": [], "kafka_security": "plaintext"}


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    local = LocalStack(StackSettings(state_dir=tmp_path_factory.mktemp("broker-stack"), **BROKER_STACK))
    try:
        yield start_stack(local)
    finally:
        local.down(purge=True)


kafka_bootstrap = pytest.fixture(scope="package", name="kafka_bootstrap")(bootstrap_of)
object_store = pytest.fixture(scope="package", name="object_store")(store_of)
