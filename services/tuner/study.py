"""One study: Optuna trials through the shared training core, on one or several worker
processes sharing a storage (transport-free: no Kafka, no grpc).

- **Storage by URL**: ``sqlite:///path`` (one host) or ``postgresql://…`` (several
  workers on several hosts), an ``RDBStorage`` with a heartbeat: a trial whose
  worker died (kill -9) stops beating and is marked FAIL by the next worker
  to start a trial (or by the coordinator), so no trial stays RUNNING.
- **Created once**: the coordinator (:func:`run_study`) creates the study
  before any worker starts (concurrent ``create_study`` calls race); workers
  only load it.
- **Budget**: ``n_trials`` finished trials (COMPLETE or PRUNED) counted over all
  workers (``MaxTrialsCallback``); the coordinator starts a worker again while
  the budget is not spent, so a killed worker costs a trial, never the study.
- **Trials** train on the version's train split, validated on a part carved
  from it (``cdl.ml.core.split_version``; the holdout is never read); each runs up
  to ``max_epochs`` epochs, and at most ``time_budget_s`` seconds (the time a version
  gets in the trainer, so slow parameters score what they reach in it), and reports
  its validation accuracy per epoch.
- **Pruning**, single objective: Optuna's pruner (Hyperband by default,
  or median) on the reported accuracy. Multi-objective studies cannot
  ``report``, so cdl prunes them by its own rule (:func:`should_stop`): from
  epoch ``prune_min_epochs`` on, a trial stops when its validation accuracy
  is below the median, at the same epoch, of the finished trials that got
  there, by more than ``prune_margin``.
- **Objectives**: ``accuracy`` (maximise), optionally with ``params``
  (parameter count) or ``latency`` (median ms of a batch-1 forward pass on the CPU),
  both minimised; the sampler is TPE (multivariate; single-objective with ``tpe_gamma``) for both kinds.
  A multi-objective study keeps its Pareto front; the point used is picked
  by :func:`pick`: the smallest second objective among the front's points
  whose accuracy is within ``pick_tolerance`` of the front's best.
- **Warm start**: a new study is seeded with the previous study's best parameters
  (an enqueued first trial).
- Every trial records its epochs (``user_attrs["epochs"]``) and curve
  (``user_attrs["curve"]``), so the trial-epochs a study spent are counted, and the
  process that runs it (``user_attrs["worker_pid"]``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import math
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import optuna
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from cdl.datasets import DatasetSpec
from cdl.errors import ConfigError
from cdl.logging import get_logger
from cdl.ml.core import SharedSplit, TrainSplit, fit, hyperparameters
from cdl.ml.family import family_of
from cdl.ml.space import Space, suggest
from cdl.ml.train import EpochMetrics

__all__ = [
    "StudyPlan",
    "StudyResult",
    "make_storage",
    "pick",
    "public_url",
    "run_study",
    "should_stop",
    "sweep_study_folders",
]

log = get_logger(__name__)

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

OBJECTIVES = ("accuracy", "params", "latency")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class StudyPlan:
    """Everything a worker needs to run trials of one study (picklable: sent to workers)."""

    study: str
    storage: str
    spec: DatasetSpec
    space: Space
    n_trials: int = 20
    max_epochs: int = 15
    time_budget_s: float = 0.0
    """Most seconds one trial trains (0: no limit); a trial stopped by it scores its best epoch."""
    objectives: tuple[str, ...] = ("accuracy",)
    pruner: str = "hyperband"
    prune_min_epochs: int = 2
    prune_margin: float = 0.02
    pick_tolerance: float = 0.01
    seed: int = 0
    warm_params: dict[str, Any] | None = None
    device: str = "cpu"
    heartbeat_s: int = 5
    grace_s: int = 15
    sampler: str = "tpe"
    """"tpe" or "random" (the benchmark's baseline, with pruner "none")."""
    sampler_seed: int | None = None
    """The sampler's seed (default: ``seed``); each worker adds its index."""
    startup_trials: int = 5
    """TPE's first trials, sampled at random before its model guides the search."""
    reduction_factor: int = 3
    """Hyperband and successive halving: a rung keeps the best 1/``reduction_factor`` of its trials."""
    nice: int = 0
    """Niceness the worker processes take (the tuner's ``worker_nice``)."""
    tpe_gamma: float = 0.25
    """Single-objective TPE: the share of finished trials that forms its "good" density (at
    least 1, at most 25 trials). Optuna's default, ``ceil(0.1 n)`` (and Hyperopt's,
    ``ceil(0.25 sqrt(n))``), models "good" on 2 trials of a 20-trial study, which clung to the
    best of its first random trials in bench/tuner.py; a quarter of them (5 of 20) did better."""

    def __post_init__(self) -> None:
        if not self.objectives or self.objectives[0] != "accuracy" or len(self.objectives) > 2:
            raise ConfigError("objectives: accuracy, optionally with params or latency", got=list(self.objectives))
        if any(o not in OBJECTIVES for o in self.objectives):
            raise ConfigError("unknown objective", got=list(self.objectives))
        if self.pruner not in ("hyperband", "asha", "median", "none"):
            raise ConfigError("pruner: hyperband, asha, median or none", got=self.pruner)
        if not 0.0 < self.tpe_gamma <= 1.0:
            raise ConfigError("tpe_gamma: a share of the finished trials, in (0, 1]", got=self.tpe_gamma)

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1


@dataclass
class StudyResult:
    study: str
    best_params: dict[str, Any]
    best_value: float
    objective_values: list[float]
    complete: int
    pruned: int
    failed: int
    trial_epochs: int
    front: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def public_url(url: str) -> str:
    """The storage URL without its password (for events and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def make_storage(plan: StudyPlan) -> RDBStorage:
    kwargs: dict[str, Any] = {}
    if plan.storage.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    else:
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    return RDBStorage(
        plan.storage,
        heartbeat_interval=plan.heartbeat_s,
        grace_period=plan.grace_s,
        **kwargs,
    )


def _sampler(plan: StudyPlan, worker: int) -> optuna.samplers.BaseSampler:
    seed = (plan.seed if plan.sampler_seed is None else plan.sampler_seed) * 1000 + worker
    if plan.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if plan.multi:  # multi-objective TPE keeps Optuna's own split
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=plan.startup_trials, constant_liar=True
        )
    with warnings.catch_warnings():
        # Optuna 4.9 deprecates ``gamma`` (removal planned for 6.0; pyproject keeps optuna < 6):
        # its default is what bench/tuner.py measured worse on 20-trial studies
        warnings.filterwarnings("ignore", message=".*`gamma` has been deprecated", category=FutureWarning)
        return optuna.samplers.TPESampler(
            seed=seed,
            multivariate=True,
            n_startup_trials=plan.startup_trials,
            constant_liar=True,
            gamma=functools.partial(_good_trials, plan.tpe_gamma),
        )


def _good_trials(share: float, finished: int) -> int:
    """TPE's gamma: how many of ``finished`` trials form the "good" density."""
    return min(max(1, math.ceil(share * finished)), 25)


def _pruner(plan: StudyPlan) -> optuna.pruners.BasePruner:
    if plan.multi or plan.pruner == "none":
        return optuna.pruners.NopPruner()
    # epochs are reported from 1: no trial is pruned before epoch prune_min_epochs
    if plan.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=plan.prune_min_epochs)
    if plan.pruner == "asha":  # successive halving: rungs at min, min*rf, min*rf^2, ...
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(1, plan.prune_min_epochs), reduction_factor=plan.reduction_factor
        )
    return optuna.pruners.HyperbandPruner(
        min_resource=max(1, plan.prune_min_epochs), max_resource=plan.max_epochs, reduction_factor=plan.reduction_factor
    )


