"""bench/tuner: trial-epochs the tuner (TPE + Hyperband pruning) spends to reach the best
validation accuracy random search (no pruning) finds, on the same budget of trials.

Same data (scikit-learn's digits, the CNN family and its search space; a
small training part, ~290 records, and the rest of the train split, ~1,150,
for validation, so that accuracy depends on the parameters), same seed per
pair, trials in one process on SQLite (what is measured is the search, not
the storage). For each seed:

- random search runs ``CDL_BENCH_TUNER_TRIALS`` (20) trials of up to
  ``CDL_BENCH_TUNER_EPOCHS`` (10) epochs each, unpruned; its best validation
  accuracy is the target, and the epochs it spent until it first reached it
  (counting trials in order, epoch by epoch) are the baseline;
- the tuner runs the same budget with TPE and Hyperband; its figure is the
  epochs it spent until any trial first reached the target. When no trial
  reached it, the figure is the whole budget, ``TRIALS x EPOCHS`` (more than
  it spent: a pruner that stops every trial early spends little and reaches
  nothing, and counting what it spent would reward that), printed as "not
  reached".

Prints a row per seed, then ``RESULT tuner_trial_epochs`` with the medians
over ``CDL_BENCH_TUNER_SEEDS`` (5) seeds (goal: ratio <= 0.5).
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

TRIALS = int(os.environ.get("CDL_BENCH_TUNER_TRIALS", "20"))
EPOCHS = int(os.environ.get("CDL_BENCH_TUNER_EPOCHS", "10"))
SEEDS = int(os.environ.get("CDL_BENCH_TUNER_SEEDS", "5"))
#: share of the train split the trials are validated on (the rest, ~290 records, trains)
VAL_FRACTION = float(os.environ.get("CDL_BENCH_TUNER_VAL_FRACTION", "0.8"))
#: the tuner's pruner (hyperband or asha), its minimum epochs, and TPE's random start-up trials
PRUNER = os.environ.get("CDL_BENCH_TUNER_PRUNER", "hyperband")
MIN_EPOCHS = int(os.environ.get("CDL_BENCH_TUNER_MIN_EPOCHS", "2"))
STARTUP = int(os.environ.get("CDL_BENCH_TUNER_STARTUP", "5"))
#: TPE's share of "good" trials (StudyPlan.tpe_gamma; Optuna's own default is 0.1)
GAMMA = float(os.environ.get("CDL_BENCH_TUNER_GAMMA", "0.25"))


def _data() -> tuple[Any, Any]:
    import numpy as np
    from sklearn.datasets import load_digits

    from cdl.datasets import DatasetSpec, DatasetVersion, Task
    from cdl.ml.core import split_version

    digits = load_digits()
    n = len(digits.data)
    labels = tuple(str(i) for i in range(10))
    spec = DatasetSpec(name="bench-digits", task=Task.IMAGE, labels=labels, input_shape=(1, 8, 8))
    data = DatasetVersion(
        spec=spec,
        version=1,
        manifest={"shards": [], "offset_ranges": []},
        ids=np.array([f"r{i}" for i in range(n)]),
        labels=digits.target.astype(np.int64),
        split=(np.arange(n) % 5 == 0).astype(np.uint8),
        x=digits.data.reshape(-1, 1, 8, 8).astype(np.float32),
        text=None,
    )
    # a small training part and a large validation part: accuracy then depends on the
    # parameters (with 80% for training every reasonable trial reaches 1.0 on digits)
    return spec, split_version(data, VAL_FRACTION, 0)


def _curves(storage: str, study: str) -> list[list[float]]:
    import optuna

    trials = sorted(optuna.load_study(study_name=study, storage=storage).trials, key=lambda t: t.number)
    return [list(t.user_attrs.get("curve", [])) for t in trials]


def _epochs_to(curves: list[list[float]], target: float) -> tuple[int, bool]:
    """Epochs spent (trials in order) until an epoch first reached ``target``; all when never."""
    spent = 0
    for curve in curves:
        for acc in curve:
            spent += 1
            if acc >= target - 1e-12:
                return spent, True
    return spent, False


def main() -> None:
    import torch

    from cdl.ml.models import Family
    from cdl.ml.space import space_for
    from services.tuner.study import StudyPlan, run_study

    torch.set_num_threads(2)
    console = Console()
    console.print(f"machine: {machine()}; {SEEDS} seeds x {TRIALS} trials x <= {EPOCHS} epochs, digits CNN")
    console.print(f"tuner: TPE ({STARTUP} random start-up trials, gamma {GAMMA}) + {PRUNER} (min {MIN_EPOCHS} epochs)")
    spec, split = _data()
    table = Table(title="trial-epochs to reach random search's best validation accuracy")
    for col in ("seed", "target acc", "random: epochs", "random: all", "tuner: epochs", "tuner: all", "ratio", "s"):
        table.add_column(col)
    tuner_epochs: list[int] = []
    random_epochs: list[int] = []
    with tempfile.TemporaryDirectory(prefix="cdl-bench-tuner-") as tmp:
        storage = f"sqlite:///{tmp}/bench.db"
        for seed in range(SEEDS):
            t0 = time.monotonic()
            common: dict[str, Any] = {
                "storage": storage,
                "spec": spec,
                "space": space_for(Family.CNN),
                "n_trials": TRIALS,
                "max_epochs": EPOCHS,
                "seed": seed,
            }
            with console.status(f"seed {seed}: random search"):
                run_study(StudyPlan(study=f"random-{seed}", sampler="random", pruner="none", **common), split, 0)
            rc = _curves(storage, f"random-{seed}")
            target = max(max(c) for c in rc if c)
            r_epochs, _ = _epochs_to(rc, target)
            # the training seed is the pair's; the sampler's differs (TPE's first trials are random:
            # with the same sampler seed they would repeat random search's first trials exactly)
            tpe = StudyPlan(
                study=f"tuner-{seed}",
                sampler="tpe",
                pruner=PRUNER,
                prune_min_epochs=MIN_EPOCHS,
                startup_trials=STARTUP,
                tpe_gamma=GAMMA,
                sampler_seed=seed + 1000,
                **common,
            )
            with console.status(f"seed {seed}: tuner (TPE + {PRUNER})"):
                run_study(tpe, split, 0)
            tc = _curves(storage, f"tuner-{seed}")
            t_epochs, reached = _epochs_to(tc, target)
            if not reached:
                t_epochs = TRIALS * EPOCHS
            tuner_epochs.append(t_epochs)
            random_epochs.append(r_epochs)
            table.add_row(
                str(seed),
                f"{target:.4f}",
                str(r_epochs),
                str(sum(len(c) for c in rc)),
                str(t_epochs) + ("" if reached else " (not reached)"),
                str(sum(len(c) for c in tc)),
                f"{t_epochs / r_epochs:.2f}",
                f"{time.monotonic() - t0:.0f}",
            )
            best = max((max(c) for c in tc if c), default=0.0)
            console.print(
                f"seed {seed}: random {r_epochs} epochs to {target:.4f}; tuner {t_epochs} ({reached=}; "
                f"its best {best:.4f})"
            )
    console.print(table)
    tv, rv = statistics.median(tuner_epochs), statistics.median(random_epochs)
    print(f"medians over {SEEDS} seeds: tuner {tv} trial-epochs, random {rv}")
    print(result("tuner_trial_epochs", tv, rv, op="<=", goal=0.5, unit="trial-epochs"))


if __name__ == "__main__":
    main()
