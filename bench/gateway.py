"""bench/gateway: what the gateway costs, against Triton directly and a bare byte-forwarding proxy.

One private stack (Kafka, MinIO, one Triton). The model: a digits-shaped
float32 model (64 inputs, 10 outputs; an affine ONNX entry, the smallest
model shape the demo serves) rolled out through the gateway itself. Three
targets, measured alternately ``CDL_BENCH_GATEWAY_ROUNDS`` (3) times with
batch-1 Open Inference Protocol requests (the same pre-serialised
``ModelInferRequest`` bytes a tritonclient client sends; the client is this
process, on grpc.aio):

- **direct**: Triton's gRPC port;
- **floor**: ``bench/_floor_proxy.py``, a generic ``grpc.aio`` handler that
  forwards bytes to Triton and back (no routing, auth, logging, metrics);
- **gateway**: ``python -m services.gateway`` with everything on (API key,
  routing, every request logged to ``inference.logged``, Prometheus), on its
  default data plane (the native lane in front of the Python server where Go
  builds it; its CPU and RSS are the process group's, the lane's included);
- **native**: ``bench/native_floor`` (Go), the native floor: a plain grpc-go
  byte-forwarding proxy (and, for HTTP, a plain ``httputil.ReverseProxy``) --
  what forwarding costs in the language the gateway's data plane is written in;
- **floor2**, the control: a second process of the same floor, started later.
  Two identical proxies part by several percent on this machine (each holds
  its own connection to Triton); what floor2 reaches against the floor is
  printed beside the results as the machine's spread. It is not a baseline.

Each round measures the targets in another order (rotated), so that no target
always follows the same one.

Per target: a fixed load of ``CDL_BENCH_GATEWAY_RATE`` (200) requests/s for
``CDL_BENCH_GATEWAY_SECONDS`` (10 s) — latency percentiles, and the proxy
process's CPU seconds per request — and a closed loop at concurrency 16 for
the same time — throughput. Medians over the rounds count.

Then REST/HTTP v2: Triton's HTTP port (**direct**), the native floor's reverse
proxy (**native**) and the gateway's REST port (**gateway**), each in a closed
loop at concurrency 16 with this process's aiohttp client (JSON infer bodies),
rounds rotated as above. And Triton's own load tool, perf_analyzer (concurrency
16, gRPC and HTTP), against direct, native and the gateway, once each.

RESULT lines: the gateway's CPU per request and gRPC throughput against the
native floor (goals <= 1.15 and >= 0.95), its HTTP throughput against the
native floor's reverse proxy (>= 0.95), its added p50 at 200 req/s over direct
Triton (<= 0.5 ms), and, as before, RSS growth over the rollouts and the
rollback's seconds. The Python floor's figures are printed beside them.

Then 50 consecutive rollouts (v2 … v51, each through canary to promotion,
under a light load) — the gateway's and Triton's RSS after the first and after
the last — and a bad canary (every real request fails) at 50 requests/s: the
seconds from its CANARY transition (the gateway's ``model.deployed`` event
time; traffic starts then) to ROLLED_BACK (0% traffic).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import assign_all, closed_loop, fixed_rate, machine, private_stack, result, rss_mib
from bench._native_floor import NativeFloor

ROUNDS = int(os.environ.get("CDL_BENCH_GATEWAY_ROUNDS", "3"))
RATE = float(os.environ.get("CDL_BENCH_GATEWAY_RATE", "200"))
SECONDS = float(os.environ.get("CDL_BENCH_GATEWAY_SECONDS", "10"))
CONCURRENCY = 16
ROLLOUTS = int(os.environ.get("CDL_BENCH_GATEWAY_ROLLOUTS", "50"))
#: another gateway measured beside the first, NAME:ENV=VALUE;ENV=VALUE (e.g.
#: python:CDL_GATEWAY_DATA_PLANE=python), to compare two settings on the machine as it is then
VARIANT = os.environ.get("CDL_BENCH_GATEWAY_VARIANT", "")
N_IN, N_OUT = 64, 10
MODEL = "digits_bench"
KEY = "bench-key"
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def _request() -> bytes:
    from tritonclient.grpc import service_pb2

    x = np.random.default_rng(0).random((1, N_IN), dtype=np.float32) * 16
    req = service_pb2.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="input", datatype="FP32", shape=[1, N_IN])
    req.raw_input_contents.append(x.tobytes())
    return bytes(req.SerializeToString())


def _json_request() -> bytes:
    """The same input as :func:`_request`, as a REST/HTTP v2 JSON body."""
    x = np.random.default_rng(0).random((1, N_IN), dtype=np.float32) * 16
    doc = {"inputs": [{"name": "input", "shape": [1, N_IN], "datatype": "FP32", "data": x.ravel().tolist()}]}
    return json.dumps(doc).encode()


async def _http_closed_loop(
    url: str, body: bytes, headers: dict[str, str], seconds: float, concurrency: int
) -> tuple[float, int]:
    """Requests per second (and failures) of ``concurrency`` aiohttp callers posting ``body``."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        for _ in range(20):  # warm the connections
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url}: {resp.status} {(await resp.text())[:300]}")
        done = failed = 0
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done, failed
            while time.perf_counter() < end:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        done += 1
                    else:
                        failed += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0), failed


