"""The rest of Triton's gRPC protocol through the gateway, on each data plane, in front of the
session's real Tritons (the harness of test_gateway_proxy): ``ModelStatistics`` summed over the
servers, ``ModelStreamInfer`` routed request by request across a rollout, the calls that must
not pass through refused before they reach Triton, and Triton's own load tool, perf_analyzer,
run against the gateway."""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from services.gateway.routing import Route
from services.gateway.server import REFUSED
from tests.helpers import IN_CI
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
    for i in range(12):  # spread over both servers by the pool
        gw.infer(model, [inp], model_version="2" if i % 3 == 0 else "", headers=HEADERS)
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


def test_perf_analyzer_runs_against_the_gateway(gateway: Gateway, model: str) -> None:
    binary = _perf_analyzer()
    before = len(gateway.outcomes.served)
    argv = [
        str(binary),
        "-m", model, "-u", gateway.address, "-i", "grpc", "-H", f"authorization: Bearer {KEY}",
        "--concurrency-range", "2", "--measurement-interval", "1000", "--max-trials", "4",
        "--stability-percentage", "100",
    ]  # fmt: skip
    run = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", run.stdout)
    assert throughput and float(throughput.group(1)) > 0, run.stdout[-3000:]
    gateway.settle()
    assert len(gateway.outcomes.served) - before > 10
    assert "Server:" in run.stdout  # its server-side figures: the gateway's statistics
