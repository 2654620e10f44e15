"""The one place the gateway turns a failure into a status, for every protocol it answers.

- Triton's answer (``grpc.aio.AioRpcError``) passes through with Triton's code and details;
- the gateway's own refusals are :class:`~cdl.errors.CdlError` subclasses, with their code
  (:func:`cdl.rpc.status_code`) and message;
- anything else is logged with its traceback (``failure`` is called in the ``except``
  block that caught it) and is INTERNAL, naming only the exception's class -- never
  UNKNOWN from a crash.

HTTP answers take the same code's HTTP status (:func:`cdl.errors.http_status`).
"""

from __future__ import annotations

import grpc
import grpc.aio

from cdl.errors import CdlError, http_status
from cdl.logging import get_logger
from cdl.rpc import status_code

__all__ = ["failure", "http_failure"]

log = get_logger(__name__)


def failure(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and details of a failed call."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or ""
    if isinstance(exc, CdlError):
        return status_code(exc), str(exc)
    log.exception("request failed in the gateway", error=type(exc).__name__)  # (called in an except block)
    return grpc.StatusCode.INTERNAL, f"gateway error: {type(exc).__name__}"


def http_failure(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and error message of a failed call."""
    code, details = failure(exc)
    if isinstance(exc, CdlError) and exc.http_code is not None:
        return exc.http_code, details
    return http_status(code.name), details
