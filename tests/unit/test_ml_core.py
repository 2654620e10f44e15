"""The shared training core (cdl.ml.core): split, seeding, defaults, the callback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from cdl.datasets import DatasetSpec, DatasetVersion, Task
from cdl.ml.core import TrainSplit, fit, hyperparameters, split_version
from cdl.ml.family import get_family
from cdl.ml.models import Family

DIGITS = load_digits()
SPEC = DatasetSpec(name="digits-core", task=Task.IMAGE, labels=tuple(str(i) for i in range(10)), input_shape=(1, 8, 8))


def _version(n: int = 600) -> DatasetVersion:
    x = DIGITS.data[:n].reshape(-1, 1, 8, 8).astype(np.float32)
    split = (np.arange(n) % 5 == 0).astype(np.uint8)  # every fifth record in the holdout
    return DatasetVersion(
        spec=SPEC,
        version=1,
        manifest={"shards": [], "offset_ranges": []},
        ids=np.array([f"r{i}" for i in range(n)]),
        labels=DIGITS.target[:n].astype(np.int64),
        split=split,
        x=x,
        text=None,
    )


def test_the_split_carves_validation_from_the_train_split_and_keeps_the_holdout_apart() -> None:
    data = _version()
    s = split_version(data, 0.1, seed=3)
    assert len(s.x_hold) == 120 and len(s.x_train) + len(s.x_val) == 480 and len(s.x_val) == 48
    hold = {x.tobytes() for x in data.x[data.split == 1]}  # type: ignore[index]
    assert not any(x.tobytes() in hold for x in np.concatenate([s.x_train, s.x_val]))
    again = split_version(data, 0.1, seed=3)
    assert np.array_equal(s.x_val, again.x_val)
    assert not np.array_equal(s.x_val, split_version(data, 0.1, seed=4).x_val)


def test_same_data_parameters_and_seed_give_the_same_model() -> None:
    data = _version()
    hp = hyperparameters(Family.CNN, {"epochs": 2, "channels": 8})
    assert hp["lr"] == get_family(Family.CNN).defaults["lr"] and hp["channels"] == 8
    s = split_version(data, 0.1, seed=0)
    a = fit(SPEC, s, hp, seed=7, device="cpu")
    b = fit(SPEC, s, hp, seed=7, device="cpu")
    c = fit(SPEC, s, hp, seed=8, device="cpu")
    for k, v in a.module.state_dict().items():
        assert torch.equal(v, b.module.state_dict()[k]), k
    assert any(not torch.equal(v, c.module.state_dict()[k]) for k, v in a.module.state_dict().items())
    assert [m.val_loss for m in a.result.history] == [m.val_loss for m in b.result.history]


def test_the_epoch_callback_stops_a_training_and_max_epochs_caps_it() -> None:
    data = _version()
    s = split_version(data, 0.1, seed=0)
    seen: list[int] = []

    def stop_after_two(m: object) -> bool:
        seen.append(int(m.epoch))  # type: ignore[attr-defined]
        return len(seen) < 2

    stopped = fit(SPEC, s, hyperparameters(Family.CNN, {"epochs": 10, "channels": 4}), callback=stop_after_two)
    assert seen == [1, 2] and stopped.result.stopped_by_callback
    capped = fit(SPEC, s, hyperparameters(Family.CNN, {"epochs": 10, "channels": 4}), max_epochs=1, patience=0)
    assert len(capped.result.history) == 1


def test_a_saved_split_is_memory_mapped_and_trains_as_the_original(tmp_path: Path) -> None:
    """A study's workers map one copy of the version (cdl.ml.core.TrainSplit.save)."""
    data = load_digits()
    x = data.data.reshape(-1, 1, 8, 8).astype(np.uint8)
    y = data.target.astype(np.int64)
    split = TrainSplit(x[:900], y[:900], x[900:1100], y[900:1100], x[1100:], y[1100:])
    shared = split.save(tmp_path / "split")
    loaded = shared.load()
    assert isinstance(loaded.x_train, np.memmap) and not loaded.x_train.flags.writeable
    assert loaded.x_train.dtype == np.uint8 and np.array_equal(loaded.x_train, split.x_train)
    spec = DatasetSpec("d", Task.IMAGE, tuple(str(i) for i in range(10)), (1, 8, 8), dtype="uint8")
    hp = hyperparameters("cnn", {"epochs": 1, "channels": 8})
    a = fit(spec, split, hp, seed=0, device="cpu")
    b = fit(spec, loaded, hp, seed=0, device="cpu")
    assert a.result.history[0].val_loss == b.result.history[0].val_loss


def test_a_time_budget_stops_before_an_epoch_that_would_end_past_it() -> None:
    data = load_digits()
    x = data.data.reshape(-1, 1, 8, 8).astype(np.float32)
    y = data.target.astype(np.int64)
    split = TrainSplit(x[:1200], y[:1200], x[1200:1400], y[1200:1400], x[1400:], y[1400:])
    spec = DatasetSpec("d", Task.IMAGE, tuple(str(i) for i in range(10)), (1, 8, 8))
    hp = hyperparameters("cnn", {"epochs": 50, "channels": 8})
    timed = fit(spec, split, hp, seed=0, device="cpu", patience=0, time_budget_s=1e-6)
    assert len(timed.result.history) == 1 and timed.result.stopped_by_budget  # at least one epoch
    free = fit(spec, split, {**hp, "epochs": 3}, seed=0, device="cpu", patience=0)
    assert len(free.result.history) == 3 and not free.result.stopped_by_budget


def test_the_cnn_pools_early_on_large_images_only_and_old_configs_build_as_they_were() -> None:
    from cdl.ml.models import ModelConfig, build_model

    big = ModelConfig("cnn", (1, 28, 28), 10, hyperparameters("cnn"))
    late = ModelConfig("cnn", (1, 28, 28), 10, {k: v for k, v in hyperparameters("cnn").items() if k != "early_pool"})
    small = ModelConfig("cnn", (1, 8, 8), 10, hyperparameters("cnn"))
    sizes = {n: sum(p.numel() for p in build_model(c).parameters()) for n, c in (("big", big), ("late", late))}
    assert sizes["big"] < sizes["late"] / 2  # a quarter of the positions into the head
    assert build_model(big).state_dict().keys() == build_model(late).state_dict().keys()
    assert big.architecture() != late.architecture()  # no warm start across the two layouts
    digits = build_model(small)
    assert digits(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert sum(p.numel() for p in digits.parameters()) == sum(
        p.numel() for p in build_model(ModelConfig("cnn", (1, 8, 8), 10, {"channels": 32})).parameters()
    )
