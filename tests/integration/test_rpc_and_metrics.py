"""gRPC error mapping + health, and the HTTP health/metrics endpoint, on real servers."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdl.errors import InvalidInputError, NotFoundError
from cdl.observability import EVENTS, serve_http
from cdl.rpc import ErrorInterceptor, add_health
from cdl.v1 import ingest_pb2, ingest_pb2_grpc


class _Ingest(ingest_pb2_grpc.IngestServiceServicer):
    def GetDataset(self, request, context):  # noqa: N802
        if request.name == "boom":
            raise RuntimeError("unexpected")
        raise NotFoundError("dataset not registered", name=request.name)

    def RegisterDataset(self, request, context):  # noqa: N802
        raise InvalidInputError("labels must not be empty")


@pytest.fixture
def server():
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[ErrorInterceptor()])
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(_Ingest(), srv)
    add_health(srv, ["cdl.v1.IngestService"])
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}"
    srv.stop(None)


def test_errors_map_to_status_codes(server: str) -> None:
    with grpc.insecure_channel(server) as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetDataset(ingest_pb2.GetDatasetRequest(name="digits"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details() == "dataset not registered (name='digits')"
        with pytest.raises(grpc.RpcError) as info:
            stub.RegisterDataset(ingest_pb2.RegisterDatasetRequest())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            stub.GetDataset(ingest_pb2.GetDatasetRequest(name="boom"))
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "RuntimeError" in (info.value.details() or "")


def test_grpc_health_reports_serving(server: str) -> None:
    with grpc.insecure_channel(server) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "cdl.v1.IngestService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_http_health_and_prometheus_metrics() -> None:
    ready = {"ok": True}
    endpoint = serve_http(0, health=lambda: (ready["ok"], {"broker": "up" if ready["ok"] else "down"}))
    try:
        EVENTS.labels("data.raw", "test-group", "handled").inc()
        base = f"http://127.0.0.1:{endpoint.port}"
        with urllib.request.urlopen(f"{base}/metrics") as resp:
            text = resp.read().decode()
        assert 'cdl_events_total{group="test-group",outcome="handled",topic="data.raw"}' in text
        with urllib.request.urlopen(f"{base}/healthz") as resp:
            live = json.loads(resp.read())  # liveness: no loop of this process stuck (cdl.liveness)
            assert resp.status == 200 and live["status"] == "live" and isinstance(live["loops"], dict)
        with urllib.request.urlopen(f"{base}/readyz") as resp:
            assert json.loads(resp.read())["broker"] == "up"
        ready["ok"] = False
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{base}/readyz")
        assert info.value.code == 503
    finally:
        endpoint.close()
