"""Model families are plugins (cdl.ml.family): found through entry points, chosen by name, the
built-ins on the same interface as a user's, nothing loaded from a message."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from typing import Any

import pytest
import torch
from torch import nn

from cdl.datasets import DatasetSpec, Task
from cdl.errors import ConfigError, InvalidInputError
from cdl.ml import family as fam_mod
from cdl.ml.core import fit, hyperparameters, split_version
from cdl.ml.family import (
    COMPRESSIONS,
    ModelFamily,
    default_family,
    family_names,
    family_of,
    get_family,
    installed_families,
    provenance,
)
from cdl.ml.models import Family, ModelConfig, build_model


def test_the_built_in_families_are_installed_plugins_with_the_whole_interface() -> None:
    found = installed_families()
    assert {"mlp", "cnn", "text"} <= set(found) and set(family_names()) == set(found)
    for name, fam in found.items():
        assert isinstance(fam, ModelFamily) and fam.name == name
        assert fam.tasks and fam.defaults and fam.space and set(fam.compressions) <= COMPRESSIONS
        assert {"lr", "weight_decay", "batch_size", "epochs"} <= set(fam.defaults)
    assert [default_family(t) for t in (Task.TABULAR, Task.IMAGE, Task.TEXT)] == ["mlp", "cnn", "text"]
    assert get_family("text").text_input and "pruned" not in get_family("text").compressions


def test_an_unknown_family_is_a_one_line_config_error_naming_the_installed_ones() -> None:
    with pytest.raises(ConfigError) as err:
        get_family("os.system")
    assert "unknown model family 'os.system'" in str(err.value) and "mlp" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_dataset_names_its_family_or_gets_its_task_s_default() -> None:
    spec = DatasetSpec(name="d", task=Task.IMAGE, labels=("a", "b"), input_shape=(1, 4, 4))
    assert family_of(spec) == "cnn"
    named = DatasetSpec(name="d", task=Task.IMAGE, labels=("a", "b"), input_shape=(1, 4, 4), family="mlp")
    assert family_of(named) == "mlp" and DatasetSpec.from_json(named.to_json()).family == "mlp"
    with pytest.raises(InvalidInputError):
        DatasetSpec(name="d", task=Task.IMAGE, labels=("a", "b"), input_shape=(1, 4, 4), family="../x")


def test_the_core_trains_with_the_dataset_s_family_and_refuses_a_family_of_another_task() -> None:
    import numpy as np

    from cdl.datasets import DatasetVersion

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 1, 4, 4)).astype(np.float32)
    y = (x.reshape(40, -1).sum(1) > 0).astype(np.int64)
    spec = DatasetSpec(name="d", task=Task.IMAGE, labels=("a", "b"), input_shape=(1, 4, 4), family="mlp")
    ids = np.array([str(i) for i in range(40)])
    split_ids = (np.arange(40) % 5 == 0).astype(np.uint8)
    data = DatasetVersion(spec=spec, version=1, manifest={}, ids=ids, labels=y, split=split_ids, x=x, text=None)
    split = split_version(data, 0.2, 0)
    fitted = fit(spec, split, hyperparameters("mlp", {"epochs": 1}), device="cpu")
    assert fitted.config.family == "mlp" and isinstance(fitted.module, nn.Module)
    text = DatasetSpec(name="d", task=Task.IMAGE, labels=("a", "b"), input_shape=(1, 4, 4), family="text")
    with pytest.raises(InvalidInputError):
        fit(text, split, hyperparameters("text", {"epochs": 1}), device="cpu")


def test_lineage_provenance_names_the_package_version_and_source_hash() -> None:
    prov = provenance("cnn")
    assert prov["family"] == "cnn" and prov["package"] == "cdl" and prov["version"]
    assert len(prov["source_sha256"]) == 64 and prov["entry_point"] == "cdl.ml.models:CnnFamily"


class _Tiny(ModelFamily):
    name = "tiny"
    tasks = frozenset({Task.TABULAR})
    defaults = {"lr": 1e-2, "weight_decay": 0.0, "batch_size": 8, "epochs": 1}
    space = {"lr": ["log", 1e-3, 1e-1]}
    compressions = frozenset({"fp16"})

    def build(self, config: ModelConfig) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(config.input_shape).prod()), config.num_classes))


def test_a_user_family_from_an_entry_point_is_found_and_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A family declared by another installed package (an entry point) is found like the built-ins;
    a mismatched name or an object that is not a family is refused."""
    import sys
    import types

    module = types.ModuleType("cdl_test_plugin")
    module.Tiny = _Tiny  # type: ignore[attr-defined]
    module.NotAFamily = object()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cdl_test_plugin", module)
    real = fam_mod.entry_points

    def with_plugin(**kw: Any) -> list[EntryPoint]:
        eps = list(real(**kw))
        return [
            *eps,
            EntryPoint("tiny", "cdl_test_plugin:Tiny", fam_mod.ENTRY_POINT_GROUP),
            EntryPoint("gone", "cdl_removed_package:Family", fam_mod.ENTRY_POINT_GROUP),
        ]

    monkeypatch.setattr(fam_mod, "entry_points", with_plugin)
    fam_mod._installed.cache_clear()
    try:
        assert "tiny" in family_names() and get_family("tiny").compressions == {"fp16"}
        # a plugin whose package does not import leaves the others working, and names its error
        assert get_family("mlp").name == "mlp"
        with pytest.raises(ConfigError, match="failed to load: ModuleNotFoundError"):
            get_family("gone")
        module_out = build_model(ModelConfig("tiny", (3,), 2, {}))
        assert module_out(torch.zeros(1, 3)).shape == (1, 2)
        for ep in (
            EntryPoint("other", "cdl_test_plugin:Tiny", "g"),
            EntryPoint("x", "cdl_test_plugin:NotAFamily", "g"),
        ):
            with pytest.raises(ConfigError):
                fam_mod._load(ep)
    finally:
        fam_mod._installed.cache_clear()
    assert Family.MLP == "mlp"


def test_freezing_by_pattern_stops_those_gradients_and_a_pattern_matching_nothing_is_refused() -> None:
    from services.trainer.trainer import _freeze, _load_start

    config = ModelConfig("cnn", (1, 8, 8), 10, {"channels": 4})
    module = build_model(config)
    names = _freeze(module, ["features.0.*"])
    assert names == ["features.0.weight", "features.0.bias"]
    assert [n for n, p in module.named_parameters() if not p.requires_grad] == names
    with pytest.raises(InvalidInputError):
        _freeze(build_model(config), ["feature.0.*"])  # a typo would silently train them
    with pytest.raises(InvalidInputError):
        _load_start(module, build_model(ModelConfig("cnn", (1, 8, 8), 10, {"channels": 8})).state_dict())