def should_stop(curve: Sequence[float], finished: Sequence[Sequence[float]], min_epochs: int, margin: float) -> bool:
    """cdl's rule for multi-objective trials: at epoch ``len(curve)`` (>= ``min_epochs``), stop
    when the accuracy is below the median of the finished trials' accuracies at that epoch
    (at least 3 of them got there) by more than ``margin``."""
    epoch = len(curve)
    if epoch < min_epochs:
        return False
    at = [c[epoch - 1] for c in finished if len(c) >= epoch]
    return len(at) >= 3 and curve[-1] < statistics.median(at) - margin


def pick(front: Sequence[FrozenTrial], tolerance: float) -> FrozenTrial:
    """Of a Pareto front (accuracy maximised, the second objective minimised): the smallest
    second objective among the points within ``tolerance`` of the best accuracy."""
    best = max(t.values[0] for t in front)
    near = [t for t in front if t.values[0] >= best - tolerance]
    return min(near, key=lambda t: (t.values[1], -t.values[0], t.number))


def _latency_ms(module: Any, input_shape: Sequence[int]) -> float:
    import torch

    module = module.to("cpu").eval()
    x = torch.zeros((1, *input_shape)) if input_shape else torch.zeros((1, 1), dtype=torch.long)
    times = []
    with torch.no_grad():
        for _ in range(5):
            module(x)
        for _ in range(30):
            t0 = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def _objective(plan: StudyPlan, split: TrainSplit) -> Callable[[optuna.Trial], Any]:
    family = family_of(plan.spec)

    def objective(trial: optuna.Trial) -> Any:
        trial.set_user_attr("worker_pid", os.getpid())  # which process runs it (operators, tests)
        params = suggest(trial, plan.space)
        hp = hyperparameters(family, {**params, "epochs": plan.max_epochs})
        curve: list[float] = []
        finished = (
            [t.user_attrs.get("curve", []) for t in trial.study.get_trials(deepcopy=False, states=FINISHED)]
            if plan.multi
            else []
        )

        def on_epoch(m: EpochMetrics) -> bool:
            acc = m.val_score if not math.isnan(m.val_score) else 0.0
            curve.append(acc)
            trial.set_user_attr("epochs", m.epoch)
            trial.set_user_attr("curve", curve)
            if trial.study.user_attrs.get("budget_spent"):  # other workers finished the budget
                return False
            if plan.multi:
                return not should_stop(curve, finished, plan.prune_min_epochs, plan.prune_margin)
            trial.report(acc, m.epoch)
            if m.epoch >= plan.max_epochs:  # trained to the end: complete, whatever a rung would say
                return True  # (a trial pruned there saved nothing, and its result was thrown away)
            return not trial.should_prune()

        fitted = fit(
            plan.spec,
            split,
            hp,
            seed=plan.seed,
            device=plan.device,
            patience=0,
            time_budget_s=plan.time_budget_s,
            callback=on_epoch,
        )
        if fitted.result.stopped_by_callback:
            raise optuna.TrialPruned(f"stopped at epoch {len(curve)} with score {curve[-1]:.4f}")
        accuracy = max(curve) if curve else 0.0
        if not plan.multi:
            return accuracy
        if plan.objectives[1] == "params":
            return accuracy, float(sum(p.numel() for p in fitted.module.parameters()))
        return accuracy, _latency_ms(fitted.module, plan.spec.input_shape)

    return objective