def _perf_analyzer(binary: str, protocol: str, url: str) -> float:
    """perf_analyzer's throughput (infer/s) at concurrency 16 against ``url``; NaN when it failed."""
    import re
    import subprocess

    argv = [
        binary, "-m", MODEL, "-u", url, "-i", protocol, "-H", f"authorization: Bearer {KEY}",
        "--concurrency-range", str(CONCURRENCY), "--measurement-interval", str(int(SECONDS * 500)),
        "--max-trials", "6", "--stability-percentage", "50",  # (a shared 2-core box is not steady to 10%)
    ]  # fmt: skip
    run = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=300)
    found = re.search(r"Throughput: ([\d.]+) infer/sec", run.stdout)
    if run.returncode != 0 or found is None:
        print(f"    perf_analyzer {protocol} {url} failed: {(run.stdout + run.stderr)[-500:]}")
        return float("nan")
    return float(found.group(1))


def _cpu_s(pid: int, group: bool = True) -> float:
    """CPU seconds of ``pid`` and (``group``) the rest of its process group (a gateway's native lane)."""
    from cdl_tools.stack._procs import _stat, group_members

    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in (group_members(pid) or [pid]) if group else [pid]:
        st = _stat(p)
        if st is not None:
            total += (int(st[11]) + int(st[12])) / tick
    return total


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return float(sum(fields) - idle), float(sum(fields))


def _wait_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


