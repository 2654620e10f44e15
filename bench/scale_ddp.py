"""bench/scale_ddp: samples/s of one training on two processes (DDP through torchrun) against one.

The trainer's own path (``cdl.ml.core.fit`` with ``processes``, as ``CDL_TRAINER_PROCESSES``
sets it): the digits CNN, scikit-learn digits repeated to ``CDL_BENCH_DDP_SAMPLES`` (20,000)
samples, the family's batch size (64: the batch over all processes, so each of two computes
32), ``CDL_BENCH_DDP_EPOCHS`` (3) epochs, no early stopping, on the CPU:

- **1 process** through torchrun (gloo, the process's threads on every core),
- **2 processes** through torchrun (gloo, each its share of the cores),
- and, for the record, the training in the calling process (the trainer with ``processes=1``).

samples/s is the training epochs' (``EpochMetrics.samples_per_s``: every process's share
together, per second of epoch), the median over the epochs after the first (which pays for
warming up) of ``CDL_BENCH_DDP_REPEATS`` (2) alternating repeats; torchrun's start-up (seconds:
each process imports torch) is left out of it and printed apart as the whole call's time. The holdout
accuracy of each model is printed beside it: the same seed trains the same model on any number
of processes, to rounding and dropout.

``RESULT ddp_2_vs_1_samples_per_s value=<2 processes' samples/s> baseline=<1 process's>``
(goal >= 1.0: on 2 cores two processes share the cores one had).

``python -m bench.scale_ddp``; bench/scale.py calls :func:`run`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from sklearn.datasets import load_digits

from bench._common import machine, result
from cdl.datasets import DatasetSpec, DatasetVersion, Task
from cdl.ml.core import TrainSplit, assess, build_seeded, fit_preprocessor, hyperparameters, split_version
from cdl.ml.distributed import train_distributed
from cdl.ml.models import ModelConfig
from cdl.ml.train import TrainConfig, train

__all__ = ["main", "run"]

SAMPLES = int(os.environ.get("CDL_BENCH_DDP_SAMPLES", "20000"))
EPOCHS = int(os.environ.get("CDL_BENCH_DDP_EPOCHS", "3"))
REPEATS = int(os.environ.get("CDL_BENCH_DDP_REPEATS", "2"))
SPEC = DatasetSpec(name="digits-ddp", task=Task.IMAGE, labels=tuple(str(i) for i in range(10)), input_shape=(1, 8, 8))


def _split() -> TrainSplit:
    d = load_digits()
    reps = -(-SAMPLES // len(d.data))
    x = np.tile(d.data.reshape(-1, 1, 8, 8), (reps, 1, 1, 1))[:SAMPLES].astype(np.float32)
    y = np.tile(d.target, reps)[:SAMPLES].astype(np.int64)
    n = len(x)
    ids = np.array([f"r{i}" for i in range(n)])
    data = DatasetVersion(
        SPEC, 1, {"shards": [], "offset_ranges": []}, ids, y, (np.arange(n) % 5 == 0).astype(np.uint8), x, None
    )
    return split_version(data, 0.1, seed=0)


def run(console: Console) -> list[str]:
    """Train 1 and 2 processes (and in-process); print the figures; return the RESULT lines."""
    console.print(f"machine: {machine()}; torch {torch.__version__}, CPU")
    split = _split()
    hp = hyperparameters("cnn", {"epochs": EPOCHS})
    batch = int(hp["batch_size"])
    console.print(
        f"digits CNN, {len(split.x_train):,} training samples, batch {batch} over all processes, {EPOCHS} epochs"
    )
    pre = fit_preprocessor("cnn", SPEC.task, split.x_train, hp)
    xt, xv = pre.transform(split.x_train), pre.transform(split.x_val)
    cfg = TrainConfig(EPOCHS, batch, float(hp["lr"]), float(hp["weight_decay"]), patience=0, device="cpu")
    config = ModelConfig("cnn", SPEC.input_shape, len(SPEC.labels), hp)
    runs = {"in-process": 0, "torchrun 1 process": 1, "torchrun 2 processes": 2}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("training", total=len(runs) * REPEATS)
        for repeat in range(REPEATS):
            for name, processes in runs.items():
                progress.update(task, description=f"{name} (repeat {repeat + 1})")
                module = build_seeded(config, seed=0)
                t0 = time.perf_counter()
                if processes:
                    res = train_distributed(
                        module, cfg, xt, split.y_train, xv, split.y_val, processes=processes, timeout_s=600
                    )
                else:
                    res = train(module, xt, split.y_train, xv, split.y_val, cfg)
                wall = time.perf_counter() - t0
                acc = assess(module, pre, split.x_hold, split.y_hold, False).score
                steady = [m.samples_per_s for m in res.history[1:]] or [res.samples_per_s]
                rates[name] += steady
                console.print(
                    f"  {name}: {statistics.median(steady):,.0f} samples/s (epochs after the first), "
                    f"call {wall:.1f} s, holdout accuracy {acc:.4f}"
                )
                progress.advance(task)
    figures = {name: statistics.median(r) for name, r in rates.items()}
    console.print("median: " + ", ".join(f"{name} {v:,.0f} samples/s" for name, v in figures.items()))
    one, two = figures["torchrun 1 process"], figures["torchrun 2 processes"]
    lines = [
        result("ddp_2_vs_1_samples_per_s", two, one, op=">=", goal=1.0, unit="samples/s"),
        result("ddp_2_vs_in_process_samples_per_s", two, figures["in-process"], op=">=", goal=1.0, unit="samples/s"),
    ]
    for line in lines:
        console.print(line, soft_wrap=True)
    return lines


def main() -> None:
    run(Console())


if __name__ == "__main__":
    main()
