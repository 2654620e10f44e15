"""Regression targets in the training core: the task's spec rules, the objective (R² from sums
equals R² at once), a fit on scikit-learn's diabetes set, the served graph in the target's units,
and the monitor's health window scoring answers on feedback."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score

from cdl.datasets import DatasetSpec, Task
from cdl.errors import InvalidInputError
from cdl.ml import objective
from cdl.ml.core import TrainSplit, assess, fit, hyperparameters
from cdl.ml.family import family_of
from services.compressor.variants import Served, export_onnx, run
from services.ingest.records import Reason, RecordError, clean, parse
from services.monitor.health import HealthWindow

SPEC = DatasetSpec(name="diabetes", task=Task.REGRESSION, labels=("progression",), input_shape=(10,))


def test_a_regression_spec_names_one_target_and_its_labels_are_numbers() -> None:
    with pytest.raises(InvalidInputError, match="one label: the name of its target"):
        DatasetSpec(name="d", task=Task.REGRESSION, labels=("a", "b"), input_shape=(3,))
    assert SPEC.label_value("151") == 151.0 and SPEC.label_value("-2.5e1") == -25.0
    for bad in ("x", "nan", "inf", "1e39"):
        with pytest.raises(ValueError):
            SPEC.label_value(bad)
    assert SPEC.is_unlabelled(SPEC.unlabelled) and not SPEC.is_unlabelled(-3.0)
    assert SPEC.label_dtype is np.float32 and family_of(SPEC) == "mlp"


def test_ingest_keeps_a_numeric_label_and_dead_letters_one_that_is_not_a_number() -> None:
    rec = clean(
        parse(b'{"dataset": "diabetes", "id": "r1", "features": [0,1,2,3,4,5,6,7,8,9], "label": 151.5}', ""), SPEC
    )
    assert rec.label == 151.5
    with pytest.raises(RecordError) as err:
        clean(
            parse(b'{"dataset": "diabetes", "id": "r2", "features": [0,1,2,3,4,5,6,7,8,9], "label": "n/a"}', ""), SPEC
        )
    assert err.value.reason is Reason.BAD_LABEL and "not a number" in str(err.value)
    unlabelled = clean(
        parse(b'{"dataset": "diabetes", "id": "r3", "features": [0,1,2,3,4,5,6,7,8,9]}', ""),
        SPEC,
        allow_unlabelled=True,
    )
    assert math.isnan(unlabelled.label)


def test_r2_from_running_sums_is_r2() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(50, 10, size=200)
    pred = y + rng.normal(0, 5, size=200)
    want = r2_score(y, pred)
    assert objective.score(pred[:, None], y, True) == pytest.approx(want)
    sums = objective.score_sums(
        torch.tensor(pred[:, None], dtype=torch.float32), torch.tensor(y, dtype=torch.float32), True
    )
    assert objective.sums_score(sums, len(y), True) == pytest.approx(want, abs=1e-4)
    d = objective.details(pred[:, None], y, True)
    assert d["rmse"] == pytest.approx(float(np.sqrt(((pred - y) ** 2).mean())))
    assert set(d) == {"r2", "rmse", "mae"} and objective.chance(True, 1) == 0.0


def _split() -> tuple[TrainSplit, np.ndarray, np.ndarray]:
    data = load_diabetes()
    x, y = data.data.astype(np.float32), data.target.astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    tr, va, ho = order[:300], order[300:350], order[350:]
    return TrainSplit(x[tr], y[tr], x[va], y[va], x[ho], y[ho]), x[tr], y[tr]


def test_an_mlp_learns_diabetes_about_as_well_as_a_linear_model_and_serves_in_the_targets_units() -> None:
    split, x_tr, y_tr = _split()
    fitted = fit(SPEC, split, hyperparameters("mlp", {"epochs": 60}), seed=0, device="cpu", patience=10)
    pre = fitted.preprocessor
    assert pre.scales_target and pre.target_mean == pytest.approx(float(y_tr.mean()), rel=1e-4)
    held = assess(fitted.module, pre, split.x_hold, split.y_hold, True)
    linear = r2_score(split.y_hold, LinearRegression().fit(x_tr, y_tr).predict(split.x_hold))
    assert held.score > linear - 0.15 and held.score > 0.3, (held.score, linear)
    assert held.metrics["rmse"] > 1.0  # in the target's units (its spread is ~77), not standardised
    # the served graph: raw features in, the answer in the target's units out
    served = Served(fitted.module, fitted.config, pre).eval()
    onnx = export_onnx(served, split.x_hold)
    out = run(onnx, split.x_hold)
    assert out.shape == (len(split.x_hold), 1)
    assert objective.score(out, split.y_hold, True) == pytest.approx(held.score, abs=1e-4)
    assert 20 < float(out.mean()) < 300


def test_a_health_window_scores_a_regression_on_feedback_and_round_trips() -> None:
    w = HealthWindow("m", 1, 0.0)
    truth = [100.0, 150.0, 200.0, 250.0]
    answers = [110.0, 140.0, 210.0, 240.0]
    for p, t in zip(answers, truth, strict=True):
        w.labelled_value(p, t)
    back = HealthWindow.from_json(w.to_json())
    assert back.score == pytest.approx(r2_score(truth, answers)) and back.feedback == 4
    msg = back.event(1.0)
    assert msg.metric == "r2" and msg.rmse == pytest.approx(10.0) and msg.mae == pytest.approx(10.0)
    assert msg.score == pytest.approx(r2_score(truth, answers))
