"""The one error hierarchy of cdl.

Every error a cdl component raises on purpose derives from :class:`CdlError`.
Each class names the gRPC status code it maps to (as a string, so this module
stays free of grpc imports) and whether a consumer loop should retry it.
"""

from __future__ import annotations

__all__ = [
    "CdlError",
    "ConfigError",
    "ConflictError",
    "DecodeError",
    "InvalidInputError",
    "NotFoundError",
    "PermanentError",
    "RetryableError",
    "StackError",
    "UnauthenticatedError",
    "UnavailableError",
]


class CdlError(Exception):
    """Base of every error cdl raises on purpose."""

    grpc_code: str = "INTERNAL"
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


class ConfigError(CdlError):
    """Settings or installation are wrong; the process cannot start."""

    grpc_code = "FAILED_PRECONDITION"


class StackError(CdlError):
    """The local stack could not be started, checked or stopped."""
