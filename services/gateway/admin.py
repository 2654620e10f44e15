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

from cdl.errors import UnauthenticatedError
from cdl.v1 import admin_pb2, admin_pb2_grpc, events_pb2
from services.gateway.auth import ApiKeys
from services.gateway.rollout import RolloutManager, RolloutStatus, Transition
from services.gateway.status import failure

__all__ = ["AdminCore", "ModelAdminService", "status_message"]

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


class AdminCore:
    """The admin calls as functions of serialized requests (no transport): the servicer of
    the driving process calls it, and so do followers' forwarded calls (``services.gateway.peers``)."""

    def __init__(self, manager: RolloutManager, execute: Callable[[Sequence[Transition]], None]) -> None:
        self._manager = manager
        self._execute = execute

    def call(self, method: str, request: bytes) -> bytes:
        """Carry out ``method`` (a ModelAdmin rpc name); raises CdlError (NOT_FOUND, ...)."""
        m = self._manager
        if method == "ListModels":
            return admin_pb2.ListModelsResponse(models=[status_message(s) for s in m.models()]).SerializeToString()
        req_cls, resp_cls = _TYPES[method]
        req: Any = req_cls.FromString(request)
        if method == "Promote":
            self._execute(m.promote(req.model, req.version))
        elif method == "Rollback":
            self._execute(m.rollback(req.model, req.reason))
        elif method == "Approve":
            self._execute(m.approve(req.model, req.version, req.approver))
        elif method == "SetTraffic":
            self._execute(m.set_traffic(req.model, req.traffic_fraction))
        return bytes(resp_cls(status=status_message(m.status(req.model))).SerializeToString())


_TYPES: dict[str, tuple[Any, Any]] = {
    "ListModels": (admin_pb2.ListModelsRequest, admin_pb2.ListModelsResponse),
    "RolloutStatus": (admin_pb2.RolloutStatusRequest, admin_pb2.RolloutStatusResponse),
    "Promote": (admin_pb2.PromoteRequest, admin_pb2.PromoteResponse),
    "Rollback": (admin_pb2.RollbackRequest, admin_pb2.RollbackResponse),
    "Approve": (admin_pb2.ApproveRequest, admin_pb2.ApproveResponse),
    "SetTraffic": (admin_pb2.SetTrafficRequest, admin_pb2.SetTrafficResponse),
}


class ModelAdminService(admin_pb2_grpc.ModelAdminServicer):
    """The servicer: checks the admin key, then ``call`` does the work (``AdminCore.call`` in the
    driving process, the pipe to it in a follower) off the event loop -- the manager may
    persist (object store I/O)."""

    def __init__(self, call: Callable[[str, bytes], bytes], keys: ApiKeys) -> None:
        self._call_fn = call
        self._keys = keys

    async def _call(self, context: Context, method: str, request: Any) -> Any:
        try:
            if not self._keys.check(context.invocation_metadata(), admin=True):
                raise UnauthenticatedError("missing or wrong admin key")
            raw = await asyncio.to_thread(self._call_fn, method, request.SerializeToString())
        except Exception as exc:  # noqa: BLE001 (failure() logs what the gateway did not expect)
            code, details = failure(exc)
            await context.abort(code, details)
        return _TYPES[method][1].FromString(raw)

    async def ListModels(  # noqa: N802 - the rpc's name
        self, request: admin_pb2.ListModelsRequest, context: Context
    ) -> admin_pb2.ListModelsResponse:
        return await self._call(context, "ListModels", request)  # type: ignore[no-any-return]

    async def RolloutStatus(  # noqa: N802 - the rpc's name
        self, request: admin_pb2.RolloutStatusRequest, context: Context
    ) -> admin_pb2.RolloutStatusResponse:
        return await self._call(context, "RolloutStatus", request)  # type: ignore[no-any-return]

    async def Promote(  # noqa: N802 - the rpc's name
        self, request: admin_pb2.PromoteRequest, context: Context
    ) -> admin_pb2.PromoteResponse:
        return await self._call(context, "Promote", request)  # type: ignore[no-any-return]

    async def Rollback(  # noqa: N802 - the rpc's name
        self, request: admin_pb2.RollbackRequest, context: Context
    ) -> admin_pb2.RollbackResponse:
        return await self._call(context, "Rollback", request)  # type: ignore[no-any-return]

    async def Approve(  # noqa: N802 - the rpc's name
        self, request: admin_pb2.ApproveRequest, context: Context
    ) -> admin_pb2.ApproveResponse:
        return await self._call(context, "Approve", request)  # type: ignore[no-any-return]

    async def SetTraffic(  # noqa: N802 - the rpc's name
        self, request: admin_pb2.SetTrafficRequest, context: Context
    ) -> admin_pb2.SetTrafficResponse:
        return await self._call(context, "SetTraffic", request)  # type: ignore[no-any-return]
