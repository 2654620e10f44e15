"""bench/secure: what security costs (issue 29), each figure against its plaintext twin in the same run.

1. **Ingest over SASL_SSL.** Two private stacks side by side, one plaintext (Kafka and MinIO)
   and one secured as ``cdl stack up`` is by default (``kafka_security=sasl_ssl``: TLS with the
   stack's CA, SCRAM-SHA-512, ACLs; MinIO over TLS with that CA, its shards written so), an ingest
   service on each (on the secured one as its own Kafka user). Rounds alternate between them
   (``CDL_BENCH_SECURE_ROUNDS``, 5, after ``CDL_BENCH_SECURE_WARMUP``, 2, warm-up rounds each:
   the brokers' JIT compiles the TLS and SCRAM paths over the first rounds, and one warm-up
   round left the secured broker still speeding up): the same pre-encoded digits
   records (``CDL_BENCH_SECURE_RECORDS``, 200,000) are produced to ``data.raw`` (on the
   secured stack over SASL_SSL as its admin) until the dataset version holding them all is
   announced (bench/ingest's round). Medians count. Goal: secured >= 0.85x plaintext.
2. **The gateway over TLS.** One stack with a Triton; two gateways serving the same affine
   model, one plaintext and one with TLS (a certificate from the stack's CA), both with an
   API key; batch-1 requests at ``CDL_BENCH_SECURE_RATE`` (200)/s for 10 s each, alternated
   over the rounds: the gateway process group's CPU per request. Goal: TLS <= 1.3x plaintext.
3. **Signature verification** (cdl.signing): the gateway verifies a version's entry before
   it loads it, reading every file from the store and hashing it. Timed on a signed entry of
   ResNet-18's size (45 MB of weights) in the stack's MinIO, the median of 5. Goal: <= 0.2 s
   added to a rollout.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import ingest as ingest_bench
from bench._common import MODEL_INFER, fixed_rate, machine, result
from cdl_tools.stack._procs import free_port

ROUNDS = int(os.environ.get("CDL_BENCH_SECURE_ROUNDS", "5"))
WARMUP = int(os.environ.get("CDL_BENCH_SECURE_WARMUP", "2"))
RECORDS = int(os.environ.get("CDL_BENCH_SECURE_RECORDS", "200000"))
RATE = float(os.environ.get("CDL_BENCH_SECURE_RATE", "200"))
SECONDS = 10.0
ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-secure-key"


@contextmanager
def _stack(kafka_security: str, triton_servers: int = 0) -> Iterator[dict[str, Any]]:
    from cdl_tools.settings import StackSettings
    from cdl_tools.stack import LocalStack

    with tempfile.TemporaryDirectory(prefix=f"cdl-bench-{kafka_security}-") as tmp:
        settings = StackSettings(
            state_dir=Path(tmp),
            triton_servers=triton_servers,
            postgres=False,
            services=[],
            kafka_security=kafka_security,
            minio_tls=kafka_security == "sasl_ssl",  # the secured stack's object store over TLS too
        )
        stack = LocalStack(settings)
        try:
            yield stack.up()  # registers this process as a secured stack's admin (use_stack_identity)
        finally:
            stack.down(purge=True)


def _wait_ready(port: int) -> None:
    from bench.gateway import _wait_http

    _wait_http(f"http://127.0.0.1:{port}/readyz", timeout_s=120)


def _ingest(state: dict[str, Any], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    from cdl_tools.stack import service_env

    grpc_port, metrics_port = free_port(), free_port()
    env = dict(os.environ, **service_env(state), PYTHONPATH=str(ROOT), CDL_INSECURE="true")
    env |= {
        "CDL_INGEST_GRPC_PORT": str(grpc_port),
        "CDL_INGEST_METRICS_PORT": str(metrics_port),
        "CDL_INGEST_LOG_LEVEL": "WARNING",
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.ingest"], env=env, stdout=out, stderr=out)
    _wait_ready(metrics_port)
    return proc, grpc_port


def _answers(target: str, tls_ca: bytes | None) -> bool:
    """Whether the gateway at ``target`` answers an inference request (bench/gateway's)."""
    import grpc

    from bench.gateway import _request

    if tls_ca is not None:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca))
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        call = channel.unary_unary(MODEL_INFER)
        try:
            call(_request(), metadata=(("authorization", f"Bearer {KEY}"),), timeout=5)
        except grpc.RpcError:
            return False
    return True


