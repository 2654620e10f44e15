"""The gateway as a real process in front of two real Triton servers: rollouts under load.

Model versions are tiny ONNX entries written to MinIO (tests/models.py) and
announced on the test's ``model.compressed`` topic, as the compressor does.
Clients are tritonclient's gRPC clients in threads, sending continuously; a
single failed client request fails the test.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections import Counter
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from cdl.auth import hash_key
from cdl.events import Event, decode
from cdl.kafka import Producer
from cdl.signing import Signer, public_key_text
from cdl.store import ObjectStore
from cdl.triton import TRITON_BUCKET
from cdl.v1 import admin_pb2, admin_pb2_grpc, events_pb2
from tests.helpers import read_committed, read_topic, wait_for
from tests.models import affine_onnx, failing_onnx, write_affine, write_onnx, write_slow_affine

N_IN, N_OUT = 4, 3
FAST = {"canary_steps": "[0.2, 0.5, 1.0]", "min_samples": "15", "step_min_s": "0.3", "warmup_requests": "2"}
RNG = np.random.default_rng(3)
X = RNG.normal(size=(1, N_IN)).astype(np.float32) + 2.0  # every feature >= 1 (the failing model errs)


def _weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    return r.normal(size=(N_IN, N_OUT)).astype(np.float32), r.normal(size=N_OUT).astype(np.float32)


def _announce(bootstrap: str, topic: str, model: str, version: int) -> None:
    msg = events_pb2.ModelCompressed(model=model, version=version, ok=True, chosen_variant="fp32")
    producer = Producer(bootstrap)
    producer.send(topic, Event(msg, source="/cdl/test", id=f"{model}/v{version}/compressed", key=model))
    producer.flush()


def _deployed(bootstrap: str, topic: str, model: str) -> list[Any]:
    recs = read_committed(bootstrap, topic, expected=10**6, timeout_s=1)
    out = [decode(r.key, r.value, list(r.headers.items())).payload for r in recs]
    return [d for d in out if d.model == model]


def _wait_state(bootstrap: str, topic: str, model: str, version: int, state: int, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for d in _deployed(bootstrap, topic, model):
            if d.version == version and d.state == state:
                return d
        time.sleep(0.3)
    seen = [(d.version, events_pb2.RolloutState.Name(d.state), d.reason) for d in _deployed(bootstrap, topic, model)]
    raise AssertionError(f"v{version} never reached {events_pb2.RolloutState.Name(state)}: {seen}")


def _infer(client: tgrpc.InferenceServerClient, model: str, headers: dict[str, str] | None = None) -> Any:
    inp = tgrpc.InferInput("input", [1, N_IN], "FP32")
    inp.set_data_from_numpy(X)
    return client.infer(model, [inp], headers=headers, client_timeout=10)


def _wait_serving(endpoint: str, model: str, version: int, headers: dict[str, str] | None = None) -> None:
    client = tgrpc.InferenceServerClient(endpoint)
    deadline = time.monotonic() + 60
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if _infer(client, model, headers).get_response().model_version == str(version):
                return
        except InferenceServerException as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"{model} v{version} never served: {last}")


class Load:
    """Client threads sending requests until stopped; every failure and served version recorded."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        threads: int = 4,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.endpoint, self.model, self.headers = endpoint, model, headers
        self.failures: list[str] = []
        self.versions: Counter[str] = Counter()
        self.outputs: dict[str, set[bytes]] = {}
        self.last: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self) -> None:
        client = tgrpc.InferenceServerClient(self.endpoint)
        while not self._stop.is_set():
            try:
                result = _infer(client, self.model, self.headers)
            except InferenceServerException as exc:
                self.failures.append(f"{exc.status()}: {exc.message()}")
                continue
            version = result.get_response().model_version
            self.versions[version] += 1
            self.outputs.setdefault(version, set()).add(result.as_numpy("output").round(4).tobytes())
            self.last = [*self.last[-50:], version]
        client.close()

    def ends_on(self, version: str, n: int, timeout_s: float = 30) -> None:
        """Wait until the last ``n`` answers all came from ``version``."""
        wait_for(lambda: len(self.last) >= n and set(self.last[-n:]) == {version}, timeout_s, f"v{version} alone")


