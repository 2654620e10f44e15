"""The rest of Triton's gRPC protocol through the gateway, on each data plane, in front of the
session's real Tritons (the harness of test_gateway_proxy): ``ModelStatistics`` summed over the
servers, ``ModelStreamInfer`` routed request by request across a rollout, the calls that must
not pass through refused before they reach Triton, and Triton's own load tool, perf_analyzer,
run against the gateway."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from services.gateway.dataplane.rest import RestApi
from services.gateway.dataplane.server import REFUSED
from services.gateway.routing import Route, RoutingTable
from tests.helpers import IN_CI, wait_for
from tests.integration import test_gateway_proxy as proxy
from tests.integration.test_gateway_proxy import HEADERS, KEY, MD, Gateway, _raw

# the harness's fixtures: an affine model (versions 1 and 2) and the gateway on each data plane
model = proxy.model
gateway = proxy.gateway


def _stats(client: tgrpc.InferenceServerClient, model: str, version: str = "", **kw: Any) -> dict[str, Any]:
    got = client.get_inference_statistics(model, version, as_json=True, **kw)
    return {s["version"]: s for s in got.get("model_stats", [])}


def _count(stats: dict[str, Any], version: str) -> int:
    return int(stats.get(version, {}).get("inference_count", 0))


def test_statistics_are_the_served_versions_summed_over_the_servers(
    gateway: Gateway, model: str, triton_grpcs: list[str]
) -> None:
    gw = tgrpc.InferenceServerClient(gateway.address)
    direct = [tgrpc.InferenceServerClient(u) for u in triton_grpcs]
    x = np.ones((1, 4), dtype=np.float32)
    inp = tgrpc.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    before = sum(_count(_stats(c, model), v) for c in direct for v in ("1", "2"))
    for i in range(12):  # spread over both servers by the pool
        gw.infer(model, [inp], model_version="2" if i % 3 == 0 else "", headers=HEADERS)
    # Triton counts a request once it has released it, which may be just after its answer
    wait_for(
        lambda: sum(_count(_stats(c, model), v) for c in direct for v in ("1", "2")) >= before + 12,
        10,
        "Triton's statistics counting the 12 requests",
    )
    mine = _stats(gw, model, headers=HEADERS)
    theirs = [_stats(c, model) for c in direct]
    assert set(mine) == {"1", "2"}  # the route's versions, in version order
    for v in ("1", "2"):
        assert _count(mine, v) == sum(_count(t, v) for t in theirs) > 0
        success = mine[v]["inference_stats"]["success"]
        assert int(success["count"]) == sum(int(t[v]["inference_stats"]["success"]["count"]) for t in theirs)
    assert set(_stats(gw, model, "2", headers=HEADERS)) == {"2"}
    everything = gw.get_inference_statistics("", headers=HEADERS, as_json=True)["model_stats"]
    assert {(s["name"], s["version"]) for s in everything} >= {(model, "1"), (model, "2")}
    for name, version, code in (("nope", "", "NOT_FOUND"), (model, "3", "NOT_FOUND")):
        with pytest.raises(InferenceServerException, match=code):
            gw.get_inference_statistics(name, version, headers=HEADERS)
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        gw.get_inference_statistics(model)


def test_calls_that_would_change_what_the_gateway_owns_are_refused_and_never_reach_triton(
    gateway: Gateway, model: str, triton_grpcs: list[str]
) -> None:
    for method in REFUSED:
        for md, expected in ((MD, grpc.StatusCode.PERMISSION_DENIED), ((), grpc.StatusCode.UNAUTHENTICATED)):
            with pytest.raises(grpc.RpcError) as err:
                _raw(gateway.address, method)(b"", metadata=md, timeout=10)
            assert err.value.code() == expected, (method, err.value.details())
    gw = tgrpc.InferenceServerClient(gateway.address)
    logs = [tgrpc.InferenceServerClient(url).get_log_settings(as_json=True) for url in triton_grpcs]
    with pytest.raises(InferenceServerException, match=r"PERMISSION_DENIED.*owns"):
        gw.unload_model(model, headers=HEADERS)
    with pytest.raises(InferenceServerException, match="PERMISSION_DENIED"):
        gw.load_model(model, headers=HEADERS)
    with pytest.raises(InferenceServerException, match="PERMISSION_DENIED"):
        gw.update_log_settings({"log_verbose_level": 1}, headers=HEADERS)
    for url, log_settings in zip(triton_grpcs, logs, strict=True):  # nothing was unloaded or changed
        client = tgrpc.InferenceServerClient(url)
        assert client.is_model_ready(model, "1") and client.is_model_ready(model, "2")
        assert client.get_log_settings(as_json=True) == log_settings


def test_a_stream_is_routed_request_by_request_across_a_rollout_and_a_rollback(gateway: Gateway, model: str) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = tgrpc.InferenceServerClient(gateway.address)
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=HEADERS)
    x = np.random.default_rng(3).normal(size=(2, 4)).astype(np.float32)
    inp = tgrpc.InferInput("input", [2, 4], "FP32")
    inp.set_data_from_numpy(x)

    def batch(n: int, tag: str, name: str = "") -> list[tuple[Any, Any]]:
        for i in range(n):
            client.async_stream_infer(name or model, [inp], request_id=f"{tag}-{i}")
        return [answers.get(timeout=15) for _ in range(n)]

    def versions(got: list[tuple[Any, Any]]) -> list[str]:
        assert all(e is None for _, e in got), [e for _, e in got if e is not None]
        for r, _ in got:
            np.testing.assert_allclose(r.as_numpy("output"), x @ np.arange(12, dtype=np.float32).reshape(4, 3) / 10
                                       + np.array([0.5, -1.0, 2.0], np.float32), rtol=1e-5, atol=1e-5)  # fmt: skip
        return [r.get_response().model_version for r, _ in got]

    try:
        assert versions(batch(10, "before")) == ["1"] * 10
        gateway.set_route(Route(model, 2, candidate=1))  # promoted: the same stream, the new version
        assert versions(batch(10, "after")) == ["2"] * 10
        gateway.set_route(Route(model, 1, candidate=2))  # rolled back
        assert versions(batch(10, "back")) == ["1"] * 10
        # a request that fails is an error in the stream, which goes on
        [(_, error)] = batch(1, "bad", name="nope")
        assert error is not None and "unknown model" in str(error)
        assert versions(batch(3, "again")) == ["1"] * 3
    finally:
        client.stop_stream()
    gateway.settle()
    served = [(v, ok) for m, v, ok, _ in gateway.outcomes.served if m == model]
    assert served.count((1, True)) >= 23 and served.count((2, True)) >= 10

    # a stream without a key is refused as a whole
    refused: queue.Queue[tuple[Any, Any]] = queue.Queue()
    anon = tgrpc.InferenceServerClient(gateway.address)
    anon.start_stream(callback=lambda result, error: refused.put((result, error)))
    try:
        # the refusal may come before the first request is sent: the stream is then closed already
        with contextlib.suppress(InferenceServerException):
            anon.async_stream_infer(model, [inp])
        result, error = refused.get(timeout=15)
        assert result is None and "UNAUTHENTICATED" in str(error)
    finally:
        anon.stop_stream()


def _perf_analyzer() -> str | None:
    found = shutil.which("perf_analyzer")
    if found is None and IN_CI:
        pytest.fail("perf_analyzer is missing in CI (scripts/setup.sh installs it)")
    if found is None:
        pytest.skip("perf_analyzer is not installed (run scripts/setup.sh)")
    return found


def _run_perf_analyzer(gateway: Gateway, model: str, protocol: str, url: str) -> None:
    """Triton's load tool against the gateway for a few seconds: it runs, and the gateway served it."""
    binary = _perf_analyzer()
    gateway.settle()
    before = len(gateway.outcomes.served)
    argv = [
        str(binary),
        "-m", model, "-u", url, "-i", protocol, "-H", f"authorization: Bearer {KEY}",
        "--concurrency-range", "2", "--measurement-interval", "1000", "--max-trials", "4",
        "--stability-percentage", "100",
    ]  # fmt: skip
    run = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert run.returncode == 0, (protocol, run.stdout[-3000:] + run.stderr[-3000:])
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", run.stdout)
    assert throughput and float(throughput.group(1)) > 0, run.stdout[-3000:]
    assert "Server:" in run.stdout, run.stdout[-3000:]  # its server-side figures: the gateway's statistics
    gateway.settle()
    assert len(gateway.outcomes.served) - before > 10, protocol


