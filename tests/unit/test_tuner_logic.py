"""The tuner's pure parts: search spaces and triggers."""

from __future__ import annotations

from typing import Any

import optuna
import pytest

from cdl.errors import ConfigError
from cdl.ml.family import installed_families
from cdl.ml.models import Family
from cdl.ml.space import space_for, suggest
from services.tuner.triggers import TriggerPolicy, TuneState


def test_every_family_has_a_space_and_suggest_draws_inside_it() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for family in installed_families().values():
        space = family.space
        for _ in range(20):
            params = suggest(study.ask(), space)
            assert set(params) == set(space)
            for name, spec in space.items():
                if spec[0] == "choice":
                    assert params[name] in spec[1]
                else:
                    assert spec[1] <= params[name] <= spec[2]


def test_overrides_replace_or_drop_a_range_and_bad_ranges_are_refused() -> None:
    space = space_for(Family.CNN, {"channels": ["choice", [4, 8]], "dropout": []})
    assert space["channels"] == ["choice", [4, 8]] and "dropout" not in space
    for bad in (["log", 0.0, 1.0], ["int", 3, 1], ["choice", []], ["uniform", 0, 1]):
        with pytest.raises(ConfigError):
            space_for(Family.CNN, {"lr": bad})


def test_triggers_fire_when_they_should_and_not_otherwise() -> None:
    policy = TriggerPolicy(every_versions=3, accuracy_drop=0.05)
    s = TuneState()
    assert policy.on_data_updated(s, 1) is None  # the first model trains first, alone
    assert policy.on_trained(s, 0.9) == "first model version trained" and s.accuracy_mark is None
    early = TriggerPolicy(first_after_model=False)
    assert early.on_data_updated(s, 1) == "first dataset version" and early.on_trained(s, 0.9) is None
    policy.studied(s, "m-1", 1, ended_at=100.0)
    assert policy.on_data_updated(s, 2) is None and policy.on_data_updated(s, 3) is None
    assert policy.on_data_updated(s, 4) is not None  # 3 versions since
    assert policy.on_trained(s, 0.95) is None and s.accuracy_mark == 0.95  # the mark after a study
    assert policy.on_trained(s, 0.91) is None  # within the drop
    reason = policy.on_trained(s, 0.89)
    assert reason is not None and "dropped" in reason
    assert policy.on_drift(s, raised_at=99.0) is None  # answered by the study that ended at 100
    assert policy.on_drift(s, raised_at=101.0) == "drift detected"
    assert policy.on_request(s, 50.0) is None and policy.on_request(s, 150.0) == "requested"
    assert TriggerPolicy(every_versions=0).on_data_updated(s, 1000) is None


def test_state_round_trips_through_json() -> None:
    s = TuneState(studies=2, last_dataset_version=7, last_ended_at=3.5, accuracy_mark=0.9, last_study="m-2")
    doc: dict[str, Any] = s.to_json()
    assert TuneState.from_json(doc) == s and TuneState.from_json(None) == TuneState()
