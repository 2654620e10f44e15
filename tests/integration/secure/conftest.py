"""The tests of a secured bus get a stack of their own: Kafka with SASL_SSL (the stack's CA,
a SCRAM user per service, ACLs: cdl.kafka.acls) and MinIO, started once for this folder. This
process talks to it as the stack's admin (``use_stack_identity``); the services the tests
start as their own users (``service_env``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from cdl_tools.settings import StackSettings
from cdl_tools.stack import LocalStack, use_stack_identity
from tests.conftest import bootstrap_of, start_stack, store_of

SECURE_STACK: dict[str, Any] = {"triton_servers": 0, "postgres": False, "services": [], "kafka_security": "sasl_ssl"}


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    local = LocalStack(StackSettings(state_dir=tmp_path_factory.mktemp("secure-stack"), **SECURE_STACK))
    try:
        state = start_stack(local)
        use_stack_identity(state)
        yield state
    finally:
        local.down(purge=True)


kafka_bootstrap = pytest.fixture(scope="package", name="kafka_bootstrap")(bootstrap_of)
object_store = pytest.fixture(scope="package", name="object_store")(store_of)