def run_worker(plan: StudyPlan, split: TrainSplit, worker: int) -> None:
    """Run trials of ``plan.study`` until the study's budget is spent (any worker's trials count)."""
    storage = make_storage(plan)
    study = optuna.load_study(
        study_name=plan.study, storage=storage, sampler=_sampler(plan, worker), pruner=_pruner(plan)
    )
    budget = optuna.study.MaxTrialsCallback(plan.n_trials, states=FINISHED)
    if _finished(study) >= plan.n_trials:
        return
    # at most twice the budget per worker: trials that keep failing end the study, not loop
    study.optimize(
        _objective(plan, split), n_trials=2 * plan.n_trials, callbacks=[budget], catch=(RuntimeError, ValueError)
    )


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _worker_main(plan: StudyPlan, shared: SharedSplit, worker: int) -> None:
    import threading

    import torch

    torch.set_num_threads(1)  # workers share the cores
    if plan.nice > 0:  # below the trainer: a study never holds a serving model's training back
        os.nice(plan.nice)
    parent = multiprocessing.parent_process()
    if parent is not None:  # the tuner died (even kill -9): this worker goes too

        def watch() -> None:
            parent.join()
            os._exit(1)

        threading.Thread(target=watch, name="cdl-tuner-parent", daemon=True).start()
    run_worker(plan, shared.load(), worker)


def create(plan: StudyPlan) -> optuna.Study:
    """Create the study (once, before any worker), seeded with the warm-start parameters."""
    storage = make_storage(plan)
    directions = [StudyDirection.MAXIMIZE] + [StudyDirection.MINIMIZE] * (len(plan.objectives) - 1)
    study = optuna.create_study(
        study_name=plan.study, storage=storage, directions=directions, load_if_exists=True, sampler=_sampler(plan, 0)
    )
    if plan.warm_params and not study.trials:
        known = {k: v for k, v in plan.warm_params.items() if k in plan.space}
        if known:
            study.enqueue_trial(known, skip_if_exists=True)
    study.set_user_attr("objectives", list(plan.objectives))
    return study


def run_study(
    plan: StudyPlan,
    split: TrainSplit,
    workers: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
    started: Callable[[list[int]], None] | None = None,
) -> StudyResult:
    """Create the study, run ``workers`` worker processes on it until ``n_trials`` finished
    (starting a worker again where one died while the budget is not spent), and summarise.

    ``workers`` 0 runs the trials in this process (tests and benchmarks of the logic).
    ``on_progress(finished, n_trials)`` is called about once a second; ``started(pids)``
    whenever the set of worker processes changes.
    """
    t0 = time.monotonic()
    study = create(plan)
    if workers <= 0:
        run_worker(plan, split, 0)
    else:
        _coordinate(study, plan, split, workers, on_progress, started)
    _fail_stale(study, force=workers > 0)
    return summarise(study, plan, time.monotonic() - t0)