def ingest_part() -> float:
    from cdl.kafka.security import KafkaSecurity, use

    ingest_bench.N = RECORDS
    rates: dict[str, list[float]] = {"plaintext": [], "sasl_ssl": []}
    with ExitStack() as stacks:
        states = {kind: stacks.enter_context(_stack(kind)) for kind in rates}
        secured = states["sasl_ssl"]
        procs = {}
        try:
            for kind, state in states.items():
                procs[kind] = _ingest(state, Path(state["state_dir"]) / "ingest.log")
            for rnd in range(WARMUP + ROUNDS):
                for kind in ("plaintext", "sasl_ssl") if rnd % 2 == 0 else ("sasl_ssl", "plaintext"):
                    state = states[kind]
                    name = f"bench-{uuid.uuid4().hex[:6]}"
                    values = ingest_bench.records(name)
                    time.sleep(2.0)
                    rate, _ = ingest_bench.cdl_round(state["kafka"]["bootstrap"], procs[kind][1], values, name)
                    measured = rnd >= WARMUP
                    if measured:
                        rates[kind].append(rate)
                    label = f"round {rnd - WARMUP + 1}" if measured else "warm-up"
                    print(f"{label} ingest {kind:9s}: {rate:,.0f} records/s")
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(30)
            use(KafkaSecurity(), secured["kafka"]["bootstrap"])
    plain, secure = statistics.median(rates["plaintext"]), statistics.median(rates["sasl_ssl"])
    print(f"medians: plaintext {plain:,.0f} records/s, SASL_SSL {secure:,.0f} records/s ({secure / plain:.3f}x)")
    return secure / plain


