"""C helpers (cdl/native.py): a failed build is loud where required and a fallback elsewhere;
environments sharing one CDL_HOME each get their own build and leave the others' alone."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import confluent_kafka
import pytest

from cdl import native

GOOD = "int cdl_answer(void) { return 42; }\n"
#: compiles, but warns (an unused variable), and -Werror makes every warning an error
WARNS = "int cdl_answer(void) { int unused = 1; return 42; }\n"


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("CDL_HOME", str(home))
    monkeypatch.delenv("CDL_NATIVE_REQUIRED", raising=False)
    monkeypatch.delenv("CI", raising=False)
    return home


def _source(tmp_path: Path, text: str, name: str = "answer.c") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _builds(home: Path, stem: str = "answer") -> list[Path]:
    return sorted((home / "native").glob(f"{stem}-*.so"))


def _shared_lib(tmp_path: Path, name: str, body: str) -> Path:
    """A small shared library to link against (a stand-in for librdkafka)."""
    src = _source(tmp_path, body, f"{name}.c")
    out = tmp_path / f"lib{name}.so"
    native.build(src, out, link=())
    return out


def test_a_helper_builds_once_and_loads(tmp_path: Path, _home: Path) -> None:
    src = _source(tmp_path, GOOD)
    lib = native.load(src)
    assert lib is not None and lib.cdl_answer() == 42
    (built,) = _builds(_home)
    mtime = built.stat().st_mtime_ns
    again = native.load(src)
    assert again is not None and _builds(_home) == [built]
    assert built.stat().st_mtime_ns >= mtime  # reused, marked as used


def test_a_failed_build_falls_back_with_the_compilers_output(
    tmp_path: Path, _home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = _source(tmp_path, WARNS)
    with caplog.at_level(logging.WARNING, logger="cdl.native"):
        assert native.load(src) is None
    (warning,) = [r for r in caplog.records if "native helper unavailable" in r.getMessage()]
    assert "unused" in str(warning.__dict__), "the warning should carry the compiler's output"
    assert _builds(_home) == []
    assert not [p for p in (_home / "native").iterdir()], "no temp file left behind"


@pytest.mark.parametrize("switch", [{"CDL_NATIVE_REQUIRED": "1"}, {"CI": "true"}], ids=["required", "ci"])
def test_a_failed_build_raises_where_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, switch: dict[str, str]
) -> None:
    for key, value in switch.items():
        monkeypatch.setenv(key, value)
    assert native.required()
    with pytest.raises(native.NativeBuildError) as info:
        native.load(_source(tmp_path, WARNS))
    assert "answer.c failed" in str(info.value)
    assert "unused variable" in info.value.message  # the compiler's own words, for set-up's output


def test_the_switch_can_turn_the_requirement_off_under_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("CDL_NATIVE_REQUIRED", "0")
    assert not native.required()
    assert native.load(_source(tmp_path, WARNS)) is None


def test_no_compiler_falls_back_or_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    src = _source(tmp_path, GOOD)
    assert native.load(src) is None
    monkeypatch.setenv("CDL_NATIVE_REQUIRED", "1")
    with pytest.raises(native.NativeBuildError, match="no-such-cc"):
        native.load(src)


def test_different_link_inputs_get_their_own_builds_and_keep_them(tmp_path: Path, _home: Path) -> None:
    # two environments sharing CDL_HOME, each with its own copy of a library linked in
    env_a, env_b = tmp_path / "a", tmp_path / "b"
    env_a.mkdir()
    env_b.mkdir()
    dep_a = _shared_lib(env_a, "dep", "int cdl_dep(void) { return 1; }\n")
    dep_b = _shared_lib(env_b, "dep", "int cdl_dep(void) { return 2; }\n")
    src = _source(tmp_path, "int cdl_dep(void);\nint cdl_answer(void) { return 40 + cdl_dep(); }\n")

    lib_a = native.load(src, (str(dep_a), f"-Wl,-rpath,{env_a}"))
    lib_b = native.load(src, (str(dep_b), f"-Wl,-rpath,{env_b}"))
    assert lib_a is not None and lib_b is not None
    builds = _builds(_home)
    assert len(builds) == 2, "each link input has its own build"
    assert native.load(src, (str(dep_a), f"-Wl,-rpath,{env_a}")) is not None
    assert _builds(_home) == builds, "neither rebuilt nor deleted the other's"

    # the same path, a new library there (an upgrade): a new build; the old one stays for whoever uses it
    time.sleep(0.01)
    _shared_lib(env_a, "dep", "int cdl_dep(void) { return 3; } int cdl_more(void) { return 0; }\n")
    assert native.load(src, (str(dep_a), f"-Wl,-rpath,{env_a}")) is not None
    assert len(_builds(_home)) == 3 and set(builds) <= set(_builds(_home))


def test_the_key_and_the_compiler_are_part_of_the_build(
    tmp_path: Path, _home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _source(tmp_path, GOOD)
    assert native.load(src, key="python=3.11 confluent-kafka=2.16.1") is not None
    assert native.load(src, key="python=3.11 confluent-kafka=2.15.0") is not None
    assert len(_builds(_home)) == 2
    fingerprint = native._fingerprint(src, native.CFLAGS, ("-lm",), "")
    monkeypatch.setattr(native, "_compiler_version", lambda argv: "another compiler 99.0")
    assert native._fingerprint(src, native.CFLAGS, ("-lm",), "") != fingerprint


def test_only_stale_temp_files_and_long_unused_builds_are_pruned(tmp_path: Path, _home: Path) -> None:
    folder = _home / "native"
    folder.mkdir(parents=True)
    old = time.time() - native.PRUNE_AFTER_S - 86400
    other_env = folder / "answer-00000000000000aa.so"  # another environment's build, in use
    unused = folder / "answer-00000000000000bb.so"  # nobody loaded it for over 30 days
    dead_tmp = folder / ".answer-x1.so.tmp"  # a build that died an hour ago
    live_tmp = folder / ".answer-x2.so.tmp"  # a build running now
    for path in (other_env, unused, dead_tmp, live_tmp):
        path.write_bytes(b"")
    os.utime(unused, (old, old))
    os.utime(dead_tmp, (time.time() - 7200,) * 2)
    assert native.load(_source(tmp_path, GOOD)) is not None
    left = {p.name for p in folder.iterdir()}
    assert other_env.name in left and live_tmp.name in left
    assert unused.name not in left and dead_tmp.name not in left


@pytest.fixture
def kafka_native() -> Iterator[ModuleType]:
    from cdl import kafka_native as module

    module._load.cache_clear()
    try:
        yield module
    finally:
        module._load.cache_clear()


def test_the_bundled_librdkafka_is_a_version_the_columnar_consumer_was_written_for(kafka_native: ModuleType) -> None:
    version = confluent_kafka.libversion()[1]
    assert kafka_native._supported(version), f"bundled librdkafka {confluent_kafka.libversion()[0]}: check rdbatch.c"
    assert kafka_native.available()


def test_another_librdkafka_falls_back_to_confluent_kafkas_consumer(
    kafka_native: ModuleType, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(kafka_native, "LIBRDKAFKA_VERSIONS", ((2, 99), (2, 100)))
    with caplog.at_level(logging.WARNING, logger="cdl.kafka_native"):
        assert not kafka_native.available()
    assert "is not a version rdbatch.c was written for (2.99-2.100)" in caplog.text
    assert not (Path(os.environ["CDL_HOME"]) / "native").exists(), "nothing is built against it"
    kafka_native._load.cache_clear()
    monkeypatch.setenv("CDL_NATIVE_REQUIRED", "1")
    with pytest.raises(native.NativeBuildError, match=r"not a version rdbatch\.c was written for"):
        kafka_native.available()