def _coordinate(
    study: optuna.Study,
    plan: StudyPlan,
    split: TrainSplit,
    workers: int,
    on_progress: Callable[[int, int], None] | None,
    started: Callable[[list[int]], None] | None,
) -> None:
    """Keep ``workers`` processes on the study until its budget is spent; stop them whatever
    happens (a storage error here ends no worker silently running on)."""
    ctx = multiprocessing.get_context("spawn")
    procs: list[Any] = []
    index = 0
    with _study_folder(plan.study) as folder:
        # the version once on disk, mapped by every worker: no copy of the data per worker process
        shared = split.save(folder)
        try:
            while True:
                procs = [p for p in procs if p.is_alive()]
                done = _finished(study)
                if done >= plan.n_trials:
                    break
                failed = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
                if failed > plan.n_trials:
                    log.error("study abandoned: its trials keep failing", study=plan.study, failed=failed)
                    break
                if len(procs) < workers:
                    for _ in range(workers - len(procs)):
                        index += 1
                        p = ctx.Process(target=_worker_main, args=(plan, shared, index), daemon=True)
                        p.start()
                        procs.append(p)
                    if started is not None:
                        started([int(p.pid) for p in procs])
                if on_progress is not None:
                    on_progress(done, plan.n_trials)
                _fail_stale(study)
                time.sleep(1.0)
            # the budget is spent: running trials stop at their next epoch (ending as pruned)
            study.set_user_attr("budget_spent", True)
            for p in procs:
                p.join(plan.grace_s)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)


#: a study's folder (its split, mapped by the workers) in the temporary directory
FOLDER_PREFIX = "cdl-study-"
_OWNER = ".owner"


@contextlib.contextmanager
def _study_folder(study: str) -> Iterator[Path]:
    """A temporary folder for one study, locked (``flock``) by this process while it runs, so a
    tuner that starts after one was killed (-9: no clean-up ran) knows it is left over."""
    folder = tempfile.TemporaryDirectory(prefix=f"{FOLDER_PREFIX}{study[:40]}-", ignore_cleanup_errors=True)
    with folder, open(Path(folder.name) / _OWNER, "w") as owner:
        fcntl.flock(owner, fcntl.LOCK_EX)
        yield Path(folder.name)


def sweep_study_folders(root: Path | None = None, min_age_s: float = 60.0) -> int:
    """Remove study folders no live process holds (left by a killed tuner); returns how many.
    A folder younger than ``min_age_s`` is left alone (its owner may not have locked it yet)."""
    removed = 0
    for folder in Path(root or tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*"):
        try:
            if time.time() - folder.stat().st_mtime < min_age_s:
                continue
            with open(folder / _OWNER) as owner:
                try:
                    fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a running study's
                shutil.rmtree(folder, ignore_errors=True)
        except FileNotFoundError:  # old, and never locked (or gone meanwhile)
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue
        removed += not folder.exists()
    if removed:
        log.info("left-over study folders removed", folders=removed)
    return removed


def _fail_stale(study: optuna.Study, force: bool = False) -> None:
    """Trials of dead workers (no heartbeat for the grace period) to FAIL; with ``force``
    (every worker has stopped) whatever is still RUNNING too."""
    optuna.storages.fail_stale_trials(study)
    if force:
        storage = study._storage  # optuna has no public call for this
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def summarise(study: optuna.Study, plan: StudyPlan, seconds: float = 0.0) -> StudyResult:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state is TrialState.COMPLETE]
    count = {s: sum(1 for t in trials if t.state is s) for s in TrialState}
    epochs = sum(int(t.user_attrs.get("epochs", 0)) for t in trials)
    if not complete:
        return StudyResult(plan.study, {}, math.nan, [], 0, count[TrialState.PRUNED], count[TrialState.FAIL], epochs)
    front: list[dict[str, Any]] = []
    if plan.multi:
        pareto = study.best_trials
        best = pick(pareto, plan.pick_tolerance)
        front = [{"number": t.number, "values": list(t.values), "params": t.params} for t in pareto]
        study.set_user_attr("pareto_front", front)
        study.set_user_attr("picked", best.number)
    else:
        best = study.best_trial
    return StudyResult(
        study=plan.study,
        best_params=dict(best.params),
        best_value=float(best.values[0]),
        objective_values=[float(v) for v in best.values],
        complete=count[TrialState.COMPLETE],
        pruned=count[TrialState.PRUNED],
        failed=count[TrialState.FAIL],
        trial_epochs=epochs,
        front=front,
        seconds=seconds,
    )
