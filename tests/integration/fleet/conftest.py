"""The tests that kill and restart a Triton server get a stack of their own (Kafka, MinIO and two
Tritons, started once for this folder), so that tests running beside them in another process
(``pytest -n``) keep their Tritons. Their ``stack``, ``kafka_bootstrap`` and ``object_store``
are this stack's; the services they start are pointed at it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from cdl_tools.settings import StackSettings
from cdl_tools.stack import LocalStack
from tests.conftest import bootstrap_of, start_stack, store_of

#: two Tritons (a fleet) and a plaintext broker (the secured one is tested elsewhere); MinIO over
#: TLS as the shared stack's (a service the tests start gets this stack's CA: the shared stack's
#: settings in the test process's environment must not reach it, as a plain-HTTP MinIO's would)
FLEET_STACK: dict[str, Any] = {"triton_servers": 2, "postgres": False, "services": [], "kafka_security": "plaintext"}


@pytest.fixture(scope="package")
def fleet_settings(tmp_path_factory: pytest.TempPathFactory) -> StackSettings:
    return StackSettings(state_dir=tmp_path_factory.mktemp("fleet-stack"), **FLEET_STACK)


@pytest.fixture(scope="package")
def stack(fleet_settings: StackSettings) -> Iterator[dict[str, Any]]:
    local = LocalStack(fleet_settings)
    try:
        yield start_stack(local)
    finally:
        local.down(purge=True)


kafka_bootstrap = pytest.fixture(scope="package", name="kafka_bootstrap")(bootstrap_of)
object_store = pytest.fixture(scope="package", name="object_store")(store_of)


@pytest.fixture(scope="package")
def triton_grpcs(stack: dict[str, Any]) -> list[str]:
    """This stack's Triton servers' gRPC endpoints, in order."""
    return [str(t["grpc"]) for t in stack["triton"]]