def _expected(seed: int) -> bytes:
    w, b = _weights(seed)
    return (X @ w + b).astype(np.float32).round(4).tobytes()


def _loaded(triton: list[str], model: str) -> list[set[str]]:
    out = []
    for ep in triton:
        client = tgrpc.InferenceServerClient(ep)
        index = client.get_model_repository_index(as_json=True).get("models", [])
        out.append({m["version"] for m in index if m["name"] == model and m.get("state") == "READY"})
        client.close()
    return out


def test_rollout_under_load_fails_no_request_and_unloads_v1(
    gateway_factory: Any, gateway_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore, triton_grpcs
) -> None:
    gw = gateway_factory(**FAST).start()
    model = f"gw_{uuid.uuid4().hex[:8]}"
    write_affine(object_store, model, 1, *_weights(1))
    _announce(kafka_bootstrap, gateway_topics["compressed"], model, 1)
    _wait_serving(gw.grpc, model, 1)
    assert _wait_state(kafka_bootstrap, gateway_topics["deployed"], model, 1, events_pb2.ROLLOUT_STATE_PROMOTED)
    assert json.loads(object_store.get_bytes("cdl-models", f"{model}/serving.json")) == {"version": 1}

    with Load(gw.grpc, model) as load:
        wait_for(lambda: load.versions["1"] >= 20, 30, "v1 serving the load")
        write_affine(object_store, model, 2, *_weights(2))
        _announce(kafka_bootstrap, gateway_topics["compressed"], model, 2)
        _wait_state(kafka_bootstrap, gateway_topics["deployed"], model, 2, events_pb2.ROLLOUT_STATE_PROMOTED)
        load.ends_on("2", 20)
    assert load.failures == []
    assert load.versions["1"] > 0 and load.versions["2"] > 0
    assert set(load.last[-20:]) == {"2"}  # traffic ended on v2
    assert load.outputs["1"] == {_expected(1)} and load.outputs["2"] == {_expected(2)}
    states = [(d.version, d.state) for d in _deployed(kafka_bootstrap, gateway_topics["deployed"], model)]
    assert (2, events_pb2.ROLLOUT_STATE_CANARY) in states
    assert json.loads(object_store.get_bytes("cdl-models", f"{model}/serving.json")) == {"version": 2}
    deadline = time.monotonic() + 20
    while _loaded(triton_grpcs, model) != [{"2"}, {"2"}] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _loaded(triton_grpcs, model) == [{"2"}, {"2"}]  # v1 unloaded from both servers


def test_with_trusted_keys_only_signed_unchanged_versions_are_loaded(
    gateway_factory: Any,
    gateway_topics: dict[str, str],
    kafka_bootstrap: str,
    object_store: ObjectStore,
    triton_grpcs: list[str],
) -> None:
    """Signed models (cdl.signing): an unsigned, a tampered and a forged candidate never reach a
    Triton server, each failing its rollout with the reason in model.deployed; the stable version
    serves throughout, and a signed one rolls out."""
    signer, forger = Signer(Ed25519PrivateKey.generate()), Signer(Ed25519PrivateKey.generate())
    trusted = json.dumps([public_key_text(signer.public_key)])
    gw = gateway_factory(**FAST, trusted_keys=trusted).start()
    model = f"gw_{uuid.uuid4().hex[:8]}"
    deployed, compressed = gateway_topics["deployed"], gateway_topics["compressed"]
    write_affine(object_store, model, 1, *_weights(1), signer=signer)
    _announce(kafka_bootstrap, compressed, model, 1)
    _wait_serving(gw.grpc, model, 1)

    write_affine(object_store, model, 2, *_weights(2))  # unsigned
    write_affine(object_store, model, 3, *_weights(3), signer=signer)
    object_store.put_bytes(TRITON_BUCKET, f"{model}/3/model.onnx", affine_onnx(*_weights(9)))  # swapped after
    write_affine(object_store, model, 4, *_weights(4), signer=forger)  # a key the gateway does not trust
    with Load(gw.grpc, model) as load:
        for version, reason in (
            (2, "is not signed"),
            (3, "model.onnx differs from its signed digest"),
            (4, "untrusted"),
        ):
            _announce(kafka_bootstrap, compressed, model, version)
            failed = _wait_state(kafka_bootstrap, deployed, model, version, events_pb2.ROLLOUT_STATE_FAILED)
            assert reason in failed.reason, failed.reason
        assert _loaded(triton_grpcs, model) == [{"1"}, {"1"}]  # none of them reached a server
        assert load.failures == [] and set(load.versions) == {"1"}

        write_affine(object_store, model, 5, *_weights(5), signer=signer)
        _announce(kafka_bootstrap, compressed, model, 5)
        _wait_state(kafka_bootstrap, deployed, model, 5, events_pb2.ROLLOUT_STATE_PROMOTED)
        load.ends_on("5", 10)
    assert load.failures == [] and load.outputs["5"] == {_expected(5)}