def test_perf_analyzer_runs_against_the_gateway_over_grpc(gateway: Gateway, model: str) -> None:
    _run_perf_analyzer(gateway, model, "grpc", gateway.address)


def test_perf_analyzer_runs_against_the_gateway_over_http(shipped: Gateway, rest: str, model: str) -> None:
    _run_perf_analyzer(shipped, model, "http", rest)


# --------------------------------------------------------------------------- REST/HTTP v2


@pytest.fixture
def shipped(model: str, triton_grpcs: list[str], triton_https: list[str]) -> Iterator[Gateway]:
    """The gateway on the data plane it ships with: the native lane in front of both ports."""
    table = RoutingTable()
    table.set(Route(model, 1, candidate=2))
    gw = Gateway(triton_grpcs, table, lane=True, http=triton_https)
    assert gw.run(gw.pool.wait_ready(2))
    yield gw
    gw.close()


@pytest.fixture(params=["native", "python"])
def rest(request: pytest.FixtureRequest, shipped: Gateway) -> Iterator[str]:
    """The gateway's REST endpoint: the lane's port (infer served natively, the rest by the REST
    server behind it), or the Python REST server alone (data_plane python), on the same service."""
    if request.param == "native":
        yield shipped.http_address
        return
    api = RestApi(shipped.service, proxy.MAX_BYTES)
    port = shipped.run(api.start("127.0.0.1", 0))
    yield f"127.0.0.1:{port}"
    shipped.run(api.stop())


