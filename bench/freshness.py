"""bench/freshness: how long from fresh data to a model trained on it answering at the gateway?

The demo's stack (all six services, one Triton server) in a fresh state directory, and
the demo's data (cdl_tools/demo.py: every digit image once per wave, under ids that keep each
image in its own split). Clients call the gateway all along (20 requests/s, held-out
images, no labels, so only the waves fire dataset versions). For each wave:

- **start**: the wave's last record is acknowledged by Kafka (the dataset's policy is one
  wave, 1,797 records, so that record fires the dataset version);
- **end**: the first client answer by the model version trained on that dataset version
  (the canary's first step);
- **compute**: the trainer's ``duration_s`` plus the compressor's (training, and the
  compression: export, variants, their measurements); the tuner studies beside the
  trainer and is on no wave's path;
- **everything else**: the rest: Kafka hops, ingest's shard and version writes, the
  object store, waiting for a busy service, Triton's load, warm-up, the canary's first step.

The next wave is sent once the previous version answered. Every wave re-sends the same images,
so two versions are within noise of each other and the trainer's gate would turn about half
of them down: the gate is not what is measured here, so it accepts every version
(``CDL_TRAINER_TOLERANCE=1``). Prints a row per wave and, last,
``RESULT freshness_overhead_s`` (the median "everything else"; baseline 3 s, goal ratio <= 1).
``CDL_BENCH_FRESHNESS_WAVES`` (default 5) sets the number of waves.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.table import Table

from bench._common import machine, result
from cdl_tools.demo_loop import Demo, DemoOptions

WAVES = int(os.environ.get("CDL_BENCH_FRESHNESS_WAVES", "5"))
BASELINE_S = 3.0


def _hops(demo: Demo, rows: list[Any]) -> dict[str, list[float]]:
    """The non-compute time of each wave by hop, from the events' Kafka timestamps."""
    from cdl.v1 import events_pb2

    v = demo.view
    cut = {int(u.version): ts for ts, u in v.versions}
    fired = {}
    ends = sorted(demo.wave_ends)
    for dv, ts in sorted(cut.items()):
        before = [t for t in ends if t <= ts]
        if before:
            fired[dv] = before[-1]
    answered = demo.clients.first_answer() if demo.clients is not None else {}
    out: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        out.setdefault(name, []).append(value)

    for r in rows:
        mv, dv = r.model_version, r.dataset_version
        trained_at, compressed_at = v.trained[mv][0], v.compressed[mv][0]
        traffic = [
            ts
            for ts, d in v.deployed
            if d.version == mv and (d.traffic_fraction > 0 or d.state == events_pb2.ROLLOUT_STATE_PROMOTED)
        ]
        loaded = [ts for ts, d in v.deployed if d.version == mv and d.state == events_pb2.ROLLOUT_STATE_LOADED]
        if dv not in fired or dv not in cut or not traffic or mv not in answered:
            continue
        add("ingest: firing record -> data.updated", cut[dv] - fired[dv])
        add("trainer: data.updated -> model.trained, less training", trained_at - cut[dv] - r.train_s)
        add(
            "compressor: model.trained -> model.compressed, less compression", compressed_at - trained_at - r.compress_s
        )
        if loaded:
            add("gateway: model.compressed -> loaded (Triton load)", min(loaded) - compressed_at)
            add("gateway: loaded -> traffic (warm-up)", min(traffic) - min(loaded))
        add("gateway: model.compressed -> traffic", min(traffic) - compressed_at)
        add("gateway: traffic -> first client answer", answered[mv] - min(traffic))
    return out


def main() -> None:
    console = Console()
    console.print(f"machine: {machine()}; {WAVES} waves")
    os.environ.setdefault("CDL_TRAINER_TOLERANCE", "1")
    with tempfile.TemporaryDirectory(prefix="cdl-freshness-") as tmp:
        demo = Demo(
            DemoOptions(state_dir=Path(tmp) / "stack", report_dir=Path(tmp) / "report", rate=20, feedback_share=0.0),
            console,
        )
        try:
            demo.up(lambda c, p, d: None)
            newest = 0
            for wave in range(1, WAVES + 1):
                t0 = time.monotonic()
                demo.wave()
                if wave == 1:
                    newest = demo.answering(600)
                    demo.start_clients()
                else:
                    assert demo.clients is not None
                    deadline = time.monotonic() + 600
                    while time.monotonic() < deadline:
                        answered = [v for v in demo.clients.first_answer() if v > newest]
                        if answered:
                            newest = max(answered)
                            break
                        demo.tick(1.0)
                console.print(f"wave {wave}: v{newest} answering after {time.monotonic() - t0:.1f}s")
                if not newest:
                    raise SystemExit("no version answered")
            time.sleep(2)
            demo.tick(2.0)
            rows = demo.freshness_rows()
            hops = _hops(demo, rows)
        finally:
            demo.down()
    table = Table(title="freshness per wave (seconds)")
    for col in ("data", "model", "total", "training", "compression", "everything else"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            f"v{r.dataset_version}",
            f"v{r.model_version}",
            f"{r.total_s:.1f}",
            f"{r.train_s:.1f}",
            f"{r.compress_s:.1f}",
            f"{r.other_s:.1f}",
        )
    console.print(table)
    if not rows:
        raise SystemExit("no wave measured")
    console.print("where 'everything else' went (median seconds over the waves):")
    for name, values in hops.items():
        console.print(f"  {name:<58} {statistics.median(values):6.2f}")
    other = statistics.median(r.other_s for r in rows)
    total = statistics.median(r.total_s for r in rows)
    print(f"median total {total:.2f}s (training and compression included)")
    print(result("freshness_overhead_s", other, BASELINE_S, op="<=", goal=1.0, unit="s"))


if __name__ == "__main__":
    main()
