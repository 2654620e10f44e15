"""bench/soak: the demo feed for a long run; do the services' memory and the ingest snapshot stay flat?

A private local stack with the ingest, trainer and compressor services; the
digits demo feed (``cdl stack up --demo``'s) streams ``CDL_BENCH_SOAK_RATE``
records/s (100) for ``CDL_BENCH_SOAK_S`` seconds (1,800: 30 minutes). After
``CDL_BENCH_SOAK_WARMUP_S`` (180 s: the first versions trained and compressed,
every code path used once) each service's resident memory is the baseline;
at the end it is measured again, with the size of the ingest state snapshot
(the record every ingest transaction writes) at both points.

Not in CI (it takes half an hour). Prints, per service, its RSS at start,
after warm-up and at the end, then ``RESULT soak_rss_growth`` for the service
that grew the most (goal: end RSS <= 1.2 x its RSS after warm-up) and, before
it, ``RESULT soak_snapshot_growth`` (goal <= 1.2 as well).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from bench._common import machine, result, rss_mib

DURATION_S = float(os.environ.get("CDL_BENCH_SOAK_S", "1800"))
WARMUP_S = float(os.environ.get("CDL_BENCH_SOAK_WARMUP_S", "180"))
RATE = float(os.environ.get("CDL_BENCH_SOAK_RATE", "100"))
SERVICES = ["ingest", "trainer", "compressor", "gateway"]
#: the log line each service writes per unit of work (counted at the end)
MARKERS = {
    "ingest": "dataset version committed",
    "trainer": "model version trained",
    "compressor": "model version compressed",
    "gateway": '"state": "PROMOTED"',
}


def _snapshot_bytes(bootstrap: str) -> int:
    from cdl.kafka.state import read_state
    from services.ingest.partitions import LEGACY_STATE_KEY

    # one snapshot per dataset (ingest-state/<dataset>); the old single one if it is still there
    return sum(len(v) for v in read_state(bootstrap, "cdl.ingest.state", LEGACY_STATE_KEY).values())


def _versions(state_dir: Path) -> str:
    logs = {name: state_dir / name / f"{name}.log" for name in SERVICES}
    counts = []
    for name, path in logs.items():
        text = path.read_text(errors="replace") if path.exists() else ""
        counts.append(f"{name} {text.count(MARKERS.get(name, '?'))}")
    return ", ".join(counts)


def main() -> None:
    import tempfile

    from cdl_tools.demo import DigitsFeed, register_digits
    from cdl_tools.settings import StackSettings
    from cdl_tools.stack import LocalStack

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stack on the way out
    print(f"machine: {machine()}; {DURATION_S:.0f} s at {RATE:.0f} records/s, warm-up {WARMUP_S:.0f} s")
    with tempfile.TemporaryDirectory(prefix="cdl-soak-") as tmp:
        settings = StackSettings(  # plaintext: comparable with earlier runs (bench/secure measures SASL_SSL)
            state_dir=Path(tmp), triton_servers=1, services=SERVICES, kafka_security="plaintext", minio_tls=False
        )
        stack = LocalStack(settings)
        try:
            state: dict[str, Any] = stack.up()
            bootstrap = state["kafka"]["bootstrap"]
            pids: dict[str, int] = {}
            for name in SERVICES:  # the services' own processes, not their supervisors
                pid = stack.service_pid(name)
                assert pid is not None, f"{name} is not running"
                pids[name] = pid
            register_digits(state["services"]["ingest"]["grpc"], api_key=state.get("ingest_key"))
            start_rss = {n: rss_mib(p) for n, p in pids.items()}
            feed = DigitsFeed(bootstrap, rate=RATE).start()
            warm_rss: dict[str, float] = {}
            warm_snap = 0
            t0 = time.monotonic()
            with Progress(
                TextColumn("[bold]soak"), BarColumn(), TextColumn("{task.description}"), TimeRemainingColumn()
            ) as progress:
                task = progress.add_task("", total=DURATION_S)
                while (elapsed := time.monotonic() - t0) < DURATION_S:
                    if not warm_rss and elapsed >= WARMUP_S:
                        warm_rss = {n: rss_mib(p) for n, p in pids.items()}
                        warm_snap = _snapshot_bytes(bootstrap)
                        progress.console.print(f"after warm-up: RSS {warm_rss} MiB, snapshot {warm_snap} bytes")
                    rss = " ".join(f"{n} {rss_mib(p):.0f}M" for n, p in pids.items())
                    progress.update(task, completed=elapsed, description=f"{feed.sent} sent; RSS {rss}")
                    time.sleep(5)
            feed.stop()
            end_rss = {n: rss_mib(p) for n, p in pids.items()}
            end_snap = _snapshot_bytes(bootstrap)
            print(f"records sent: {feed.sent}; versions/trainings/compressions in logs: {_versions(Path(tmp))}")
        finally:
            stack.down(purge=True)
    for name in SERVICES:
        print(
            f"{name:10s} RSS start {start_rss[name]:7.1f} MiB  after warm-up {warm_rss[name]:7.1f} MiB  "
            f"end {end_rss[name]:7.1f} MiB  ({end_rss[name] / warm_rss[name]:.3f}x)"
        )
    print(f"ingest snapshot: {warm_snap} bytes after warm-up, {end_snap} bytes at the end")
    for name in SERVICES:
        print(result(f"soak_rss_growth_{name}", end_rss[name], warm_rss[name], op="<=", goal=1.2, unit="MiB"))
    print(result("soak_snapshot_growth", end_snap, warm_snap, op="<=", goal=1.2, unit="bytes"))
    worst = max(SERVICES, key=lambda n: end_rss[n] / warm_rss[n])
    print(f"(worst: {worst})")
    print(result("soak_rss_growth", end_rss[worst], warm_rss[worst], op="<=", goal=1.2, unit="MiB"))


if __name__ == "__main__":
    main()
