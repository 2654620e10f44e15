"""``cdl.v1.ModelAdmin``: rollouts inspected and steered (thin transport over the manager).

Every call needs an admin key when admin keys are configured (UNAUTHENTICATED
otherwise). The manager's errors map to statuses through the one error
hierarchy: an unknown model is NOT_FOUND, a call that does not fit the
rollout's phase (approve what is not awaiting approval) FAILED_PRECONDITION,
a bad share INVALID_ARGUMENT. Calls that change a rollout hand the
transitions they cause to ``execute`` (the app's rollout worker).

With several gateway instances a change is made by the model's owner, its
rollout's single writer: on another instance (the key checked and the call
audited there) it is handed over with ``forward`` (the app sends it on
``gateway.commands``, keyed by model, which the owner's group consumes) and
answered once the owner applied it (:meth:`ModelAdminService.apply`), with the
owner's answer or error; an owner that does not answer within
``forward_timeout_s`` (or the call's deadline) is DEADLINE_EXCEEDED, and the
owner drops a command it reads after that. Reads (ListModels, RolloutStatus)
are answered where they arrive, from the models this instance follows as their
writers' documents say.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import grpc

from cdl.auth import ApiKeys, key_id
from cdl.errors import DeadlineExceededError, InvalidInputError, UnauthenticatedError
from cdl.logging import get_logger
from cdl.v1 import admin_pb2, admin_pb2_grpc, events_pb2
from services.gateway.rollout.machine import NotOwnerError, RolloutManager, RolloutStatus, Transition
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

_REQUESTS: dict[str, Any] = {
    "Promote": admin_pb2.PromoteRequest,
    "Rollback": admin_pb2.RollbackRequest,
    "Approve": admin_pb2.ApproveRequest,
    "SetTraffic": admin_pb2.SetTrafficRequest,
}

#: hands a change to the model's owner: (model, method, request bytes, actor, timeout_s) -> its result
Forward = Callable[[str, str, bytes, str, float], "Future[events_pb2.GatewayCommandResult]"]

_CODES = {code.value[0]: code for code in grpc.StatusCode}

_RESPONSES: dict[str, Any] = {
    "RolloutStatus": admin_pb2.RolloutStatusResponse,
    "Promote": admin_pb2.PromoteResponse,
    "Rollback": admin_pb2.RollbackResponse,
    "Approve": admin_pb2.ApproveResponse,
    "SetTraffic": admin_pb2.SetTrafficResponse,
}


class _OwnerRefusedError(Exception):
    """The model's owner answered a handed-over call with an error (its code and details)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class ModelAdminService(admin_pb2_grpc.ModelAdminServicer):
    """The servicer: checks the admin key, then carries the call out on the manager off the
    event loop -- the manager may persist (object store I/O)."""

    def __init__(
        self,
        manager: RolloutManager,
        execute: Callable[[Sequence[Transition]], None],
        keys: ApiKeys,
        forward: Forward | None = None,
        forward_timeout_s: float = 10.0,
    ) -> None:
        self._manager = manager
        self._execute = execute
        self._keys = keys
        self._forward = forward
        self._forward_timeout_s = forward_timeout_s

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
                if self._forward is not None and not self._manager.owns(request.model):
                    return await self._handed_over(context, method, request, who)
            try:
                return await asyncio.to_thread(self._carry_out, method, request, who)
            except NotOwnerError:  # handed to another instance meanwhile (a rebalance)
                if self._forward is None:
                    raise
                return await self._handed_over(context, method, request, who)
        except _OwnerRefusedError as exc:  # the owner's answer, as it gave it
            await context.abort(exc.code, exc.details)
        except Exception as exc:  # noqa: BLE001 (failure() logs what the gateway did not expect)
            code, details = failure(exc)
            await context.abort(code, details)

    async def _handed_over(self, context: Context, method: str, request: Any, who: str) -> Any:
        """``method`` carried out by the model's owner; its answer, or its error raised here."""
        assert self._forward is not None
        timeout = self._forward_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(0.0, min(timeout, remaining - 0.05))  # answer before the caller's deadline
        fut = await asyncio.to_thread(self._forward, request.model, method, request.SerializeToString(), who, timeout)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except TimeoutError:
            fut.cancel()
            raise DeadlineExceededError(
                "the gateway instance that drives this model's rollout did not answer in time; it drops "
                "the call once that time passed (RolloutStatus says what applies)",
                model=request.model,
                method=method,
                timeout_s=round(timeout, 3),
            ) from None
        if result.code != grpc.StatusCode.OK.value[0]:
            raise _OwnerRefusedError(_CODES.get(result.code, grpc.StatusCode.UNKNOWN), result.details)
        log.info("admin call applied by the model's owner", method=method, key=who, model=request.model)
        return _RESPONSES[method].FromString(result.response)

    def apply(self, command: events_pb2.GatewayCommand) -> events_pb2.GatewayCommandResult:
        """Carry out a change another instance handed over (this one owns the model); its result.

        The caller's key was checked where the call arrived; the change is audited here too,
        with that key's id, which its transitions carry to model.deployed.
        """
        out = events_pb2.GatewayCommandResult(
            command_id=command.command_id, model=command.model, reply_to=command.reply_to
        )
        try:
            if command.expires_unix_ms and time.time() * 1000 > command.expires_unix_ms:
                raise DeadlineExceededError(
                    "the call reached the model's owner after its caller stopped waiting; not applied",
                    model=command.model,
                    method=command.method,
                )
            kind = _REQUESTS.get(command.method)
            if kind is None:
                raise InvalidInputError("not a ModelAdmin change", method=command.method)
            request = kind.FromString(command.request)
            if request.model != command.model:
                raise InvalidInputError("the command's model is not its request's", model=command.model)
            fields = {f.name: str(v) for f, v in request.ListFields()}
            log.info("admin call from another instance", method=command.method, key=command.actor, **fields)
            response = self._carry_out(command.method, request, command.actor)
            out.response = response.SerializeToString()
        except Exception as exc:  # noqa: BLE001 (failure() logs what the gateway did not expect)
            code, details = failure(exc)
            out.code, out.details = code.value[0], details
        return out

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
