"""The one error hierarchy of cdl.

Every error a cdl component raises on purpose derives from :class:`CdlError`.
Each class names the gRPC status code it maps to (as a string, so this module
stays free of grpc imports) and whether a consumer loop should retry it;
:data:`HTTP_STATUS` gives the HTTP status of each gRPC code, so an error is
mapped once whichever protocol reports it (the gateway answers both).
"""

from __future__ import annotations

__all__ = [
    "HTTP_STATUS",
    "BudgetExceededError",
    "CdlError",
    "ConfigError",
    "ConflictError",
    "DeadlineExceededError",
    "DecodeError",
    "DistributedTrainingError",
    "InvalidInputError",
    "NotFoundError",
    "PermanentError",
    "PermissionDeniedError",
    "RetryableError",
    "StackError",
    "TooLargeError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UntrustedModelError",
    "http_status",
]

#: the HTTP status of each gRPC status code (by name), as KServe's and Triton's REST bindings answer
HTTP_STATUS: dict[str, int] = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 413,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}


def http_status(grpc_code: str) -> int:
    """The HTTP status of a gRPC status code's name (500 for one it does not know)."""
    return HTTP_STATUS.get(grpc_code, 500)


class CdlError(Exception):
    """Base of every error cdl raises on purpose."""

    grpc_code: str = "INTERNAL"
    #: the HTTP status where the gRPC code's (:data:`HTTP_STATUS`) is not the one to answer
    http_code: int | None = None
    retryable: bool = False

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def __str__(self) -> str:
        if not self.context:
            return self.message
        details = ", ".join(f"{k}={v!r}" for k, v in sorted(self.context.items()))
        return f"{self.message} ({details})"


class RetryableError(CdlError):
    """A transient failure: the same work may succeed when tried again."""

    grpc_code = "UNAVAILABLE"
    retryable = True


class UnavailableError(RetryableError):
    """A dependency (broker, object store, model server) cannot be reached."""


class DeadlineExceededError(RetryableError):
    """Work handed to another process was not answered in time; whether it was done is unknown
    (or, where the receiver drops it after the deadline, it was not)."""

    grpc_code = "DEADLINE_EXCEEDED"


class DistributedTrainingError(RetryableError):
    """A data-parallel training (torch.distributed, cdl.ml.distributed) failed: a process of it
    exited with an error nobody raised on purpose, or the run passed its deadline and was
    stopped. It may succeed when tried again (a port taken at rendezvous, a process killed)."""


class PermanentError(CdlError):
    """A failure that retrying will not fix; the input goes to the dead-letter topic."""

    grpc_code = "FAILED_PRECONDITION"


class DecodeError(PermanentError):
    """Bytes that cannot be decoded into the expected event or record."""

    grpc_code = "INVALID_ARGUMENT"


class InvalidInputError(PermanentError):
    """Input that decodes but breaks a rule (schema, shape, label set...)."""

    grpc_code = "INVALID_ARGUMENT"


class NotFoundError(PermanentError):
    """A named thing (dataset, model, object) does not exist."""

    grpc_code = "NOT_FOUND"


class ConflictError(PermanentError):
    """The request conflicts with existing state (e.g. a different schema)."""

    grpc_code = "ALREADY_EXISTS"


class UnauthenticatedError(PermanentError):
    """The caller did not prove who it is."""

    grpc_code = "UNAUTHENTICATED"


class PermissionDeniedError(PermanentError):
    """The caller is known but may not do this (e.g. load a model through the gateway)."""

    grpc_code = "PERMISSION_DENIED"


class UntrustedModelError(PermanentError):
    """A model repository entry without a valid signature by a trusted key (cdl.signing): it
    is never loaded."""

    grpc_code = "FAILED_PRECONDITION"


class TooLargeError(PermanentError):
    """Input larger than a limit allows."""

    grpc_code = "RESOURCE_EXHAUSTED"


class BudgetExceededError(PermanentError):
    """A client over its request budget (a key's rate at the gateway): RESOURCE_EXHAUSTED over
    gRPC, 429 over HTTP; it may try again later."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_code = 429


class UnimplementedError(PermanentError):
    """A method or path the component does not serve."""

    grpc_code = "UNIMPLEMENTED"


class ConfigError(CdlError):
    """Settings or installation are wrong; the process cannot start."""

    grpc_code = "FAILED_PRECONDITION"


class StackError(CdlError):
    """The local stack could not be started, checked or stopped."""
