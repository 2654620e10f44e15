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
from dataclasses import replace
from typing import Any

import grpc

from cdl.auth import ApiKeys, key_id
from cdl.errors import UnauthenticatedError
from cdl.logging import get_logger
from cdl.v1 import admin_pb2, admin_pb2_grpc, events_pb2
from services.gateway.rollout.machine import RolloutManager, RolloutStatus, Transition
from services.gateway.status import failure

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


#: the calls that change a rollout (audited)
_CHANGES = frozenset({"Promote", "Rollback", "Approve", "SetTraffic"})

log = get_logger("services.gateway.admin")

_RESPONSES: dict[str, Any] = {
    "RolloutStatus": admin_pb2.RolloutStatusResponse,
    "Promote": admin_pb2.PromoteResponse,
    "Rollback": admin_pb2.RollbackResponse,
    "Approve": admin_pb2.ApproveResponse,
    "SetTraffic": admin_pb2.SetTrafficResponse,
}


class ModelAdminService(admin_pb2_grpc.ModelAdminServicer):
    """The servicer: checks the admin key, then carries the call out on the manager off the
    event loop -- the manager may persist (object store I/O)."""

    def __init__(self, manager: RolloutManager, execute: Callable[[Sequence[Transition]], None], keys: ApiKeys) -> None:
        self._manager = manager
        self._execute = execute
        self._keys = keys

    def _carry_out(self, method: str, req: Any, who: str) -> Any:
        """``method`` (a ModelAdmin rpc name) on the manager as ``who`` (cdl.auth.key_id), whose
        transitions say so on model.deployed; raises CdlError (NOT_FOUND, ...)."""
        m = self._manager

        def execute(transitions: Sequence[Transition]) -> None:
            self._execute([replace(t, actor=who) for t in transitions])

        if method == "ListModels":
            return admin_pb2.ListModelsResponse(models=[status_message(s) for s in m.models()])
        if method == "Promote":
            execute(m.promote(req.model, req.version))
        elif method == "Rollback":
            execute(m.rollback(req.model, req.reason))
        elif method == "Approve":
            execute(m.approve(req.model, req.version, req.approver))
        elif method == "SetTraffic":
            execute(m.set_traffic(req.model, req.traffic_fraction))
        return _RESPONSES[method](status=status_message(m.status(req.model)))

    async def _call(self, context: Context, method: str, request: Any) -> Any:
        metadata = context.invocation_metadata()
        who = key_id(metadata)
        try:
            if not self._keys.check(metadata, admin=True):
                log.warning("admin call refused", method=method, key=who)
                raise UnauthenticatedError("missing or wrong admin key")
            if method in _CHANGES:  # the audit: who, what, when (the log line's time)
                fields = {f.name: v for f, v in request.ListFields()}
                log.info("admin call", method=method, key=who, **{k: str(v) for k, v in fields.items()})
            return await asyncio.to_thread(self._carry_out, method, request, who)
        except Exception as exc:  # noqa: BLE001 (failure() logs what the gateway did not expect)
            code, details = failure(exc)
            await context.abort(code, details)

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
