"""The study runner in-process on SQLite (no servers): cdl's multi-objective pruning rule,
the Pareto pick, and the same model through the shared core as the trainer would train."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest

from cdl.ml.core import fit, hyperparameters, split_version
from cdl.ml.models import Family
from cdl.ml.space import space_for
from services.tuner.study import StudyPlan, pick, public_url, run_study, should_stop
from tests.unit.test_ml_core import SPEC, _version


def test_the_multi_objective_rule_stops_below_the_median_at_that_epoch() -> None:
    finished = [[0.5, 0.7, 0.8], [0.6, 0.8, 0.9], [0.4, 0.75]]
    assert not should_stop([0.1], finished, min_epochs=2, margin=0.02)  # before min_epochs
    assert should_stop([0.5, 0.7], finished, min_epochs=2, margin=0.02)  # median 0.75 - 0.02 > 0.7
    assert not should_stop([0.5, 0.74], finished, min_epochs=2, margin=0.02)
    assert not should_stop([0.5, 0.7, 0.1], finished, min_epochs=2, margin=0.02)  # 2 got to epoch 3: < 3


def test_pick_takes_the_smallest_second_objective_within_the_tolerance() -> None:
    front: Any = [SimpleNamespace(values=v, number=i) for i, v in enumerate([(0.99, 9e4), (0.985, 2e4), (0.9, 1e3)])]
    assert pick(front, 0.01).number == 1
    assert pick(front, 0.0).number == 0
    assert pick(front, 0.1).number == 2


def test_public_url_hides_the_password() -> None:
    assert public_url("postgresql+psycopg2://u:secret@h:5/db") == "postgresql+psycopg2://u@h:5/db"
    assert public_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_a_multi_objective_study_yields_a_front_and_prunes_by_cdls_rule(tmp_path: Path) -> None:
    split = split_version(_version(800), 0.15, 0)
    plan = StudyPlan(
        study="mo",
        storage=f"sqlite:///{tmp_path / 'o.db'}",
        spec=SPEC,
        space=space_for(Family.CNN, {"channels": ["choice", [2, 4, 8, 16]]}),
        n_trials=10,
        max_epochs=5,
        objectives=("accuracy", "params"),
        prune_margin=0.0,
    )
    result = run_study(plan, split, workers=0)
    assert result.complete + result.pruned >= 10 and result.pruned >= 1, result
    assert result.front and len(result.objective_values) == 2
    values = [tuple(p["values"]) for p in result.front]
    assert tuple(result.objective_values) in values
    best_acc = max(v[0] for v in values)
    assert result.objective_values[0] >= best_acc - plan.pick_tolerance
    study = optuna.load_study(study_name="mo", storage=plan.storage)
    assert study.user_attrs["pareto_front"] == result.front
    pruned = [t for t in study.trials if t.state is optuna.trial.TrialState.PRUNED]
    assert all(len(t.user_attrs["curve"]) >= plan.prune_min_epochs for t in pruned)
    assert result.trial_epochs == sum(int(t.user_attrs.get("epochs", 0)) for t in study.trials)
    assert result.trial_epochs < 10 * plan.max_epochs  # pruning saved epochs


def test_a_trial_trains_the_same_model_the_shared_core_trains_for_the_trainer(tmp_path: Path) -> None:
    split = split_version(_version(600), 0.15, 0)
    params = {"lr": 3e-3, "weight_decay": 1e-4, "batch_size": 64, "dropout": 0.1, "channels": 8}
    plan = StudyPlan(
        study="same",
        storage=f"sqlite:///{tmp_path / 's.db'}",
        spec=SPEC,
        space=space_for(Family.CNN),
        n_trials=1,
        max_epochs=3,
        pruner="none",
        warm_params=params,  # the enqueued first trial: exactly these parameters
        seed=5,
    )
    run_study(plan, split, workers=0)
    trial = optuna.load_study(study_name="same", storage=plan.storage).trials[0]
    assert trial.params == params
    direct = fit(SPEC, split, hyperparameters(Family.CNN, {**params, "epochs": 3}), seed=5, patience=0)
    assert trial.user_attrs["curve"] == [m.val_score for m in direct.result.history]


def test_tpe_models_good_on_a_quarter_of_the_finished_trials_without_warnings() -> None:
    import warnings

    from cdl.errors import ConfigError
    from services.tuner.study import _good_trials, _sampler

    # a quarter: 5 of 20 trials (Optuna's default would model "good" on 2), at least one, at most 25
    assert [_good_trials(0.25, n) for n in (1, 4, 20, 21, 1000)] == [1, 1, 5, 6, 25]
    plan = StudyPlan(study="s", storage="sqlite://", spec=SPEC, space=space_for(Family.CNN))
    assert plan.tpe_gamma == 0.25
    with warnings.catch_warnings(record=True) as caught:  # the tuner's own filters stay in place
        sampler = _sampler(plan, 0)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    # Optuna's deprecation of gamma is not the tuner's log noise
    assert not [w for w in caught if "gamma" in str(w.message)], [str(w.message) for w in caught]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError):
            StudyPlan(study="s", storage="sqlite://", spec=SPEC, space=space_for(Family.CNN), tpe_gamma=bad)


def test_a_trial_trains_no_longer_than_its_time_budget_and_scores_what_it_reached(tmp_path: Path) -> None:
    split = split_version(_version(400), 0.15, 0)
    plan = StudyPlan(
        study="budget",
        storage=f"sqlite:///{tmp_path / 'b.db'}",
        spec=SPEC,
        space=space_for(Family.CNN),
        n_trials=3,
        max_epochs=5,
        pruner="none",
        time_budget_s=1e-6,  # no second epoch fits in it
    )
    result = run_study(plan, split, workers=0)
    assert result.complete == 3 and result.failed == 0, result
    trials = optuna.load_study(study_name="budget", storage=plan.storage).trials
    assert [t.user_attrs["epochs"] for t in trials] == [1, 1, 1]
    assert all(t.value == t.user_attrs["curve"][0] for t in trials)
    assert all(isinstance(t.user_attrs["worker_pid"], int) for t in trials)


def test_study_folders_of_dead_tuners_are_swept_and_a_running_ones_kept(tmp_path: Path) -> None:
    import os
    import tempfile

    from services.tuner import study as study_mod

    tempfile.tempdir, before = str(tmp_path), tempfile.tempdir
    try:
        left = tmp_path / f"{study_mod.FOLDER_PREFIX}m-1-dead"  # a killed tuner's: unlocked
        left.mkdir()
        (left / ".owner").write_text("")
        (left / "x.npy").write_bytes(b"0" * 100)
        os.utime(left, (0, 0))
        young = tmp_path / f"{study_mod.FOLDER_PREFIX}m-2-new"  # being created: not locked yet
        young.mkdir()
        (young / ".owner").write_text("")
        old = tmp_path / f"{study_mod.FOLDER_PREFIX}m-3-old"  # old, never locked
        old.mkdir()
        os.utime(old, (0, 0))
        with study_mod._study_folder("m-4") as running:
            os.utime(running, (0, 0))  # old, but its owner holds the lock
            assert study_mod.sweep_study_folders() == 2
            assert running.exists() and young.exists() and not left.exists() and not old.exists()
        assert not running.exists()
    finally:
        tempfile.tempdir = before
