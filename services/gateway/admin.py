"""``cdl.v1.ModelAdmin``: rollouts inspected and steered (thin transport over the manager).

Every call needs an admin key when admin keys are configured (UNAUTHENTICATED
otherwise). The manager's errors map to statuses through the one error
hierarchy: an unknown model is NOT_FOUND, a call that does not fit the
rollout's phase (approve what is not awaiting approval) FAILED_PRECONDITION,
a bad share INVALID_ARGUMENT. Calls that change a rollout hand the
transitions they cause to ``execute`` (the app's rollout worker).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from cdl.errors import CdlError
from cdl.rpc import status_code
from cdl.v1 import admin_pb2, admin_pb2_grpc, events_pb2
from services.gateway.auth import ApiKeys
from services.gateway.rollout import RolloutManager, RolloutStatus, Transition

__all__ = ["ModelAdminService", "status_message"]

Context = grpc.aio.ServicerContext[Any, Any]


def status_message(st: RolloutStatus) -> admin_pb2.ModelStatus:
    """A :class:`RolloutStatus` as the admin API's ``ModelStatus``."""
    out = admin_pb2.ModelStatus(model=st.model, serving_version=st.stable, mode=st.mode)
    for v in st.versions:
        out.versions.add(
            version=v.version,
            state=events_pb2.RolloutState.Value(v.state.proto_name),
            traffic_fraction=v.traffic,
            reason=v.reason,
        )
    return out


class ModelAdminService(admin_pb2_grpc.ModelAdminServicer):
    def __init__(self, manager: RolloutManager, keys: ApiKeys, execute: Callable[[Sequence[Transition]], None]) -> None:
        self._manager = manager
        self._keys = keys
        self._execute = execute

    async def _call(self, context: Context, change: Callable[[], list[Transition]] | None, model: str) -> Any:
        if not self._keys.check(context.invocation_metadata(), admin=True):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin key")
        try:
            if change is not None:  # the manager may persist (object store I/O): off the event loop
                self._execute(await asyncio.to_thread(change))
            return status_message(self._manager.status(model))
        except CdlError as exc:
            await context.abort(status_code(exc), str(exc))

    async def ListModels(  # noqa: N802 - the rpc's name
        self, request: admin_pb2.ListModelsRequest, context: Context
    ) -> admin_pb2.ListModelsResponse:
        if not self._keys.check(context.invocation_metadata(), admin=True):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin key")
        return admin_pb2.ListModelsResponse(models=[status_message(s) for s in self._manager.models()])

    async def RolloutStatus(  # noqa: N802 - the rpc's name
        self, request: admin_pb2.RolloutStatusRequest, context: Context
    ) -> admin_pb2.RolloutStatusResponse:
        return admin_pb2.RolloutStatusResponse(status=await self._call(context, None, request.model))

    async def Promote(  # noqa: N802 - the rpc's name
        self, request: admin_pb2.PromoteRequest, context: Context
    ) -> admin_pb2.PromoteResponse:
        change = lambda: self._manager.promote(request.model, request.version)  # noqa: E731
        return admin_pb2.PromoteResponse(status=await self._call(context, change, request.model))

    async def Rollback(  # noqa: N802 - the rpc's name
        self, request: admin_pb2.RollbackRequest, context: Context
    ) -> admin_pb2.RollbackResponse:
        change = lambda: self._manager.rollback(request.model, request.reason)  # noqa: E731
        return admin_pb2.RollbackResponse(status=await self._call(context, change, request.model))

    async def Approve(  # noqa: N802 - the rpc's name
        self, request: admin_pb2.ApproveRequest, context: Context
    ) -> admin_pb2.ApproveResponse:
        change = lambda: self._manager.approve(request.model, request.version, request.approver)  # noqa: E731
        return admin_pb2.ApproveResponse(status=await self._call(context, change, request.model))

    async def SetTraffic(  # noqa: N802 - the rpc's name
        self, request: admin_pb2.SetTrafficRequest, context: Context
    ) -> admin_pb2.SetTrafficResponse:
        change = lambda: self._manager.set_traffic(request.model, request.traffic_fraction)  # noqa: E731
        return admin_pb2.SetTrafficResponse(status=await self._call(context, change, request.model))
