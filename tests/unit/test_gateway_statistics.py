"""ModelStatistics summed over Triton servers (services/gateway/dataplane/statistics.py), the stream's
response framing (wire.stream_response / stream_error), and the one mapping of failures to
gRPC and HTTP statuses (services/gateway/status.py)."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from tritonclient.grpc import service_pb2

from cdl.errors import (
    HTTP_STATUS,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    TooLargeError,
    UnauthenticatedError,
    UnavailableError,
)
from services.gateway.dataplane import statistics, wire
from services.gateway.status import failure, http_failure


def _server(model: str, counts: dict[str, int], last: int, batch: int = 1) -> bytes:
    out = service_pb2.ModelStatisticsResponse()
    for version, n in counts.items():
        s = out.model_stats.add(name=model, version=version, last_inference=last, inference_count=n, execution_count=n)
        s.inference_stats.success.count, s.inference_stats.success.ns = n, 1000 * n
        s.inference_stats.queue.count, s.inference_stats.queue.ns = n, 10 * n
        b = s.batch_stats.add(batch_size=batch)
        b.compute_infer.count, b.compute_infer.ns = n, 7 * n
        s.response_stats["r"].success.count = n
        s.memory_usage.add(type="CPU", id=0, byte_size=100)
    out.model_stats.add(name="unrouted", version="1", inference_count=99)
    return bytes(out.SerializeToString())


def test_statistics_are_summed_per_version_over_servers_and_keep_only_served_versions() -> None:
    answers = [_server("m", {"1": 3, "2": 1, "9": 5}, last=10), _server("m", {"1": 4}, last=20, batch=2)]
    merged = service_pb2.ModelStatisticsResponse.FromString(statistics.merge(answers, {"m": {"1", "2"}}))
    by_version = {s.version: s for s in merged.model_stats}
    assert [(s.name, s.version) for s in merged.model_stats] == [("m", "1"), ("m", "2")]
    one = by_version["1"]
    assert one.inference_count == one.execution_count == 7 and one.last_inference == 20
    assert one.inference_stats.success.count == 7 and one.inference_stats.success.ns == 7000
    assert one.inference_stats.queue.ns == 70
    assert sorted((b.batch_size, b.compute_infer.count) for b in one.batch_stats) == [(1, 3), (2, 4)]
    assert one.response_stats["r"].success.count == 7
    assert len(one.memory_usage) == 1  # as the first server reports it, not summed
    assert by_version["2"].inference_count == 1
    same_batch = [_server("m", {"1": 3}, last=1), _server("m", {"1": 4}, last=2)]
    merged = service_pb2.ModelStatisticsResponse.FromString(statistics.merge(same_batch, {"m": {"1"}}))
    [(b_size, b_count)] = [(b.batch_size, b.compute_infer.count) for b in merged.model_stats[0].batch_stats]
    assert (b_size, b_count) == (1, 7)  # the batch size is the key, not a count
    assert statistics.merge([], {"m": {"1"}}) == b""


def test_a_statistics_request_is_parsed_or_refused() -> None:
    data = service_pb2.ModelStatisticsRequest(name="m", version="2").SerializeToString()
    assert statistics.parse_request(data) == ("m", "2")
    assert statistics.parse_request(b"") == ("", "")
    with pytest.raises(InvalidInputError):
        statistics.parse_request(b"\x0a\xff")


def test_stream_responses_parse_as_tritons() -> None:
    inner = service_pb2.ModelInferResponse(model_name="m", model_version="1", id="x")
    ok = service_pb2.ModelStreamInferResponse.FromString(wire.stream_response(inner.SerializeToString()))
    assert ok.infer_response == inner and not ok.error_message
    bad = service_pb2.ModelStreamInferResponse.FromString(wire.stream_error("unknown model 'n'"))
    assert bad.error_message == "unknown model 'n'" and not bad.HasField("infer_response")
    assert service_pb2.ModelStreamInferResponse.FromString(wire.stream_error("")).error_message
    with_id = service_pb2.ModelStreamInferResponse.FromString(wire.stream_error("bad shape", "req-7"))
    assert with_id.error_message == "bad shape" and with_id.infer_response.id == "req-7"  # which one failed


def test_one_mapping_of_failures_to_grpc_and_http_statuses() -> None:
    cases = [
        (UnauthenticatedError("k"), grpc.StatusCode.UNAUTHENTICATED, 401),
        (PermissionDeniedError("p"), grpc.StatusCode.PERMISSION_DENIED, 403),
        (NotFoundError("n"), grpc.StatusCode.NOT_FOUND, 404),
        (InvalidInputError("i"), grpc.StatusCode.INVALID_ARGUMENT, 400),
        (TooLargeError("t"), grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
        (UnavailableError("u"), grpc.StatusCode.UNAVAILABLE, 503),
        (RuntimeError("boom"), grpc.StatusCode.INTERNAL, 500),
    ]
    for exc, code, http in cases:
        assert failure(exc)[0] == code and http_failure(exc)[0] == http, exc
    assert failure(RuntimeError("secret detail"))[1] == "gateway error: RuntimeError"
    meta = grpc.aio.Metadata()
    triton = grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, meta, meta, "bad shape")
    assert failure(triton) == (grpc.StatusCode.INVALID_ARGUMENT, "bad shape")
    assert http_failure(triton) == (400, "bad shape")
    assert set(HTTP_STATUS) == {c.name for c in grpc.StatusCode}
