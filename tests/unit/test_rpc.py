"""cdl.rpc.ErrorInterceptor on a real in-process gRPC server, for all four kinds of rpc.

The test service speaks raw bytes (no serializers). Each request message names
what the servicer does with it: ``abort`` calls ``context.abort(NOT_FOUND)``,
``raise:<Name>`` raises that error, anything else is echoed back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from cdl.errors import (
    CdlError,
    ConfigError,
    ConflictError,
    DecodeError,
    InvalidInputError,
    NotFoundError,
    PermanentError,
    RetryableError,
    StackError,
    UnauthenticatedError,
    UnavailableError,
)
from cdl.rpc import ErrorInterceptor, _Context, _fail, status_code

SERVICE = "cdl.test.Errors"
KINDS = ["unary_unary", "stream_unary", "unary_stream", "stream_stream"]
STREAMING_RESPONSE = ["unary_stream", "stream_stream"]

ERRORS: list[tuple[type[CdlError], grpc.StatusCode]] = [
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (DecodeError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConflictError, grpc.StatusCode.ALREADY_EXISTS),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermanentError, grpc.StatusCode.FAILED_PRECONDITION),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (RetryableError, grpc.StatusCode.UNAVAILABLE),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (StackError, grpc.StatusCode.INTERNAL),
    (CdlError, grpc.StatusCode.INTERNAL),
]


def _exception(name: str) -> Exception:
    if name == "ValueError":
        return ValueError("secret detail")
    if name == "RpcError":  # e.g. from a call the servicer makes to another service
        return grpc.RpcError("downstream failed")
    cls = {cls.__name__: cls for cls, _ in ERRORS}[name]
    return cls("it failed", name="x")


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, str], ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def _act(message: bytes, context: grpc.ServicerContext) -> bytes:
    if message == b"abort":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if message == b"abort_with_status":
        context.abort_with_status(_Status(grpc.StatusCode.PERMISSION_DENIED, "not yours", (("why", "owner"),)))
    if message.startswith(b"raise:"):
        raise _exception(message.removeprefix(b"raise:").decode())
    if message == b"peer":  # the rest of the context is the real one's
        return context.peer().encode()
    return message


def _unary_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    return _act(request, context)


def _stream_unary(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return b",".join(_act(r, context) for r in requests)


def _unary_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    # The first part is handled before the iterator is returned, the rest while
    # the response streams out (after the earlier parts were sent).
    first, *rest = request.split(b",")
    head = _act(first, context)

    def stream() -> Iterator[bytes]:
        yield head
        for part in rest:
            yield _act(part, context)

    return stream()


def _stream_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for r in requests:
        yield _act(r, context)


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "unary_unary": grpc.unary_unary_rpc_method_handler(_unary_unary),
        "stream_unary": grpc.stream_unary_rpc_method_handler(_stream_unary),
        "unary_stream": grpc.unary_stream_rpc_method_handler(_unary_stream),
        "stream_stream": grpc.stream_stream_rpc_method_handler(_stream_stream),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        server.stop(None)


def _call(channel: grpc.Channel, kind: str, messages: list[bytes], received: list[bytes] | None = None) -> list[bytes]:
    """Call ``kind`` with ``messages`` (joined by commas for a unary request); the responses, in order.

    Responses are appended to ``received`` as they arrive, so a caller sees
    what came before an error.
    """
    out = received if received is not None else []
    path = f"/{SERVICE}/{kind}"
    if kind == "unary_unary":
        unary_unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
        out.append(unary_unary(b",".join(messages), timeout=10))
    elif kind == "stream_unary":
        stream_unary: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(path)
        out.append(stream_unary(iter(messages), timeout=10))
    elif kind == "unary_stream":
        unary_stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
        out.extend(unary_stream(b",".join(messages), timeout=10))
    else:
        stream_stream: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(path)
        out.extend(stream_stream(iter(messages), timeout=10))
    return out


def _error(channel: grpc.Channel, kind: str, messages: list[bytes], received: list[bytes] | None = None) -> grpc.Call:
    with pytest.raises(grpc.RpcError) as info:
        _call(channel, kind, messages, received)
    error = info.value
    assert isinstance(error, grpc.Call)
    return error


@pytest.mark.parametrize("kind", KINDS)
def test_responses_pass_through(channel: grpc.Channel, kind: str) -> None:
    if kind in STREAMING_RESPONSE:
        assert _call(channel, kind, [b"a", b"b", b"c"]) == [b"a", b"b", b"c"]
    elif kind == "stream_unary":
        assert _call(channel, kind, [b"a", b"b", b"c"]) == [b"a,b,c"]
    else:
        assert _call(channel, kind, [b"a"]) == [b"a"]
    assert _call(channel, kind, [b"peer"])[0].startswith(b"ipv4:127.0.0.1:")


@pytest.mark.parametrize("kind", KINDS)
def test_abort_reaches_the_client_unchanged(channel: grpc.Channel, kind: str) -> None:
    error = _error(channel, kind, [b"abort"])
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "no such thing"


@pytest.mark.parametrize("kind", KINDS)
def test_abort_with_status_keeps_code_details_and_trailers(channel: grpc.Channel, kind: str) -> None:
    error = _error(channel, kind, [b"abort_with_status"])
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "not yours"
    assert ("why", "owner") in tuple(error.trailing_metadata() or ())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("cls", "code"), ERRORS, ids=[cls.__name__ for cls, _ in ERRORS])
def test_cdl_errors_map_to_their_codes(
    channel: grpc.Channel, kind: str, cls: type[CdlError], code: grpc.StatusCode
) -> None:
    assert status_code(cls("x")) == code
    error = _error(channel, kind, [f"raise:{cls.__name__}".encode()])
    assert error.code() == code
    assert error.details() == "it failed (name='x')"


@pytest.mark.parametrize("kind", KINDS)
def test_unexpected_errors_are_internal_generic_and_logged(
    channel: grpc.Channel, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="cdl.rpc"):
        error = _error(channel, kind, [b"raise:ValueError"])
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error: ValueError"
    [record] = [r for r in caplog.records if r.name == "cdl.rpc"]
    assert record.getMessage() == "unhandled error in rpc"
    assert record.__dict__["method"] == f"/{SERVICE}/{kind}"
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)
    assert "secret detail" in caplog.text  # in the log (traceback), never in the client's details


@pytest.mark.parametrize("kind", STREAMING_RESPONSE)
@pytest.mark.parametrize(
    ("last", "code", "details"),
    [
        (b"abort", grpc.StatusCode.NOT_FOUND, "no such thing"),
        (b"raise:NotFoundError", grpc.StatusCode.NOT_FOUND, "it failed (name='x')"),
        (b"raise:UnavailableError", grpc.StatusCode.UNAVAILABLE, "it failed (name='x')"),
        (b"raise:ValueError", grpc.StatusCode.INTERNAL, "internal error: ValueError"),
    ],
    ids=["abort", "NotFoundError", "UnavailableError", "ValueError"],
)
def test_errors_mid_stream_map_after_the_messages_before_them(
    channel: grpc.Channel, kind: str, last: bytes, code: grpc.StatusCode, details: str
) -> None:
    received: list[bytes] = []
    error = _error(channel, kind, [b"a", b"b", last, b"never"], received)
    assert received == [b"a", b"b"]
    assert error.code() == code
    assert error.details() == details


def test_unknown_methods_stay_unimplemented(channel: grpc.Channel) -> None:
    missing: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{SERVICE}/missing")
    with pytest.raises(grpc.RpcError) as info:
        missing(b"x", timeout=10)
    assert isinstance(info.value, grpc.Call)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("kind", KINDS)
def test_a_servicers_own_rpc_error_is_internal(channel: grpc.Channel, kind: str) -> None:
    error = _error(channel, kind, [b"raise:RpcError"])
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error: RpcError"


class _EndedContext:
    """A context whose call is over (the client cancelled): aborting it again must not happen."""

    def is_active(self) -> bool:
        return False

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"aborted {code} {details}")


def test_a_cancelled_request_stream_is_left_to_grpc(caplog: pytest.LogCaptureFixture) -> None:
    # grpc's request iterator raises an RpcError once the client has cancelled;
    # the interceptor re-raises it for grpc (which knows it) without logging it.
    context: Any = _EndedContext()
    with caplog.at_level(logging.ERROR, logger="cdl.rpc"):
        _fail("/x/y", context, _Context(context), grpc.RpcError())
    assert not caplog.records
