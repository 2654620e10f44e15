"""Shared helpers for the benchmarks: a private local stack and the RESULT line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: the Open Inference Protocol's inference method
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@contextlib.contextmanager
def private_stack(triton_servers: int = 1) -> Iterator[dict[str, Any]]:
    """Start a stack of our own (fresh state dir) and stop it afterwards."""
    # imported here: the trainer benchmark runs on machines without the stack's clients
    from cdl_tools.settings import StackSettings
    from cdl_tools.stack import LocalStack, service_env

    with tempfile.TemporaryDirectory(prefix="cdl-bench-") as tmp:
        stack = LocalStack(
            # plaintext Kafka and MinIO: the figures compare with earlier runs; bench/secure measures
            # what SASL_SSL and TLS cost
            StackSettings(
                state_dir=Path(tmp),
                triton_servers=triton_servers,
                services=[],
                kafka_security="plaintext",
                minio_tls=False,
            )
        )
        try:
            state = stack.up()
            os.environ.update(service_env(state))  # what the stack gives its services
            yield state
        finally:
            stack.down(purge=True)


def machine() -> str:
    cpus = os.cpu_count() or 0
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()} {cpus} cores {mem:.0f} GiB, Python {platform.python_version()}"


def result(name: str, value: float, baseline: float, *, op: str, goal: float, unit: str = "") -> str:
    ratio = value / baseline if baseline else float("nan")
    ok = ratio >= goal if op == ">=" else ratio <= goal
    line = (
        f"RESULT {name} value={value:.6g} baseline={baseline:.6g} ratio={ratio:.4f} goal={op}{goal} "
        f"pass={'true' if ok else 'false'}"
    )
    if unit:
        line += f" unit={unit}"
    return line


def cpu_usage(groups: dict[str, int]) -> dict[str, tuple[float, int]]:
    """CPU seconds (user + system) and minor page faults so far, per named process group.

    ``groups`` maps a name to a process-group leader's pid; every live member counts.
    Differences between two calls say where a measured interval's CPU went.
    """
    from cdl_tools.stack._procs import _stat, group_members

    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, tuple[float, int]] = {}
    for name, pgid in groups.items():
        cpu, faults = 0.0, 0
        for pid in group_members(pgid) or [pgid]:
            st = _stat(pid)
            if st is not None:  # rest[7] minflt (field 10), rest[11..12] utime, stime (fields 14, 15)
                cpu += (int(st[11]) + int(st[12])) / tick
                faults += int(st[7])
        out[name] = (cpu, faults)
    return out


def cpu_report(before: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]]) -> str:
    """``name 1.23s cpu (45k faults), ...`` for the interval between two :func:`cpu_usage` calls."""
    parts = []
    for name, (cpu, faults) in after.items():
        cpu0, faults0 = before.get(name, (0.0, 0))
        parts.append(f"{name} {cpu - cpu0:.2f}s ({(faults - faults0) / 1000:.0f}k faults)")
    return ", ".join(parts)


def rss_mib(pid: int) -> float:
    """Resident memory of process group ``pid`` (every live member), MiB."""
    from cdl_tools.stack._procs import group_members

    kib = 0
    for p in group_members(pid) or [pid]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kib += int(line.split()[1])
        except FileNotFoundError:
            continue
    return kib / 1024


async def fixed_rate(
    target: str,
    request: bytes,
    metadata: Any,
    rate: float,
    seconds: float,
    method: str = MODEL_INFER,
    tls_ca: bytes | None = None,
) -> list[float]:
    """Latencies of requests sent open-loop at ``rate`` per second for ``seconds`` (failures are
    printed); over TLS, trusting the CA ``tls_ca`` (PEM), when given."""
    import grpc

    if tls_ca is not None:
        channel_cm = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca))
    else:
        channel_cm = grpc.aio.insecure_channel(target)
    async with channel_cm as channel:
        call = channel.unary_unary(method)
        for _ in range(20):  # warm the connection
            await call(request, metadata=metadata, timeout=10)
        latencies: list[float] = []
        failures = 0

        async def one() -> None:
            nonlocal failures
            t = time.perf_counter()
            try:
                await call(request, metadata=metadata, timeout=10)
                latencies.append(time.perf_counter() - t)
            except grpc.RpcError as exc:
                failures += 1
                if failures == 1:
                    print(f"    failed: {exc}")

        tasks = []
        n = int(rate * seconds)
        t0 = time.perf_counter()
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        if failures:
            print(f"    {failures} failed requests at {target}")
        return latencies


async def closed_loop(
    target: str, request: bytes, metadata: Any, seconds: float, concurrency: int, method: str = MODEL_INFER
) -> float:
    """Requests per second with ``concurrency`` callers each waiting for its answer."""
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method)
        await call(request, metadata=metadata, timeout=10)
        done = 0
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await call(request, metadata=metadata, timeout=10)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0)


def assign_all(consumer: Any, topic: str, offset: int, timeout_s: float = 10.0) -> None:
    """Assign ``consumer`` every partition of ``topic`` from ``offset`` (cdl's topics have several)."""
    from confluent_kafka import TopicPartition

    meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    partitions = sorted(meta.partitions) if meta is not None and meta.error is None else [0]
    consumer.assign([TopicPartition(topic, p, offset) for p in partitions])
