"""docs/configuration.md is generated from the settings classes (cdl_tools.config_docs): the
committed file is what the generator writes, and it names every field of every class by its
environment variable."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from cdl.settings import ServiceSettings
from cdl_tools import config_docs
from cdl_tools.config_docs import DOC_PATH, documented_classes, env_names, own_fields, render

REGENERATE = "docs/configuration.md is out of date: run `python -m cdl_tools.config_docs`"


def _sections(text: str) -> dict[str, str]:
    """The document's ``## `module.Class` ...`` sections by ``module.Class``."""
    sections: dict[str, str] = {}
    for chunk in text.split("\n## ")[1:]:
        heading = chunk.split("\n", 1)[0]
        if heading.startswith("`"):
            sections[heading.split("`")[1]] = chunk
    return sections


def test_committed_file_is_generated() -> None:
    committed = DOC_PATH.read_text(encoding="utf-8")
    generated = render()
    if committed != generated:
        diff = difflib.unified_diff(committed.splitlines(), generated.splitlines(), "committed", "generated", n=0)
        pytest.fail(REGENERATE + "\n" + "\n".join(list(diff)[:30]), pytrace=False)


def test_every_field_appears_with_its_variable() -> None:
    sections = _sections(DOC_PATH.read_text(encoding="utf-8"))
    classes = documented_classes()
    assert [f"{c.__module__}.{c.__qualname__}" for c in classes] == list(config_docs.SETTINGS_CLASSES)
    missing: list[str] = []
    for cls in classes:
        name = f"{cls.__module__}.{cls.__qualname__}"
        prefix = str(cls.model_config.get("env_prefix", ""))
        assert name in sections, f"no section for {name}: {REGENERATE}"
        assert sections[name].startswith(f"`{name}` (prefix `{prefix}`)\n")
        own = own_fields(cls)
        for field in cls.model_fields:
            # a service's table lists its own fields; the inherited ones are in ServiceSettings' table
            owner = cls if field in own else ServiceSettings
            section = sections[f"{owner.__module__}.{owner.__qualname__}"]
            for variable in env_names(owner, field):
                if f"\n| `{variable}` |" not in section:
                    missing.append(f"{name}.{field} ({variable})")
    assert not missing, f"fields not documented: {missing}; {REGENERATE}"


def test_service_tables_list_only_their_own_fields() -> None:
    for cls in documented_classes():
        if cls is ServiceSettings or not issubclass(cls, ServiceSettings):
            continue
        own = own_fields(cls)
        assert own, cls
        assert not [f for f in own if f in ServiceSettings.model_fields and f not in vars(cls)["__annotations__"]]
        assert set(cls.model_fields) == set(own) | set(ServiceSettings.model_fields)


def test_no_machine_paths_leak() -> None:
    text = render()
    assert str(Path.home()) + "/" not in text
    assert "`$CDL_HOME`, else `$XDG_CACHE_HOME/cdl`, else `~/.cache/cdl`" in text


def test_check_flags_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "configuration.md"
    assert config_docs.main(["--path", str(doc)]) == 0
    assert config_docs.main(["--check", "--path", str(doc)]) == 0
    doc.write_text(doc.read_text(encoding="utf-8").replace("CDL_STACK_HOST", "CDL_STACK_HOSTNAME"), encoding="utf-8")
    capsys.readouterr()
    assert config_docs.main(["--check", "--path", str(doc)]) == 1
    err = capsys.readouterr().err
    assert "python -m cdl_tools.config_docs" in err
    assert "CDL_STACK_HOSTNAME" in err