def _http(
    url: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None, method: str = ""
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://{url}{path}", data=body, headers=headers or {}, method=method or None)
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _infer_json(x: np.ndarray[Any, Any], **extra: Any) -> bytes:
    doc = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return json.dumps(doc | extra).encode()


AFFINE_W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
AFFINE_B = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def test_rest_serves_the_protocol_with_json_and_binary_tensors(
    shipped: Gateway, rest: str, model: str, triton_grpcs: list[str]
) -> None:
    assert _http(rest, "/v2/health/live")[0] == 200 and _http(rest, "/v2/health/ready")[0] == 200
    status, _, body = _http(rest, "/v2", headers=HEADERS)
    server = tgrpc.InferenceServerClient(triton_grpcs[0]).get_server_metadata(as_json=True)
    assert status == 200 and json.loads(body)["version"] == server["version"]
    status, _, body = _http(rest, f"/v2/models/{model}", headers=HEADERS)
    meta = json.loads(body)
    assert status == 200 and meta["name"] == model and meta["inputs"][0] == {
        "name": "input", "datatype": "FP32", "shape": [-1, 4]}  # fmt: skip
    assert _http(rest, f"/v2/models/{model}/ready", headers=HEADERS)[0] == 200
    assert _http(rest, f"/v2/models/{model}/versions/2/ready", headers=HEADERS)[0] == 200
    assert _http(rest, f"/v2/models/{model}/versions/3/ready", headers=HEADERS)[0] == 400
    # JSON in, JSON out: routed to the stable version, the gateway's id on it
    x = np.random.default_rng(5).normal(size=(2, 4)).astype(np.float32)
    status, headers, body = _http(rest, f"/v2/models/{model}/infer", _infer_json(x), HEADERS)
    assert status == 200 and headers["Content-Type"].startswith("application/json"), body
    answer = json.loads(body)
    assert answer["model_version"] == "1" and answer["id"].startswith("gw-")
    # on the lane's port the lane itself served it (its ids), not the REST server behind it
    native = rest == shipped.http_address
    assert answer["id"].startswith(shipped.service.id_prefix + "l") == native, answer["id"]
    # an empty id is none (as perf_analyzer sends it): the gateway's goes in its place
    status, _, body = _http(rest, f"/v2/models/{model}/infer", _infer_json(x, id=""), HEADERS)
    empty = json.loads(body)["id"]
    assert status == 200 and empty.startswith(shipped.service.id_prefix + "l") == native and empty != answer["id"]
    [out] = answer["outputs"]
    assert out["name"] == "output" and out["shape"] == [2, 3] and out["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(out["data"]).reshape(2, 3), x @ AFFINE_W + AFFINE_B, rtol=1e-5, atol=1e-5)
    status, _, body = _http(rest, f"/v2/models/{model}/versions/2/infer", _infer_json(x, id="mine"), HEADERS)
    assert status == 200 and json.loads(body)["model_version"] == "2" and json.loads(body)["id"] == "mine"
    # tritonclient.http, unchanged: binary tensors both ways, and JSON
    client = thttp.InferenceServerClient(rest)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model, headers=HEADERS)
    for binary in (True, False):
        inp = thttp.InferInput("input", [2, 4], "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out_req = [thttp.InferRequestedOutput("output", binary_data=binary)]
        # (a copy: tritonclient.http adds its binary header to the dict it is given)
        result = client.infer(model, [inp], outputs=out_req, headers=dict(HEADERS), request_id=f"tc-{binary}")
        np.testing.assert_allclose(result.as_numpy("output"), x @ AFFINE_W + AFFINE_B, rtol=1e-5, atol=1e-5)
        assert result.get_response()["id"] == f"tc-{binary}"
    config = client.get_model_config(model, headers=HEADERS)
    assert config["name"] == model and config["max_batch_size"] == 16
    stats = client.get_inference_statistics(model, headers=HEADERS)["model_stats"]
    assert {s["version"] for s in stats} == {"1", "2"} and all(isinstance(s["inference_count"], int) for s in stats)
    assert client.get_model_repository_index(headers=HEADERS)
    shipped.settle()
    assert {(m, v, ok) for m, v, ok, _ in shipped.outcomes.served if m == model} >= {(model, 1, True), (model, 2, True)}


def test_rest_errors_are_json_with_the_right_codes(shipped: Gateway, rest: str, model: str) -> None:
    x = np.ones((2, 4), np.float32)
    infer = f"/v2/models/{model}/infer"

    def error(path: str, body: bytes | None, headers: dict[str, str], method: str = "") -> tuple[int, str]:
        status, _, raw = _http(rest, path, body, headers, method)
        return status, json.loads(raw)["error"]

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        assert error(infer, _infer_json(x), headers)[0] == 401
        assert error(f"/v2/models/{model}", None, headers)[0] == 401
    assert error("/v2/models/nope/infer", _infer_json(x), HEADERS) == (404, "unknown model 'nope'")
    assert error(f"/v2/models/{model}/versions/3/infer", _infer_json(x), HEADERS)[0] == 404
    assert error(f"/v2/models/{model}/versions/3", None, HEADERS)[0] == 404
    malformed = [
        b"{not json",
        b"[]",
        b'{"inputs": []}',
        json.dumps({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [1.0] * 7}]}).encode(),
        json.dumps({"inputs": [{"name": "input", "shape": [2, -4], "datatype": "FP32", "data": []}]}).encode(),
        json.dumps({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP99", "data": [1] * 8}]}).encode(),
        json.dumps({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": ["a"] * 8}]}).encode(),
        json.dumps({"inputs": [{"name": "input", "shape": [2**40, 2**40], "datatype": "FP32", "data": [1]}]}).encode(),
        b"[" * 100_000,
    ]
    for body in malformed:
        status, message = error(infer, body, HEADERS)
        assert status == 400 and message, (body[:80], status, message)
    # binary tensors that lie about their size
    head = json.dumps({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 32}}]}).encode()  # fmt: skip
    for tail, length in ((x.tobytes()[:16], len(head)), (x.tobytes() + b"xx", len(head)), (x.tobytes(), 10**6)):
        status, _ = error(infer, head + tail, {**HEADERS, "Inference-Header-Content-Length": str(length)})
        assert status == 400
    # Triton's own refusal (an input it does not have), passed through with its message
    wrong = json.dumps({"inputs": [{"name": "wrong", "shape": [2, 4], "datatype": "FP32", "data": [1.0] * 8}]})
    status, message = error(infer, wrong.encode(), HEADERS)
    assert status == 400 and "wrong" in message
    # larger than the gateway's limit
    assert error(infer, b" " * (proxy.MAX_BYTES + 1), HEADERS)[0] == 413
    # what would change what the gateway owns: refused, never forwarded
    for path in (f"/v2/repository/models/{model}/unload", f"/v2/repository/models/{model}/load",
                 "/v2/systemsharedmemory/region/r/register", "/v2/logging", "/v2/trace/setting"):  # fmt: skip
        assert error(path, b"{}", HEADERS)[0] == 403, path
        assert error(path, b"{}", {})[0] == 401, path
    assert _http(rest, f"/v2/models/{model}/ready", headers=HEADERS)[0] == 200
    assert error("/v2/nothing/here", None, HEADERS)[0] == 404
    shipped.settle()
    assert all(ok for m, _, ok, _ in shipped.outcomes.served if m == model)  # client errors say nothing of versions


def test_a_canary_rollout_under_http_load_fails_no_request(shipped: Gateway, rest: str, model: str) -> None:
    x = np.ones((1, 4), np.float32)
    failures: list[tuple[int, bytes]] = []
    versions: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            status, _, body = _http(rest, f"/v2/models/{model}/infer", _infer_json(x), HEADERS)
            if status != 200:
                failures.append((status, body))
            else:
                versions.append(json.loads(body)["model_version"])

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        shipped.set_route(Route(model, 1, candidate=3, canary=0.5))  # 3 is loaded nowhere: every canary fails
        time.sleep(1.5)
        shipped.set_route(Route(model, 2, candidate=1))  # promoted
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(20)
    assert not failures and len(versions) > 20, failures[:3]
    assert set(versions) == {"1", "2"}
    shipped.set_route(Route(model, 1, candidate=2))
