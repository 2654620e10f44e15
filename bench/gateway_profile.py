"""bench/gateway_profile: the gateway's hot-path CPU without a stack (no Kafka, MinIO or Triton).

Three subprocesses on this machine:

- a fake "Triton": a ``grpc.aio`` server answering ModelInfer with a fixed
  pre-serialised ``ModelInferResponse`` (one FP32 [1, 10] output) and
  ServerReady with true;
- the floor (``bench/_floor_proxy.py``) in front of it;
- the gateway's :class:`InferenceService` (a route, a real ``RolloutManager``
  as Outcomes, an ``InferenceLog`` at sample 1.0 with a producer that only
  counts, ``ApiKeys`` with one key), served by a ``grpc.aio`` server with the
  app's options;

and a ``grpc.aio`` client in this process: per round and target, a fixed rate
(``--rate``, 200/s, ``--seconds``) -- the proxy process's CPU per request from
``/proc/<pid>/task/*/schedstat`` -- and a closed loop at concurrency 16 (throughput).
Floor and gateway alternate ``--rounds`` times; medians are printed.

``--variants``: more gateways (or ``floorx``, the floor with one gateway trait
at a time) with their own environment, e.g. ``head:GWP_ROOT=/tmp/head`` (the
services/ and cdl/ of ``git archive HEAD``), ``nolog:GWP_LOG=0``,
``fall:GWP_MODE=floorx;FX_OPTS=1;FX_TIMEOUT=1;FX_REG=1;FX_CTX=1``.

``--hold S``: after start-up, drive the gateway at the fixed rate for S seconds
and print its pid first (for ``py-spy record --pid``). Not a test; a tool.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if os.environ.get("GWP_ROOT"):  # another checkout's services/ and cdl/ (e.g. `git archive HEAD`), to A/B
    sys.path.insert(0, os.environ["GWP_ROOT"])

SERVICE = "inference.GRPCInferenceService"
from bench._common import closed_loop, fixed_rate  # noqa: E402 - after the sys.path entries

METHOD = f"/{SERVICE}/ModelInfer"
MODEL = "digits_bench"
KEY = "bench-key"
N_IN, N_OUT = 64, 10


def _request() -> bytes:
    from cdl.v1 import open_inference_pb2 as pb

    x = np.random.default_rng(0).random((1, N_IN), dtype=np.float32) * 16
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="input", datatype="FP32", shape=[1, N_IN])
    req.raw_input_contents.append(x.tobytes())
    return bytes(req.SerializeToString())


def _response() -> bytes:
    from cdl.v1 import open_inference_pb2 as pb

    y = np.random.default_rng(1).random((1, N_OUT), dtype=np.float32)
    resp = pb.ModelInferResponse(model_name=MODEL, model_version="1", id="x")
    resp.outputs.add(name="output", datatype="FP32", shape=[1, N_OUT])
    resp.raw_output_contents.append(y.tobytes())
    return bytes(resp.SerializeToString())


# ------------------------------------------------------------------ servers (subprocess modes)


async def _fake_triton(port: int) -> None:
    import grpc
    import grpc.aio

    answer = _response()

    async def infer(request: bytes, context: Any) -> bytes:
        return answer

    async def ready(request: bytes, context: Any) -> bytes:
        return b"\x08\x01"

    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
        "ServerReady": grpc.unary_unary_rpc_method_handler(ready),
        "ModelReady": grpc.unary_unary_rpc_method_handler(ready),
        "ServerLive": grpc.unary_unary_rpc_method_handler(ready),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


class _CountingProducer:
    def __init__(self) -> None:
        self.sent = 0

    def send_raw(self, topic: str, value: Any, key: Any = None, headers: Any = None, on_delivery: Any = None) -> None:
        self.sent += 1

    def poll(self, timeout_s: float = 0.0) -> None:
        pass


async def _gateway(port: int, upstream: str) -> None:
    import grpc
    import grpc.aio

    from cdl.auth import ApiKeys, hash_key
    from services.gateway.dataplane.backends import TritonPool, channel_options
    from services.gateway.dataplane.server import InferenceService
    from services.gateway.inference_log import InferenceLog
    from services.gateway.rollout.machine import RolloutManager, RolloutPolicy
    from services.gateway.routing import RoutingTable

    table = RoutingTable()
    manager = RolloutManager(table, RolloutPolicy(), time.monotonic)
    manager.begin(MODEL, 1)
    manager.loaded(MODEL, 1, True)
    manager.warmed(MODEL, 1, True)
    if table.get(MODEL) is None or not table.get(MODEL).stable:  # type: ignore[union-attr]
        raise SystemExit(f"no route after begin/loaded: {table.all()}")
    producer = _CountingProducer()
    ilog = InferenceLog(
        producer if os.environ.get("GWP_LOG", "1") == "1" else None,
        "inference.logged",
        sample=1.0,
        **({"interval_s": float(os.environ["GWP_LOG_INTERVAL"])} if os.environ.get("GWP_LOG_INTERVAL") else {}),
    )
    keys = ApiKeys([hash_key(KEY)])
    # GWP_OPTS="name=int;name=int": more channel arguments, on the server and the pool's channels
    extra_opts = [
        (k, int(v)) for k, v in (kv.split("=", 1) for kv in filter(None, os.environ.get("GWP_OPTS", "").split(";")))
    ]
    pool = TritonPool([upstream], 16 << 20, health_interval_s=1.0)
    pool._options = [*pool._options, *extra_opts]
    await pool.start()
    server = grpc.aio.server(options=[*channel_options(16 << 20), ("grpc.so_reuseport", 0), *extra_opts])
    service = InferenceService(table, pool, manager, ilog, keys, 10.0, 16 << 20)
    server.add_generic_rpc_handlers((service.handler(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    try:
        await server.wait_for_termination()
    finally:
        print(f"log records sent: {producer.sent}", flush=True)


async def _floorx(port: int, upstream: str) -> None:
    """The floor with one gateway trait at a time (env knobs), to attribute the gateway's cost:
    FX_OPTS (channel_options on server and channel), FX_TIMEOUT (forward with a deadline),
    FX_REG (registered method), FX_CTX (read invocation_metadata and time_remaining)."""
    import grpc
    import grpc.aio

    from services.gateway.dataplane.backends import channel_options

    on = lambda k: os.environ.get(k) == "1"  # noqa: E731
    opts = channel_options(16 << 20) if on("FX_OPTS") else []
    channel = grpc.aio.insecure_channel(upstream, options=opts)
    if on("FX_REG"):
        call = channel.unary_unary(METHOD, None, None, _registered_method=True)  # type: ignore[call-arg]
    else:
        call = channel.unary_unary(METHOD)
    timeout = on("FX_TIMEOUT")
    ctx = on("FX_CTX")

    async def handle(request: bytes, context: Any) -> bytes:
        if ctx:
            context.invocation_metadata()
            context.time_remaining()
        if timeout:
            return bytes(await call(request, timeout=10.0))
        return bytes(await call(request))

    server = grpc.aio.server(options=opts)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": grpc.unary_unary_rpc_method_handler(handle)}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


# ------------------------------------------------------------------ client


def _cpu_s(pid: int) -> float:
    """CPU seconds of every thread of ``pid`` (schedstat: nanoseconds, not clock ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1e9


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{args} did not start: {line!r}")
    return proc


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", nargs="?", default="bench", choices=["bench", "triton", "gateway", "floorx"])
    p.add_argument("args", nargs="*")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--hold", type=float, default=0.0)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument(
        "--variants",
        default="",
        help="more gateways, comma-separated NAME:ENV=VALUE;ENV=VALUE (e.g. nolog:GWP_LOG=0, head:GWP_ROOT=/tmp/old)",
    )
    a = p.parse_args()
    if a.mode == "triton":
        asyncio.run(_fake_triton(int(a.args[0])))
        return
    if a.mode == "gateway":
        asyncio.run(_gateway(int(a.args[0]), a.args[1]))
        return
    if a.mode == "floorx":
        asyncio.run(_floorx(int(a.args[0]), a.args[1]))
        return

    tport, fport, gport = _free_port(), _free_port(), _free_port()
    upstream = f"127.0.0.1:{tport}"
    procs = [_spawn([sys.executable, __file__, "triton", str(tport)])]
    try:
        procs.append(_spawn([sys.executable, str(ROOT / "bench" / "_floor_proxy.py"), str(fport), upstream]))
        procs.append(_spawn([sys.executable, __file__, "gateway", str(gport), upstream]))
        extra = {}
        for spec in filter(None, a.variants.split(",")):
            vname, _, envs = spec.partition(":")
            env = dict(kv.split("=", 1) for kv in filter(None, envs.split(";")))
            port = _free_port()
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                mode = env.get("GWP_MODE", "gateway")
                proc = _spawn([sys.executable, __file__, mode, str(port), upstream])
                extra[vname] = (f"127.0.0.1:{port}", proc, env.get("GWP_AUTH", "1") == "1")
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            procs.append(extra[vname][1])
        request = _request()
        auth = (("authorization", f"Bearer {KEY}"),)
        targets = {
            "floor": (f"127.0.0.1:{fport}", (), procs[1].pid),
            "gateway": (f"127.0.0.1:{gport}", auth, procs[2].pid),
        }
        for vname, (addr, proc, with_key) in extra.items():
            targets[vname] = (addr, auth if with_key else (), proc.pid)
        if a.hold:
            print(f"gateway pid {procs[2].pid}", flush=True)
            asyncio.run(fixed_rate(targets["gateway"][0], request, auth, a.rate, a.hold))
            return
        figures: dict[str, dict[str, list[float]]] = {n: {"cpu": [], "p50": [], "rps": []} for n in targets}
        for rnd in range(1, a.rounds + 1):
            for name, (target, metadata, pid) in targets.items():
                c0 = _cpu_s(pid)
                lat = asyncio.run(fixed_rate(target, request, metadata, a.rate, a.seconds))
                cpu = (_cpu_s(pid) - c0) / len(lat) * 1e6
                rps = (
                    float("nan")
                    if a.skip_throughput
                    else asyncio.run(closed_loop(target, request, metadata, a.seconds, a.concurrency))
                )
                f = figures[name]
                f["cpu"].append(cpu)
                f["p50"].append(float(np.median(lat)) * 1000)
                f["rps"].append(rps)
                print(f"round {rnd} {name:8s} cpu {cpu:5.0f} us/req  p50 {f['p50'][-1]:.2f} ms  {rps:,.0f} req/s")
        med = {n: {k: statistics.median(v) for k, v in f.items()} for n, f in figures.items()}
        for n, f in med.items():
            print(f"median {n:8s} cpu {f['cpu']:5.0f} us/req  p50 {f['p50']:.2f} ms  {f['rps']:,.0f} req/s")
        g, fl = med["gateway"], med["floor"]
        print(
            f"cpu ratio {g['cpu'] / fl['cpu']:.3f} (goal <= 1.25); throughput ratio {g['rps'] / fl['rps']:.3f} (>= 0.9)"
        )
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=10)
                if out and out.strip():
                    print(out.strip())
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