def gateway_part() -> tuple[float, float, float]:
    """(plaintext CPU us/request, TLS CPU us/request, verification seconds)."""
    from bench.gateway import MODEL, N_IN, N_OUT, _cpu_s, _request
    from cdl.auth import hash_key
    from cdl.events import Event
    from cdl.kafka import Producer
    from cdl.signing import Signer, TrustedKeys, generate_signing_key, verify_entry
    from cdl.tls import ensure_server_cert
    from cdl.triton import TRITON_BUCKET
    from cdl.v1 import events_pb2
    from cdl_tools.stack import service_env, stack_store
    from cdl_tools.stack._procs import spawn, stop
    from tests.models import write_affine

    with _stack("plaintext", triton_servers=1) as state:
        tmp = Path(state["state_dir"])
        store = stack_store(state)
        key_file = tmp / "bench-signing.pem"
        trusted = generate_signing_key(key_file)
        signer = Signer.from_file(key_file)
        model = MODEL
        rng = np.random.default_rng(1)
        write_affine(
            store,
            model,
            1,
            rng.normal(size=(N_IN, N_OUT)).astype(np.float32),
            np.zeros(N_OUT, np.float32),
            signer=signer,
        )

        # 3. the signature check on an entry of ResNet-18's size (45 MB of float32 weights)
        big = "bench-secure-big"
        write_affine(
            store,
            big,
            1,
            rng.normal(size=(N_IN, 45_000_000 // 4 // N_IN)).astype(np.float32),
            np.zeros(45_000_000 // 4 // N_IN, np.float32),
            signer=signer,
        )
        keys = TrustedKeys([trusted])
        verify_s = []
        for _ in range(5):
            t = time.perf_counter()
            verify_entry(store, TRITON_BUCKET, big, 1, keys)
            verify_s.append(time.perf_counter() - t)
        verification = statistics.median(verify_s)
        print(f"signature check of a 45 MB entry: median {verification:.3f} s of {[round(s, 3) for s in verify_s]}")

        # 2. two gateways, plaintext and TLS, each rolling v1 out from its own topics
        both = ensure_server_cert(tmp / "tls", "gateway", ["127.0.0.1", "localhost"]).read_text()
        split = both.index("-----BEGIN CERTIFICATE-----")  # the key first, then the chain
        key_pem, cert_pem = tmp / "tls" / "gateway-key.pem", tmp / "tls" / "gateway-cert.pem"
        key_pem.write_text(both[:split])
        cert_pem.write_text(both[split:])
        ca = (tmp / "tls" / "ca.pem").read_bytes()
        producer = Producer(state["kafka"]["bootstrap"])
        gateways: dict[str, tuple[str, Any]] = {}
        started: list[Any] = []
        try:
            for kind in ("plaintext", "tls"):
                uid = uuid.uuid4().hex[:6]
                topics = {k: f"bench.{k}.{uid}" for k in ("compressed", "deployed", "logged", "deadletter")}
                port, metrics = free_port(), free_port()
                env = dict(os.environ, **service_env(state), PYTHONPATH=str(ROOT))
                env |= {f"CDL_GATEWAY_{k.upper()}_TOPIC": v for k, v in topics.items()}
                env |= {
                    "CDL_GATEWAY_GROUP_ID": f"bench-gw-{uid}",
                    "CDL_GATEWAY_GRPC_PORT": str(port),
                    "CDL_GATEWAY_HTTP_PORT": str(free_port()),
                    "CDL_GATEWAY_METRICS_PORT": str(metrics),
                    "CDL_GATEWAY_API_KEY_HASHES": json.dumps([hash_key(KEY)]),
                    "CDL_GATEWAY_ADMIN_KEY_HASHES": json.dumps([hash_key(KEY + "-admin")]),
                    "CDL_GATEWAY_TRUSTED_KEYS": json.dumps([trusted]),
                    "CDL_GATEWAY_CANARY_STEPS": "[1.0]",
                    "CDL_GATEWAY_MIN_SAMPLES": "1",
                    "CDL_GATEWAY_STEP_MIN_S": "0.1",
                    "CDL_GATEWAY_WARMUP_REQUESTS": "1",
                }
                if kind == "tls":
                    env |= {"CDL_GATEWAY_TLS_CERT_FILE": str(cert_pem), "CDL_GATEWAY_TLS_KEY_FILE": str(key_pem)}
                _, info = spawn([sys.executable, "-m", "services.gateway"], tmp / f"gateway-{kind}.log", env=env)
                started.append(info)  # stopped whatever happens next
                _wait_ready(metrics)
                msg = events_pb2.ModelCompressed(model=model, version=1, ok=True, chosen_variant="fp32")
                producer.send(topics["compressed"], Event(msg, source="/cdl/bench", key=model))
                producer.flush()
                # the first rolls v1 out; the second finds it serving in the shared rollout state
                deadline = time.monotonic() + 120
                while not _answers(f"127.0.0.1:{port}", ca if kind == "tls" else None):
                    if time.monotonic() > deadline:
                        log = (tmp / f"gateway-{kind}.log").read_text()[-2000:]
                        raise RuntimeError(f"the {kind} gateway never served v1: {log}")
                    time.sleep(0.3)
                gateways[kind] = (f"127.0.0.1:{port}", info)
            request = _request()  # bench/gateway's batch-1 request for its model's shape and name
            auth = (("authorization", f"Bearer {KEY}"),)
            cpu: dict[str, list[float]] = {"plaintext": [], "tls": []}
            for rnd in range(ROUNDS + 1):
                for kind in ("plaintext", "tls") if rnd % 2 == 0 else ("tls", "plaintext"):
                    target, info = gateways[kind]
                    c0 = _cpu_s(info.pid)
                    lat = asyncio.run(
                        fixed_rate(target, request, auth, RATE, SECONDS, tls_ca=ca if kind == "tls" else None)
                    )
                    us = (_cpu_s(info.pid) - c0) / len(lat) * 1e6
                    p50 = float(np.quantile(lat, 0.5)) * 1000
                    if rnd:
                        cpu[kind].append(us)
                    print(
                        f"{'warm-up' if not rnd else f'round {rnd}'} gateway {kind:9s}: "
                        f"{us:.0f} us CPU/request, p50 {p50:.2f} ms at {RATE:.0f}/s"
                    )
        finally:
            for info in started:
                stop(info, 20)
    return statistics.median(cpu["plaintext"]), statistics.median(cpu["tls"]), verification


def main() -> None:
    print(
        f"machine: {machine()}; {ROUNDS} rounds ({WARMUP} warm-up for ingest); ingest {RECORDS:,} records a round; "
        f"gateway {RATE:.0f} req/s for {SECONDS:.0f} s"
    )
    ratio = ingest_part()
    plain_cpu, tls_cpu, verification = gateway_part()
    print(result("secure_ingest_records_per_s", ratio, 1.0, op=">=", goal=0.85, unit="x plaintext"))
    print(result("gateway_tls_cpu_per_request", tls_cpu, plain_cpu, op="<=", goal=1.3, unit="us"))
    print(result("signature_verification_seconds", verification, 0.2, op="<=", goal=1.0, unit="s"))


if __name__ == "__main__":
    main()