def _deployed(bootstrap: str, topic: str, since: int = 0) -> list[tuple[float, Any]]:
    from confluent_kafka import Consumer

    from cdl.events import decode
    from cdl.kafka.security import secured

    c = Consumer(
        secured({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}", "enable.auto.commit": False})
    )
    assign_all(c, topic, since)
    out = []
    quiet = 0
    while quiet < 2:
        batch = c.consume(500, 0.5)
        quiet = 0 if batch else quiet + 1
        for m in batch:
            if m.error() is None:
                ev = decode(m.key(), m.value(), list(m.headers() or []))
                out.append((ev.time.timestamp(), ev.payload))
    c.close()
    return out


def main() -> None:
    import grpc

    from cdl.auth import hash_key
    from cdl.events import Event
    from cdl.kafka import Producer
    from cdl.v1 import events_pb2
    from cdl_tools.stack import stack_store
    from cdl_tools.stack._procs import free_port, group_members, spawn, stop
    from tests.models import failing_onnx, write_affine, write_onnx

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stack on the way out
    print(f"machine: {machine()}; {ROUNDS} rounds; {RATE:.0f} req/s for {SECONDS:.0f} s; concurrency {CONCURRENCY}")
    with private_stack(triton_servers=1) as state:
        bootstrap = state["kafka"]["bootstrap"]
        store = stack_store(state)
        triton = state["triton"][0]["grpc"]
        tr_pid = int(state["procs"]["triton-0"]["pid"])
        tmp = Path(state["state_dir"])
        uid = uuid.uuid4().hex[:6]
        topics = {k: f"bench.{k}.{uid}" for k in ("compressed", "deployed", "logged", "deadletter")}
        gw_port, gw_metrics, floor_port, gw_http = free_port(), free_port(), free_port(), free_port()
        triton_http = state["triton"][0]["http"]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), CDL_STATE_DIR=str(tmp))
        env.setdefault("CDL_INSECURE", "true")  # its entries are written unsigned, by the bench
        env |= {f"CDL_GATEWAY_{k.upper()}_TOPIC": v for k, v in topics.items()}
        env |= {
            "CDL_GATEWAY_GROUP_ID": f"bench-gw-{uid}",
            "CDL_GATEWAY_GRPC_PORT": str(gw_port),
            "CDL_GATEWAY_HTTP_PORT": str(gw_http),
            "CDL_GATEWAY_METRICS_PORT": str(gw_metrics),
            "CDL_GATEWAY_API_KEY_HASHES": json.dumps([hash_key(KEY)]),
            "CDL_GATEWAY_CANARY_STEPS": "[0.5, 1.0]",
            "CDL_GATEWAY_MIN_SAMPLES": "5",
            "CDL_GATEWAY_STEP_MIN_S": "0.2",
            "CDL_GATEWAY_WARMUP_REQUESTS": "2",
        }
        gw_proc, gw = spawn([sys.executable, "-m", "services.gateway"], tmp / "gateway.log", env=env)

        def start_floor(port: int, name: str) -> tuple[Any, Any]:
            """A floor process on ``port``, once it says it is ready (its log at ``name``.log)."""
            log_path = tmp / f"{name}.log"
            started = spawn(
                [sys.executable, str(Path(__file__).with_name("_floor_proxy.py")), str(port), triton], log_path, env=env
            )
            deadline = time.monotonic() + 30
            while "ready" not in log_path.read_text():
                if time.monotonic() > deadline or started[0].poll() is not None:
                    raise RuntimeError(f"{name} never became ready: {log_path.read_text()[-2000:]}")
                time.sleep(0.1)
            return started

        try:
            floor_proc, floor = start_floor(floor_port, "floor")
            native = NativeFloor(triton, triton_http)
        except Exception:
            stop(gw, 20)
            raise
        producer = Producer(bootstrap)

        def announce(version: int) -> None:
            msg = events_pb2.ModelCompressed(model=MODEL, version=version, ok=True, chosen_variant="fp32")
            producer.send(topics["compressed"], Event(msg, source="/cdl/bench", key=MODEL))
            producer.flush()

        def wait_state(version: int, state_: int, timeout_s: float = 120) -> tuple[float, Any]:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                for t, d in _deployed(bootstrap, topics["deployed"]):
                    if d.model == MODEL and d.version == version and d.state == state_:
                        return t, d
                time.sleep(0.3)
            raise RuntimeError(f"v{version} never reached state {state_}")

        outcomes: dict[str, int] = {}

        def wait_end(version: int, timeout_s: float = 120) -> str:
            deadline = time.monotonic() + timeout_s
            ends = {events_pb2.ROLLOUT_STATE_PROMOTED: "promoted", events_pb2.ROLLOUT_STATE_ROLLED_BACK: "rolled back"}
            while time.monotonic() < deadline:
                for _, d in _deployed(bootstrap, topics["deployed"]):
                    if d.model == MODEL and d.version == version and d.state in ends:
                        return ends[d.state]
                time.sleep(0.3)
            raise RuntimeError(f"the rollout of v{version} never ended")

        def triton_settled(version: int, timeout_s: float = 60) -> None:
            """Wait until Triton holds only ``version`` of the model (the superseded one unloaded)
            and its process group stopped changing (an unloaded version's backend stub gone)."""
            import tritonclient.grpc as tgrpc

            client = tgrpc.InferenceServerClient(triton)
            deadline = time.monotonic() + timeout_s
            members: list[int] = []
            try:
                while time.monotonic() < deadline:
                    index = client.get_model_repository_index(as_json=True).get("models", [])
                    held = {
                        int(m["version"]) for m in index if m.get("name") == MODEL and m.get("state") != "UNAVAILABLE"
                    }
                    members.append(len(group_members(tr_pid)))
                    if held == {version} and len(members) >= 3 and len(set(members[-3:])) == 1:
                        return
                    time.sleep(0.2)
                print(f"    Triton had not settled on v{version} after {timeout_s:.0f} s (held {held})")
            finally:
                client.close()

        variant: tuple[str, Any, Any] | None = None
        floor2: Any = None
        try:
            _wait_http(f"http://127.0.0.1:{gw_metrics}/healthz")
            w = np.random.default_rng(1).normal(size=(N_IN, N_OUT)).astype(np.float32)
            b = np.zeros(N_OUT, dtype=np.float32)
            write_affine(store, MODEL, 1, w, b)
            announce(1)
            wait_state(1, events_pb2.ROLLOUT_STATE_PROMOTED)
            if VARIANT:
                # started once v1 serves: it reads the rollout state the first gateway saved and
                # serves v1 too; its own topics (it never rolls anything out) and ports
                vname, _, vsettings = VARIANT.partition(":")
                vport, vmetrics = free_port(), free_port()
                venv = env | {f"CDL_GATEWAY_{k.upper()}_TOPIC": f"{v}.{vname}" for k, v in topics.items()}
                venv |= {"CDL_GATEWAY_GROUP_ID": f"bench-gw-{uid}-{vname}", "CDL_GATEWAY_GRPC_PORT": str(vport)}
                venv |= {"CDL_GATEWAY_METRICS_PORT": str(vmetrics)}
                venv |= dict(kv.split("=", 1) for kv in vsettings.split(";") if kv)
                vproc, vinfo = spawn([sys.executable, "-m", "services.gateway"], tmp / f"gateway-{vname}.log", env=venv)
                _wait_http(f"http://127.0.0.1:{vmetrics}/healthz")
                variant = (vname, vproc, vinfo)
            # the control: a second floor process, the same script started later -- how far two
            # identical proxies part on this machine (each holds its own connection to Triton)
            floor2_port = free_port()
            floor2_proc, floor2 = start_floor(floor2_port, "floor2")
            request = _request()
            auth = (("authorization", f"Bearer {KEY}"),)
            targets = {
                "direct": (triton, (), None),
                "floor": (f"127.0.0.1:{floor_port}", (), floor.pid),
                "native": (native.grpc, (), native.pid),
                "gateway": (f"127.0.0.1:{gw_port}", auth, gw.pid),
                "floor2": (f"127.0.0.1:{floor2_port}", (), floor2.pid),
            }
            if variant is not None:
                targets[variant[0]] = (f"127.0.0.1:{vport}", auth, variant[2].pid)
                asyncio.run(fixed_rate(targets[variant[0]][0], request, auth, 50, 2))  # it serves v1
            figures: dict[str, dict[str, list[float]]] = {
                n: {"p50": [], "p99": [], "cpu": [], "rps": []} for n in targets
            }
            # who spends the CPU at saturation: the client (this process), the proxy, Triton, Kafka
            others = {
                "client": os.getpid(),
                "triton": int(state["procs"]["triton-0"]["pid"]),
                "kafka": int(state["procs"]["kafka"]["pid"]),
            }
            for rnd in range(1, ROUNDS + 1):
                # each round in another order: no target always follows the same one
                names = list(targets)
                names = names[(rnd - 1) % len(names) :] + names[: (rnd - 1) % len(names)]
                for name in names:
                    target, metadata, pid = targets[name]
                    cpu0 = _cpu_s(pid) if pid else 0.0
                    py0 = _cpu_s(pid, group=False) if pid else 0.0
                    lat = asyncio.run(fixed_rate(target, request, metadata, RATE, SECONDS))
                    cpu = (_cpu_s(pid) - cpu0) / len(lat) * 1e6 if pid else float("nan")
                    if name == "gateway":  # where the gateway's CPU goes at a low rate: Python or the lane
                        py = (_cpu_s(pid, group=False) - py0) / len(lat) * 1e6
                        print(f"    gateway at {RATE:.0f}/s: {cpu:.0f} us/request, its Python process {py:.0f}")
                    who = dict(others, proxy=pid) if pid else others
                    before = {k: _cpu_s(p) for k, p in who.items()}
                    main0 = _cpu_s(pid, group=False) if pid else 0.0
                    gw0, t0 = _cpu_s(gw.pid), time.perf_counter()
                    busy0, total0 = _machine_busy()
                    rps = asyncio.run(closed_loop(target, request, metadata, SECONDS, CONCURRENCY))
                    busy1, total1 = _machine_busy()
                    n = rps * SECONDS
                    split = " ".join(f"{k} {(_cpu_s(p) - before[k]) / n * 1e6:.0f}" for k, p in who.items())
                    if pid:
                        split += f" (its main process {(_cpu_s(pid, group=False) - main0) / n * 1e6:.0f})"
                    if name in ("direct", "floor"):  # what the gateway spends with no requests of its own
                        idle_ms = (_cpu_s(gw.pid) - gw0) / (time.perf_counter() - t0) * 1e3
                        split += f"; the idle gateway {idle_ms:.1f} ms/s"
                    print(
                        f"    {name} at concurrency {CONCURRENCY}, CPU us/request: {split}; "
                        f"machine busy {(busy1 - busy0) / (total1 - total0):.0%}"
                    )
                    q = np.quantile(lat, [0.5, 0.99]) * 1000
                    f = figures[name]
                    f["p50"].append(float(q[0]))
                    f["p99"].append(float(q[1]))
                    f["cpu"].append(cpu)
                    f["rps"].append(rps)
                    print(
                        f"round {rnd} {name:8s} p50 {q[0]:.2f} ms p99 {q[1]:.2f} ms at {RATE:.0f}/s; "
                        f"cpu {cpu:.0f} us/request; {rps:,.0f} req/s at concurrency {CONCURRENCY}"
                    )
            med = {n: {k: statistics.median(v) for k, v in f.items()} for n, f in figures.items()}
            for n, f in med.items():
                print(
                    f"median {n:8s} p50 {f['p50']:.2f} ms p99 {f['p99']:.2f} ms "
                    f"cpu {f['cpu']:.0f} us {f['rps']:,.0f} req/s"
                )

            stop(floor2, 5)
            floor2_proc.wait(10)
            floor2 = None
            f2, f1 = med["floor2"], med["floor"]
            print(
                f"control: a second floor process reached {f2['rps'] / f1['rps']:.3f}x the floor's throughput "
                f"and {f2['cpu'] / f1['cpu']:.3f}x its CPU per request (identical code: the machine's spread)"
            )
            # ---- REST/HTTP v2: direct Triton, the native reverse proxy, the gateway's REST port
            body = _json_request()
            http_targets = {
                "direct": (f"http://{triton_http}", None),
                "native": (f"http://{native.http}", native.pid),
                "gateway": (f"http://127.0.0.1:{gw_http}", gw.pid),
            }
            http_headers = {"Authorization": f"Bearer {KEY}"}
            http_rps: dict[str, list[float]] = {n: [] for n in http_targets}
            http_cpu: dict[str, list[float]] = {n: [] for n in http_targets}
            for rnd in range(1, ROUNDS + 1):
                names = list(http_targets)
                names = names[(rnd - 1) % len(names) :] + names[: (rnd - 1) % len(names)]
                for name in names:
                    base, pid = http_targets[name]
                    cpu0 = _cpu_s(pid) if pid else 0.0
                    url = f"{base}/v2/models/{MODEL}/infer"
                    rps, failed = asyncio.run(_http_closed_loop(url, body, http_headers, SECONDS, CONCURRENCY))
                    cpu = (_cpu_s(pid) - cpu0) / (rps * SECONDS) * 1e6 if pid else float("nan")
                    http_rps[name].append(rps)
                    http_cpu[name].append(cpu)
                    print(f"round {rnd} http {name:8s} {rps:,.0f} req/s at concurrency {CONCURRENCY}; "
                          f"cpu {cpu:.0f} us/request; {failed} failed")  # fmt: skip
            http_med = {n: statistics.median(v) for n, v in http_rps.items()}
            for n in http_targets:
                print(f"median http {n:8s} {http_med[n]:,.0f} req/s cpu {statistics.median(http_cpu[n]):.0f} us")
            # ---- Triton's own load tool against each
            analyzer = shutil.which("perf_analyzer")
            pa: dict[str, float] = {}
            if analyzer is None:
                print("perf_analyzer is not installed (scripts/setup.sh installs it): not run")
            else:
                for protocol, urls in (
                    ("grpc", {"direct": triton, "native": native.grpc, "gateway": f"127.0.0.1:{gw_port}"}),
                    ("http", {"direct": triton_http, "native": native.http, "gateway": f"127.0.0.1:{gw_http}"}),
                ):
                    for name, url in urls.items():
                        pa[f"{protocol} {name}"] = _perf_analyzer(analyzer, protocol, url)
                print("perf_analyzer at concurrency 16 (infer/s): " + ", ".join(f"{k} {v:,.0f}" for k, v in pa.items()))

            if variant is not None:
                stop(variant[2], 20)
                variant[1].wait(10)
                vname, variant = variant[0], None
                vf, ff, gf = med[vname], med["floor"], med["gateway"]
                print(
                    f"variant {vname}: throughput {vf['rps'] / ff['rps']:.3f}x the floor (gateway "
                    f"{gf['rps'] / ff['rps']:.3f}x), CPU {vf['cpu'] / ff['cpu']:.3f}x "
                    f"(gateway {gf['cpu'] / ff['cpu']:.3f}x)"
                )

            # ---- 50 consecutive rollouts under a light load
            stop_load = asyncio.Event()

            async def light_load() -> None:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{gw_port}") as channel:
                    call = channel.unary_unary(METHOD)
                    while not stop_load.is_set():
                        try:
                            await call(request, metadata=auth, timeout=10)
                        except grpc.RpcError as exc:
                            print(f"    request failed during rollouts: {exc.code()}")
                        await asyncio.sleep(0.01)

            async def rollouts() -> tuple[list[float], list[float]]:
                task = asyncio.create_task(light_load())
                gw_rss, tr_rss = [], []
                for v in range(2, ROLLOUTS + 2):
                    write_affine(store, MODEL, v, w, b)
                    announce(v)
                    # either end counts (with these fast settings a latency blip can roll one back)
                    ended = await asyncio.to_thread(wait_end, v)
                    outcomes[ended] = outcomes.get(ended, 0) + 1
                    if v in (2, ROLLOUTS + 1):
                        await asyncio.to_thread(triton_settled, v)
                        gw_rss.append(rss_mib(gw.pid))
                        tr_rss.append(rss_mib(tr_pid))
                        print(
                            f"after rollout {v - 1}: gateway RSS {gw_rss[-1]:.0f} MiB, Triton RSS {tr_rss[-1]:.0f} MiB"
                        )
                stop_load.set()
                await task
                return gw_rss, tr_rss

            gw_rss, tr_rss = asyncio.run(rollouts())
            print(f"{ROLLOUTS} rollouts: {outcomes}")
            gw_growth, tr_growth = gw_rss[-1] / gw_rss[0], tr_rss[-1] / tr_rss[0]

            # ---- a bad canary at 50 requests/s
            bad = ROLLOUTS + 2
            write_onnx(store, MODEL, bad, failing_onnx(N_IN, N_OUT), N_IN, N_OUT)

            async def bad_canary() -> int:
                """50 requests/s until the bad version is rolled back; ``model.deployed`` is watched
                from a thread, off the request loop."""
                failures = 0
                done = asyncio.Event()

                def rolled_back() -> bool:
                    return any(
                        d.model == MODEL and d.version == bad and d.state == events_pb2.ROLLOUT_STATE_ROLLED_BACK
                        for _, d in _deployed(bootstrap, topics["deployed"])
                    )

                async def watch() -> None:
                    while not await asyncio.to_thread(rolled_back):
                        await asyncio.sleep(0.2)
                    done.set()

                watcher = asyncio.create_task(watch())
                async with grpc.aio.insecure_channel(f"127.0.0.1:{gw_port}") as channel:
                    call = channel.unary_unary(METHOD)
                    announce(bad)
                    end = time.monotonic() + 60
                    t0 = time.perf_counter()
                    i = 0
                    while not done.is_set() and time.monotonic() < end:
                        i += 1
                        try:
                            await call(request, metadata=auth, timeout=10)
                        except grpc.RpcError:
                            failures += 1
                        delay = t0 + i / 50 - time.perf_counter()
                        if delay > 0:
                            await asyncio.sleep(delay)
                watcher.cancel()
                return failures

            failures = asyncio.run(bad_canary())
            t_canary, _ = wait_state(bad, events_pb2.ROLLOUT_STATE_CANARY)
            t_back, back = wait_state(bad, events_pb2.ROLLOUT_STATE_ROLLED_BACK)
            rollback_s = t_back - t_canary
            print(
                f"bad canary v{bad}: rolled back {rollback_s:.2f} s after it took traffic ({back.reason}); "
                f"{failures} client requests failed"
            )
        finally:
            if variant is not None:
                stop(variant[2], 20)
            if floor2 is not None:
                stop(floor2, 5)
            stop(gw, 20)
            stop(floor, 5)
            native.close()
            with contextlib.suppress(OSError):  # the private stack's directory goes away: keep the log
                shutil.copy(tmp / "gateway.log", Path(tempfile.gettempdir()) / "cdl-bench-gateway.log")
            gw_proc.wait(10)
            floor_proc.wait(10)

    gwf, fl, di, na = med["gateway"], med["floor"], med["direct"], med["native"]
    print(
        f"p99 at {RATE:.0f}/s: direct {di['p99']:.2f} ms, native floor {na['p99']:.2f} ms, "
        f"Python floor {fl['p99']:.2f} ms, gateway {gwf['p99']:.2f} ms"
    )
    print(f"gateway throughput vs direct Triton: {gwf['rps'] / di['rps']:.3f} (no goal on 2 shared cores)")
    print(
        f"against the Python floor (the earlier baseline): CPU per request {gwf['cpu'] / fl['cpu']:.3f}x, "
        f"throughput {gwf['rps'] / fl['rps']:.3f}x"
    )
    print(result("gateway_cpu_per_request", gwf["cpu"], na["cpu"], op="<=", goal=1.15, unit="us"))
    print(result("gateway_throughput_vs_native_floor", gwf["rps"], na["rps"], op=">=", goal=0.95, unit="req/s"))
    print(result("gateway_http_throughput_vs_native_floor", http_med["gateway"], http_med["native"], op=">=",
                 goal=0.95, unit="req/s"))  # fmt: skip
    print(result("gateway_added_p50_ms", gwf["p50"] - di["p50"], 0.5, op="<=", goal=1.0, unit="ms"))
    worst = ("gateway", gw_rss) if gw_growth >= tr_growth else ("triton", tr_rss)
    print(f"RSS growth over {ROLLOUTS} rollouts: gateway {gw_growth:.3f}x, Triton {tr_growth:.3f}x (worst: {worst[0]})")
    print(result("rollout_rss_growth", worst[1][-1], worst[1][0], op="<=", goal=1.2, unit="MiB"))
    print(result("rollback_seconds", rollback_s, 10.0, op="<=", goal=1.0, unit="s"))


if __name__ == "__main__":
    main()