def test_bad_candidates_never_serve_and_are_rolled_back(
    gateway_factory: Any, gateway_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    gw = gateway_factory(**FAST).start()
    model = f"gw_{uuid.uuid4().hex[:8]}"
    deployed, compressed = gateway_topics["deployed"], gateway_topics["compressed"]
    write_affine(object_store, model, 1, *_weights(1))
    _announce(kafka_bootstrap, compressed, model, 1)
    _wait_serving(gw.grpc, model, 1)
    w, b = _weights(1)
    with Load(gw.grpc, model) as load:
        # v2 cannot load (not ONNX)
        write_onnx(object_store, model, 2, b"this is not an onnx model", N_IN, N_OUT)
        _announce(kafka_bootstrap, compressed, model, 2)
        failed = _wait_state(kafka_bootstrap, deployed, model, 2, events_pb2.ROLLOUT_STATE_FAILED)
        assert failed.reason
        # v3 loads and warms up, then fails every real request
        write_onnx(object_store, model, 3, failing_onnx(N_IN, N_OUT), N_IN, N_OUT)
        _announce(kafka_bootstrap, compressed, model, 3)
        back = _wait_state(kafka_bootstrap, deployed, model, 3, events_pb2.ROLLOUT_STATE_ROLLED_BACK)
        assert "error" in back.reason
        # v4 gives the same answers, 0.15 s later
        write_slow_affine(object_store, model, 4, w, b, delay_s=0.15)
        _announce(kafka_bootstrap, compressed, model, 4)
        slow = _wait_state(kafka_bootstrap, deployed, model, 4, events_pb2.ROLLOUT_STATE_ROLLED_BACK)
        assert "latency" in slow.reason
        # v4's requests in flight at the rollback still answer (0.15 s each, more on a busy
        # machine), after other threads' fast v1 answers: the last 20 answers count only once
        # anything sent before the rollback has had 2 s to come back (a late v4 answer could
        # otherwise land after this loop, while Load's threads finish)
        settled = time.monotonic() + 2.0
        deadline = time.monotonic() + 12
        while (set(load.last[-20:]) != {"1"} or time.monotonic() < settled) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert load.failures == []  # no client request failed because of any of them
    assert set(load.last[-20:]) == {"1"}
    assert load.outputs["1"] == {_expected(1)} and "3" not in load.outputs
    assert json.loads(object_store.get_bytes("cdl-models", f"{model}/serving.json")) == {"version": 1}


def test_shadow_clients_only_see_the_stable_answers(
    gateway_factory: Any, gateway_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    # (latency is not what this test is about: a slow moment of a loaded box must not decide first)
    gw = gateway_factory(**FAST, rollout_mode="shadow", max_latency_ratio="1000").start()
    model = f"gw_{uuid.uuid4().hex[:8]}"
    deployed, compressed = gateway_topics["deployed"], gateway_topics["compressed"]
    write_affine(object_store, model, 1, *_weights(1))
    _announce(kafka_bootstrap, compressed, model, 1)
    _wait_serving(gw.grpc, model, 1)
    with Load(gw.grpc, model) as load:
        w, b = _weights(1)
        write_affine(object_store, model, 2, -w, -b)  # always a different top-1
        _announce(kafka_bootstrap, compressed, model, 2)
        _wait_state(kafka_bootstrap, deployed, model, 2, events_pb2.ROLLOUT_STATE_SHADOW)
        back = _wait_state(kafka_bootstrap, deployed, model, 2, events_pb2.ROLLOUT_STATE_ROLLED_BACK)
        assert "agree" in back.reason
    assert load.failures == []
    assert set(load.versions) == {"1"} and load.outputs["1"] == {_expected(1)}


def _admin(endpoint: str, key: str | None) -> tuple[Any, Any]:
    channel = grpc.insecure_channel(endpoint)
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    return admin_pb2_grpc.ModelAdminStub(channel), metadata


def test_manual_rollout_waits_for_approve_and_keys_are_required(
    gateway_factory: Any, gateway_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    key, admin_key = "inference-key", "admin-key"
    gw = gateway_factory(
        **FAST,
        rollout_mode="manual",
        api_key_hashes=json.dumps([hash_key(key)]),
        admin_key_hashes=json.dumps([hash_key(admin_key)]),
    ).start()
    model = f"gw_{uuid.uuid4().hex[:8]}"
    deployed, compressed = gateway_topics["deployed"], gateway_topics["compressed"]
    headers = {"authorization": f"Bearer {key}"}
    write_affine(object_store, model, 1, *_weights(1))
    _announce(kafka_bootstrap, compressed, model, 1)
    _wait_serving(gw.grpc, model, 1, headers)

    client = tgrpc.InferenceServerClient(gw.grpc)
    for bad in (None, {"authorization": "Bearer wrong"}):
        with pytest.raises(InferenceServerException) as denied:
            _infer(client, model, bad)
        assert denied.value.status() == "StatusCode.UNAUTHENTICATED"
    stub, _ = _admin(gw.grpc, None)
    for metadata in ((), (("authorization", f"Bearer {key}"),)):  # the inference key is not an admin key
        with pytest.raises(grpc.RpcError) as admin_denied:
            stub.ListModels(admin_pb2.ListModelsRequest(), metadata=metadata, timeout=10)
        assert admin_denied.value.code() == grpc.StatusCode.UNAUTHENTICATED

    write_affine(object_store, model, 2, *_weights(2))
    _announce(kafka_bootstrap, compressed, model, 2)
    awaiting = _wait_state(kafka_bootstrap, deployed, model, 2, events_pb2.ROLLOUT_STATE_AWAITING_APPROVAL)
    assert awaiting.actor == "gateway"  # its own step
    time.sleep(2)
    assert _infer(client, model, headers).get_response().model_version == "1"  # waits, serving v1
    stub, metadata = _admin(gw.grpc, admin_key)
    status = stub.RolloutStatus(admin_pb2.RolloutStatusRequest(model=model), metadata=metadata, timeout=10).status
    assert status.serving_version == 1 and status.mode == "manual"
    with pytest.raises(grpc.RpcError) as wrong:
        stub.Approve(admin_pb2.ApproveRequest(model=model, version=3), metadata=metadata, timeout=10)
    assert wrong.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)
    with Load(gw.grpc, model, headers=headers) as load:
        stub.Approve(admin_pb2.ApproveRequest(model=model, version=2, approver="test"), metadata=metadata, timeout=10)
        promoted = _wait_state(kafka_bootstrap, deployed, model, 2, events_pb2.ROLLOUT_STATE_PROMOTED)
        load.ends_on("2", 10)
    assert load.failures == [] and set(load.last[-10:]) == {"2"}
    client.close()
    # the audit: who approved (the admin key's id, never the key), in model.deployed and the log
    who = f"key:{hash_key(admin_key)[:12]}"
    events = _deployed(kafka_bootstrap, deployed, model)
    by_key = [(d.version, d.state, d.reason.startswith("approved by test")) for d in events if d.actor == who]
    assert by_key == [(2, events_pb2.ROLLOUT_STATE_CANARY, True)], [(d.state, d.reason, d.actor) for d in events]
    assert promoted.actor == "gateway"  # the canary's own steps after the approval
    calls = [json.loads(line) for line in gw.log_path.read_text().splitlines() if '"admin call' in line]
    assert any(c["msg"] == "admin call" and c["method"] == "Approve" and c["key"] == who for c in calls), calls
    assert any(c["msg"] == "admin call refused" and c["key"] == f"key:{hash_key(key)[:12]}" for c in calls), calls
    assert admin_key not in gw.log_path.read_text()


def test_gateway_killed_mid_canary_resumes_where_it_was(
    gateway_factory: Any, gateway_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    slow_canary = {**FAST, "min_samples": "1000000"}  # stays at its first step until told otherwise
    gw = gateway_factory(**slow_canary).start()
    model = f"gw_{uuid.uuid4().hex[:8]}"
    deployed, compressed = gateway_topics["deployed"], gateway_topics["compressed"]
    write_affine(object_store, model, 1, *_weights(1))
    _announce(kafka_bootstrap, compressed, model, 1)
    _wait_serving(gw.grpc, model, 1)
    write_affine(object_store, model, 2, *_weights(2))
    _announce(kafka_bootstrap, compressed, model, 2)
    _wait_state(kafka_bootstrap, deployed, model, 2, events_pb2.ROLLOUT_STATE_CANARY)
    gw.kill()
    assert gw.proc is not None and gw.proc.returncode == -signal.SIGKILL

    again = gateway_factory(**slow_canary, grpc_port=gw.env["CDL_GATEWAY_GRPC_PORT"]).start()
    stub, _ = _admin(again.grpc, None)
    deadline = time.monotonic() + 60
    status: Any = None
    while time.monotonic() < deadline:
        status = stub.RolloutStatus(admin_pb2.RolloutStatusRequest(model=model), timeout=10).status
        by_version = {v.version: v for v in status.versions}
        # (the restarted gateway becomes the model's writer when the group assigns it, and the
        # canary takes its share again once v2 is loaded and warm)
        if (
            2 in by_version
            and by_version[2].state == events_pb2.ROLLOUT_STATE_CANARY
            and by_version[2].traffic_fraction
        ):
            break
        time.sleep(0.3)
    assert status.serving_version == 1  # nothing serves that was not promoted
    by_version = {v.version: v for v in status.versions}
    assert by_version[2].state == events_pb2.ROLLOUT_STATE_CANARY and 0 < by_version[2].traffic_fraction < 1
    with Load(again.grpc, model) as load:
        wait_for(lambda: {"1", "2"} <= set(load.versions), 30, "both versions answering")
    assert load.failures == [] and {"1", "2"} <= set(load.versions)  # the canary took its share again
    stub.Promote(admin_pb2.PromoteRequest(model=model, version=2), timeout=10)
    _wait_serving(again.grpc, model, 2)


def test_tls_gateway_serves_tls_clients_only_and_logs_status_and_scores(
    gateway_factory: Any, gateway_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore, tmp_path: Any
) -> None:
    import subprocess

    from typer.testing import CliRunner

    from cdl_tools.cli import app

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost"
    san = "subjectAltName=IP:127.0.0.1,DNS:localhost"
    subprocess.run(
        ["openssl", *openssl.split(), "-addext", san, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    gw = gateway_factory(**FAST, tls_cert_file=str(cert), tls_key_file=str(key)).start()
    model = f"gw_{uuid.uuid4().hex[:8]}"
    write_affine(object_store, model, 1, *_weights(1))
    _announce(kafka_bootstrap, gateway_topics["compressed"], model, 1)
    client = tgrpc.InferenceServerClient(gw.grpc, ssl=True, root_certificates=str(cert))
    deadline = time.monotonic() + 60
    while True:
        try:
            result = _infer(client, model)
            break
        except InferenceServerException:
            assert time.monotonic() < deadline, "v1 never served over TLS"
            time.sleep(0.2)
    assert result.get_response().model_version == "1"
    client.close()
    plain = tgrpc.InferenceServerClient(gw.grpc)
    with pytest.raises(InferenceServerException) as refused:  # plaintext to a TLS port: no answer
        plain.is_server_live(client_timeout=3)
    assert "UNAVAILABLE" in str(refused.value.status()) or "Deadline" in str(refused.value), refused.value
    plain.close()
    # the REST port speaks TLS too, with the same certificate
    import ssl
    import urllib.request

    trusted = ssl.create_default_context(cafile=str(cert))
    with urllib.request.urlopen(f"https://{gw.http}/v2/health/ready", context=trusted, timeout=10) as resp:
        assert resp.status == 200
    doc = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1.0] * 4}]}
    infer = urllib.request.Request(f"https://{gw.http}/v2/models/{model}/infer", data=json.dumps(doc).encode())
    with urllib.request.urlopen(infer, context=trusted, timeout=10) as resp:  # served by the lane, over TLS
        answer = json.loads(resp.read())
    assert answer["model_version"] == "1"
    rest_id = answer["id"]
    with pytest.raises(OSError):  # plaintext to the TLS port: no answer (reset, or a refused handshake)
        urllib.request.urlopen(f"http://{gw.http}/v2/health/ready", timeout=5)
    out = CliRunner().invoke(app, ["--tls-ca", str(cert), "models", model, "--gateway", gw.grpc, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["serving_version"] == "1"

    # the inference log says how each request went, and the top score beside the label
    deadline = time.monotonic() + 30
    while True:
        records = read_topic(kafka_bootstrap, gateway_topics["logged"], 1, timeout_s=5)
        payloads = [decode(r.key, r.value, list(r.headers.items())).payload for r in records]
        # the gateway logs a round's requests of a model version together (log_batch), keyed by model
        assert all(isinstance(p, events_pb2.InferenceLoggedBatch) for p in payloads)
        assert all(
            r.key == p.records[0].model.encode() and len({x.model for x in p.records}) == 1  # type: ignore[attr-defined]
            for r, p in zip(records, payloads, strict=True)
        )
        logged: list[events_pb2.InferenceLogged] = [rec for p in payloads for rec in p.records]  # type: ignore[attr-defined]
        ok = [rec for rec in logged if rec.model == model and rec.status == "OK"]
        if ok and any(rec.request_id == rest_id for rec in ok):
            break
        assert time.monotonic() < deadline, [rec.status for rec in logged]
    first = next(rec for rec in ok if rec.request_id != rest_id)
    assert len(first.scores) == len(first.predicted_labels) == 1
    w, b = _weights(1)
    assert first.scores[0] == pytest.approx(float((X @ w + b).max()), rel=1e-4)
    # the REST request is logged as a gRPC one is: its inputs as a ModelInferRequest, its label
    [via_rest] = [rec for rec in ok if rec.request_id == rest_id]
    sample = service_pb2.ModelInferRequest.FromString(via_rest.inputs_sample)
    assert np.frombuffer(sample.raw_input_contents[0], np.float32).tolist() == [1.0] * 4
    ones = np.ones((1, 4), np.float32) @ w + b
    assert via_rest.predicted_labels == [str(int(ones.argmax()))]
    assert via_rest.scores[0] == pytest.approx(float(ones.max()), rel=1e-4)
    failed = [rec for rec in logged if rec.status not in ("OK", "")]
    assert all(not rec.predicted_labels and not rec.scores for rec in failed)


@pytest.mark.parametrize("plane", ["native", "python"])
def test_a_key_over_its_budget_is_refused_while_another_key_is_served(
    plane: str, gateway_factory: Any, gateway_topics: dict[str, str], kafka_bootstrap: str, object_store: ObjectStore
) -> None:
    """A request budget per key (5/s, bursts of 5): a key that sends 40 requests at once is
    refused past its budget (RESOURCE_EXHAUSTED over gRPC, 429 over REST) while another key is
    served; by the native lane and by the Python server alike."""
    import urllib.error
    import urllib.request

    heavy, light, waiter = "heavy-key", "light-key", "waiter-key"
    gw = gateway_factory(
        **FAST,
        data_plane=plane,
        api_key_hashes=json.dumps([hash_key(k) for k in (heavy, light, waiter)]),
        key_rate="5",
        key_burst="5",
    ).start()
    model = f"gw_{uuid.uuid4().hex[:8]}"
    write_affine(object_store, model, 1, *_weights(1))
    _announce(kafka_bootstrap, gateway_topics["compressed"], model, 1)
    _wait_serving(gw.grpc, model, 1, {"authorization": f"Bearer {waiter}"})

    client = tgrpc.InferenceServerClient(gw.grpc)
    codes: Counter[str] = Counter()
    for _ in range(40):
        try:
            _infer(client, model, {"authorization": f"Bearer {heavy}"})
            codes["ok"] += 1
        except InferenceServerException as exc:
            codes[str(exc.status())] += 1
            assert "over its request budget" in str(exc.message()), exc
    assert codes["StatusCode.RESOURCE_EXHAUSTED"] >= 20 and 5 <= codes["ok"] < 20, codes
    doc = {"inputs": [{"name": "input", "shape": [1, N_IN], "datatype": "FP32", "data": [1.0] * N_IN}]}
    statuses = []
    for _ in range(10):
        req = urllib.request.Request(
            f"http://{gw.http}/v2/models/{model}/infer",
            data=json.dumps(doc).encode(),
            headers={"Authorization": f"Bearer {heavy}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                statuses.append(resp.status)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)
            if exc.code == 429:
                assert "over its request budget" in json.loads(exc.read())["error"]
    assert 429 in statuses, statuses
    # meanwhile the other key is served: its budget is its own
    assert _infer(client, model, {"authorization": f"Bearer {light}"}).get_response().model_version == "1"
    client.close()


@pytest.mark.parametrize("plane", ["native", "python"])
def test_a_key_is_rotated_without_a_restart(
    plane: str,
    gateway_factory: Any,
    gateway_topics: dict[str, str],
    kafka_bootstrap: str,
    object_store: ObjectStore,
    tmp_path: Any,
) -> None:
    """The keys file rewritten with a new key (and a new admin key): within a reload the new key
    is served and the old one refused, by the native lane and the Python server alike, with no
    restart; a broken file keeps the keys as they were."""
    old, new, admin_old, admin_new = "old-key", "new-key", "old-admin", "new-admin"
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"inference": [hash_key(old)], "admin": [hash_key(admin_old)]}))
    gw = gateway_factory(**FAST, data_plane=plane, api_keys_file=str(keys_file), keys_reload_s="0.2").start()
    pid = gw.proc.pid if gw.proc is not None else 0
    model = f"gw_{uuid.uuid4().hex[:8]}"
    write_affine(object_store, model, 1, *_weights(1))
    _announce(kafka_bootstrap, gateway_topics["compressed"], model, 1)
    _wait_serving(gw.grpc, model, 1, {"authorization": f"Bearer {old}"})
    client = tgrpc.InferenceServerClient(gw.grpc)

    def served(key: str) -> bool:
        try:
            return bool(_infer(client, model, {"authorization": f"Bearer {key}"}).get_response().model_version)
        except InferenceServerException as exc:
            assert exc.status() == "StatusCode.UNAUTHENTICATED", exc
            return False

    def admin_ok(key: str) -> bool:
        stub, metadata = _admin(gw.grpc, key)
        try:
            stub.ListModels(admin_pb2.ListModelsRequest(), metadata=metadata, timeout=10)
            return True
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
            return False

    assert served(old) and not served(new) and admin_ok(admin_old) and not admin_ok(admin_new)
    keys_file.write_text(json.dumps({"inference": [hash_key(new)], "admin": [hash_key(admin_new)]}))
    wait_for(lambda: served(new), 30, "the new key served")
    assert not served(old) and admin_ok(admin_new) and not admin_ok(admin_old)
    keys_file.write_text("{not json")  # a typo: the keys stay
    wait_for(lambda: "the keys file is not valid" in gw.log_path.read_text(), 30, "the broken file refused")
    assert served(new) and not served(old)
    assert gw.proc is not None and gw.proc.poll() is None and gw.proc.pid == pid  # no restart
    client.close()
