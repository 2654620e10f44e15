"""Fuzzing the C scanner (services/ingest/fastscan.c) against the careful path, also under
AddressSanitizer and UBSan.

Generated batches of JSON records -- plain ones, and truncated, huge, deeply nested, non-UTF-8,
with NUL bytes, numbers at every edge, ids of every length, unknown fields, duplicate keys --
are scanned by the fast path and checked against the careful path (``records.parse`` +
``clean``): a record the scan accepts must be accepted by the careful path with the same id,
label, holdout flag and features (bit for bit, in the dataset's dtype); the scan may leave
anything undecided. The generation is deterministic: hypothesis derandomized with no example
database, and a seeded mutation corpus.

The check runs twice: in this process against the normal build, and in a subprocess (this file
run as a script) that loads the scanner built with ``-fsanitize=address,undefined`` through
``CDL_FASTSCAN_LIB``, with gcc's libasan preloaded and every Python allocation going through
malloc (``PYTHONMALLOC=malloc``), so that ASan also knows the bounds of the batch buffer and of
every array the scanner reads or writes. A canary run (an index past the end of the bounds)
shows that the sanitizer really is watching. Without the sanitizer runtime the test fails under
CI and is skipped elsewhere. ``CDL_FUZZ_EXAMPLES=<n>`` runs more examples (docs/native.md).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdl import native
from cdl.datasets import DatasetSpec, Task
from services.ingest import fastscan
from services.ingest.records import RecordError, clean, parse
from tests.helpers import IN_CI

ROOT = Path(__file__).resolve().parents[2]
#: hypothesis examples per run (each a batch of up to 12 records), in this process and under the sanitizers
EXAMPLES = int(os.environ.get("CDL_FUZZ_EXAMPLES", "400"))
#: records of the seeded mutation corpus (scanned as one batch)
CORPUS = 4000
SANITIZE = (
    "-O1",
    "-g",
    "-std=c99",
    "-Wall",
    "-Werror",
    "-shared",
    "-fPIC",
    "-fsanitize=address,undefined",
    "-fno-omit-frame-pointer",
    "-fno-sanitize-recover=all",
)

NAME = "fz"
LABELS = ("a", "b", "7", "0")
SPECS = [
    DatasetSpec(name=NAME, task=Task.TABULAR, labels=LABELS, input_shape=(3,), dtype="float64", holdout_fraction=0.3),
    DatasetSpec(name=NAME, task=Task.TABULAR, labels=LABELS, input_shape=(2, 2), dtype="float32"),
    DatasetSpec(name=NAME, task=Task.TABULAR, labels=LABELS, input_shape=(4,), dtype="uint8"),
    DatasetSpec(name=NAME, task=Task.TABULAR, labels=LABELS, input_shape=(2,), dtype="int64"),
    DatasetSpec(name=NAME, task=Task.TABULAR, labels=LABELS, input_shape=(24,), dtype="float64"),
]
#: id limits the scan is given (never over the careful path's default of 256)
ID_LIMITS = (256, 256, 256, 0, 1, 8, 64, 255)

#: numbers at the edges: of JSON's grammar, of double precision, of each dtype, of the fast paths
EDGE_NUMBERS = [
    "0", "-0", "0.0", "-0.0", "0e0", "-0e-0", "0E+0", "00", "01", "-01", "+1", "-", ".5", "1.", "1.e1", "1e",
    "1e+", "1e-", "--1", "0x10", "NaN", "-Infinity", "Infinity", "1_000", "1e400", "-1e400", "1e-400",
    "4.9e-324", "5e-324", "2.4703282292062327e-324", "2.2250738585072014e-308", "2.2250738585072011e-308",
    "1.7976931348623157e308", "1.7976931348623158e308", "1.7976931348623159e308", "9007199254740992",
    "9007199254740993", "9007199254740993.0", "18446744073709551615", "18446744073709551616",
    "9223372036854775807", "9223372036854775808", "-9223372036854775808", "-9223372036854775809",
    "255", "256", "255.0", "255.5", "254.99999999999999", "-1", "-0.5", "3.4028235e38", "3.4028236e38",
    "3.4028235677973366e38", "1e-46", "1.4e-45", "123456789012345", "1234567890123456",
    "0.123456789012345", "0.1234567890123456", "99999999999999.9", "999999999999999.9",
    "1" + "0" * 22, "1" + "0" * 23, "1" + "0" * 62, "1" + "0" * 63, "0." + "0" * 30 + "1",
    "1." + "0" * 40, "1" + "0" * 19 + ".5", "0.1e-320", "1e22", "1e23", "9e22", "5e-22", "1e-23",
    "123456789e-30", "1e00000000000000001", "1e-99999999999", "0e99999999999",
]  # fmt: skip


@dataclass
class Case:
    values: list[bytes]
    which: list[int]
    spec: DatasetSpec
    max_id_bytes: int


# ------------------------------------------------------------------ generated records
#
# Hypothesis draws the shape of each case and the tokens at the edges (a number, an id, an
# unknown field's value); the bulk of each record (its other features, the whitespace) comes
# from a random.Random seeded by a number hypothesis draws, which keeps thousands of records fast.

_WS = [b"", b"", b"", b"", b"", b"", b" ", b"  ", b"\t", b"\n", b"\r\n", b" \n\t "]
_BAD_WS = [b"\x0b", b"\x0c", b"\x00", b"\xc2\xa0", b"\xa0", b"\x1c"]
_ID_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0x7F, exclude_characters='"\\')


@st.composite
def _number(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 7))
    if kind <= 2:
        return draw(st.sampled_from(EDGE_NUMBERS)).encode()
    if kind == 3:
        return str(draw(st.integers(-(2**70), 2**70))).encode()
    if kind == 4:
        return repr(draw(st.floats(allow_nan=False, allow_infinity=False))).encode()
    if kind == 5:
        return repr(draw(st.floats(allow_nan=False, allow_infinity=False, width=32))).encode()
    sign = draw(st.sampled_from(["", "", "", "-", "+"]))
    whole = draw(st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,25}", fullmatch=True), st.just("00")))
    frac = draw(st.one_of(st.just(""), st.from_regex(r"\.[0-9]{0,25}", fullmatch=True)))
    exp = draw(st.one_of(st.just(""), st.from_regex(r"[eE][+-]?[0-9]{0,3}", fullmatch=True), st.just("e99999")))
    return (sign + whole + frac + exp).encode()


@st.composite
def _id(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 12))
    if kind <= 6:
        return b'"' + draw(st.text(_ID_CHARS, min_size=1, max_size=16)).encode() + b'"'
    if kind <= 8:  # every length around the limits
        n = draw(st.one_of(st.integers(0, 300), st.sampled_from([7, 8, 9, 63, 64, 65, 254, 255, 256, 257])))
        return b'"' + b"i" * n + b'"'
    if kind == 9:
        return b'"' + b"x" * draw(st.sampled_from([1000, 50_000])) + b'"'
    if kind == 10:
        return str(draw(st.integers(-5, 10**20))).encode()  # an integer id (the careful path's string)
    return draw(
        st.sampled_from(
            [b'""', b"null", b"true", b'"\xc3\xa9"', b'"\\u00e9"', b'"a\\"b"', b'"\x01"', b'"\xff"', b'"a\x00b"']
        )
    )


_scalar = st.one_of(
    _number(),
    st.sampled_from([b"true", b"false", b"null", b'""', b'"x"', b'"\\n"', b'"\xc3\xa9"', b"tru", b"nul", b"'x'"]),
    st.text(_ID_CHARS, max_size=8).map(lambda t: b'"' + t.encode() + b'"'),
)


def _containers(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.lists(children, max_size=4).map(lambda xs: b"[" + b",".join(xs) + b"]"),
        st.lists(st.tuples(st.sampled_from([b'"k"', b'"id"', b'"a b"', b'""']), children), max_size=3).map(
            lambda kvs: b"{" + b",".join(k + b":" + v for k, v in kvs) + b"}"
        ),
    )


_json = st.recursive(_scalar, _containers, max_leaves=8)

#: what may be odd about a record, and how often (most records are plain)
_ODDITIES = {
    "plain": 10,
    "edge number": 6,
    "edge id": 4,
    "unknown fields": 4,
    "mutated": 4,
    "other dataset": 2,
    "odd label": 1,
    "missing or twice": 2,
    "odd features": 2,
    "whitespace": 2,
    "deep": 1,
    "huge": 1,
    "trailing": 1,
    "not an object": 1,
}


@dataclass
class _Tokens:
    """The hypothesis-drawn parts of one record."""

    oddity: str
    number: bytes
    id: bytes
    other: bytes
    rng: random.Random


@st.composite
def _tokens(draw: st.DrawFn) -> _Tokens:
    names, weights = zip(*_ODDITIES.items(), strict=True)
    oddity = draw(st.sampled_from([n for n, w in zip(names, weights, strict=True) for _ in range(w)]))
    number = draw(_number()) if oddity == "edge number" else b"1"
    rid = (
        draw(_id()) if oddity == "edge id" else b'"' + draw(st.text(_ID_CHARS, min_size=1, max_size=12)).encode() + b'"'
    )
    other = draw(_json) if oddity == "unknown fields" else b"null"
    return _Tokens(oddity, number, rid, other, random.Random(draw(st.integers(0, 2**32 - 1))))


def _plain_number(rng: random.Random, dtype: str) -> bytes:
    if dtype == "uint8" or rng.random() < 0.5:
        return str(rng.randint(0, 255)).encode()
    if dtype == "int64":
        return str(rng.randint(-(2**62), 2**62)).encode()
    return repr(round(rng.uniform(-1000, 1000), rng.randint(0, 6))).encode()


def _make_record(spec: DatasetSpec, t: _Tokens) -> bytes:
    """One record of ``spec`` (or almost): plain but for ``t.oddity``."""
    rng, odd = t.rng, t.oddity
    size = math.prod(spec.input_shape)
    items = [_plain_number(rng, spec.dtype) for _ in range(size)]
    if odd == "edge number":
        items[rng.randrange(size)] = t.number
    bad_at = [rng.randrange(2 * size + 16) if odd == "whitespace" else -1]  # one odd space, somewhere

    def ws() -> bytes:
        bad_at[0] -= 1
        return rng.choice(_BAD_WS) if bad_at[0] == -1 else rng.choice(_WS)

    features = b"[" + b",".join(ws() + item + ws() for item in items) + b"]"
    if odd == "odd features":
        features = rng.choice(
            [
                b"[" + b",".join(items[:-1]) + b"]",  # one too few
                b"[" + b",".join([*items, b"1"]) + b"]",  # one too many
                b"[" + b",".join([b"[" + i + b"]" for i in items]) + b"]",  # nested
                b"[" + b",".join([*items[:-1], rng.choice([b"true", b"null", b'"1"', b"[]", b"{}"])]) + b"]",
                b'"' + b",".join(items) + b'"',
                b"[" + b",".join(items),  # not closed
                b"[]",
                b"[" + b",,".join(items) + b"]",
            ]
        )
        if len(spec.input_shape) == 2 and rng.random() < 0.3:  # nested in the shape: the careful path's
            rows, cols = spec.input_shape
            features = (
                b"[" + b",".join(b"[" + b",".join(items[r * cols : (r + 1) * cols]) + b"]" for r in range(rows)) + b"]"
            )
    dataset = b'"' + NAME.encode() + b'"'
    if odd == "other dataset":
        dataset = rng.choice([b'"fz2"', b'"f"', b'"fzz"', b'"FZ"', b'""', b'"fz\\u0000"', b'"f\\u007a"', b"7", b"null"])
    label = b'"' + rng.choice(LABELS).encode() + b'"'
    if odd == "odd label":
        label = rng.choice([b'"zz"', b"7", b"0", b"null", b'""', b'"A"', b'"a "', b"true", b'"\\u0061"', b"7.0"])
    fields = [(b'"dataset"', dataset), (b'"id"', t.id), (b'"features"', features), (b'"label"', label)]
    if odd == "missing or twice":
        k = rng.randrange(len(fields))
        if rng.random() < 0.4:
            del fields[k]
        else:
            fields.append((fields[k][0], rng.choice([fields[k][1], fields[rng.randrange(len(fields))][1]])))
    if odd in ("unknown fields", "deep", "huge") or rng.random() < 0.1:
        key = rng.choice([b'"extra"', b'"meta"', b'""', b'"Dataset"', b'"text"', b'"featur\\u0065s"', b'"x"'])
        value = t.other
        if odd == "deep":  # around the scanner's depth limit, and past orjson's
            depth = rng.choice([62, 63, 64, 65, 66, 200, 2000])
            value = b"[" * depth + b"]" * depth
        elif odd == "huge":
            value = b'"' + b"h" * rng.choice([10_000, 200_000]) + b'"'
        fields.insert(rng.randrange(len(fields) + 1), (key, value))
    rng.shuffle(fields)
    body = b",".join(ws() + k + ws() + b":" + ws() + v + ws() for k, v in fields)
    value = ws() + b"{" + body + b"}" + ws()
    if odd == "huge" and rng.random() < 0.5:
        value = value[:-1] + b" " * 100_000 + b"}"
    if odd == "trailing":
        value += rng.choice([b"x", b",", b"}", b"\x00", b" {}", b"\n\n"])
    if odd == "mutated":
        value = _mutate(value, rng)
    if odd == "not an object":
        value = rng.choice([b"", b"[1,2]", b"null", b"\x00", b'"fz"', b"{", b"{}", b"\xef\xbb\xbf{}", b"{" * 100])
    return value


#: bytes a mutation puts in: NUL, bytes that are never UTF-8 or start a broken sequence, JSON's structure
_INSERTS = b'\x00\xff\xfe\x80\xc0\xc3\xed"\\,:[]{}-+.eE0123456789 \t\nn'


def _mutate(value: bytes, rng: random.Random) -> bytes:
    """A few random edits: truncation, inserted or replaced bytes, deletions, repeats."""
    out = bytearray(value)
    for _ in range(rng.randint(1, 3)):
        op, pos = rng.random(), rng.randrange(len(out) + 1)
        if op < 0.25:
            del out[pos:]  # truncated
        elif op < 0.5:
            out.insert(pos, rng.choice(_INSERTS))
        elif op < 0.7 and pos < len(out):
            out[pos] = rng.choice(_INSERTS)
        elif op < 0.85 and pos < len(out):
            del out[pos]
        else:
            out[pos:pos] = out[pos : pos + rng.randint(1, 12)]
    return bytes(out)


@st.composite
def _cases(draw: st.DrawFn) -> Case:
    spec = draw(st.sampled_from(SPECS))
    values = [_make_record(spec, t) for t in draw(st.lists(_tokens(), min_size=1, max_size=12))]
    n = len(values)
    which = draw(st.one_of(st.just(list(range(n))), st.lists(st.integers(0, n - 1), min_size=1, max_size=2 * n)))
    return Case(values, which, spec, draw(st.sampled_from(ID_LIMITS)))


def _corpus(seed: int, spec: DatasetSpec, n: int) -> list[bytes]:
    """A seeded mutation loop: records of every oddity, numbers and ids at the edges from fixed lists."""
    rng = random.Random(seed)
    names = [name for name, weight in _ODDITIES.items() for _ in range(weight)]
    out = []
    for i in range(n):
        oddity = rng.choice(names)
        rid = b'"c%d"' % i
        if oddity == "edge id":
            rid = b'"' + b"i" * rng.choice([1, 8, 255, 256, 257, 5000]) + b'"'
        number = rng.choice(EDGE_NUMBERS).encode()
        other = rng.choice([b'{"k":[1,2,{"z":null}]}', b'"t"', b"[true,false,null]", b'"\\u00e9"', b"1e999"])
        out.append(_make_record(spec, _Tokens(oddity, number, rid, other, random.Random(rng.random()))))
    return out


# ------------------------------------------------------------------ the check


def _check(case: Case, stats: Counter[str]) -> None:
    """The scan of ``case`` never contradicts the careful path (see the module docstring)."""
    batch = fastscan.JsonBatch.of(case.values)
    which = np.array(case.which, dtype=np.int64)
    spec = case.spec
    sc = fastscan.scan(batch, which, spec, max_id_bytes=case.max_id_bytes)
    assert sc is not None
    status: npt.NDArray[np.int8] = sc.status
    assert status.shape == which.shape and set(status.tolist()) <= {0, 1, 2}
    accepted = np.flatnonzero(status == fastscan.ACCEPTED).tolist()
    n = len(accepted)
    assert len(sc.labels) == len(sc.holdout) == len(sc.x) == len(sc.id_starts) == len(sc.id_column) == n
    assert sc.x.dtype == np.dtype(spec.dtype) and sc.x.shape == (n, *spec.input_shape)
    for j, k in enumerate(accepted):
        value = case.values[case.which[k]]
        try:
            rec = clean(parse(value, "application/json"), spec)
        except RecordError as exc:
            raise AssertionError(f"the fast path accepted what the careful path rejects ({exc}): {value!r}") from exc
        rid = sc.id_at(j)
        assert rec.dataset == spec.name, value
        assert (rid, str(sc.id_column[j])) == (rec.id, rec.id), value
        assert 0 < len(rid) <= case.max_id_bytes, value
        assert (int(sc.labels[j]), bool(sc.holdout[j])) == (rec.label, rec.holdout), value
        assert rec.x is not None and rec.x.dtype == sc.x.dtype and rec.x.shape == sc.x[j].shape, value
        assert sc.x[j].tobytes() == rec.x.tobytes(), (value, sc.x[j], rec.x)  # bit for bit: -0.0 too
    others = np.flatnonzero(status == fastscan.OTHER_DATASET).tolist()
    assert sorted(sc.other) == others
    for k, name in sc.other.items():
        assert name and name != spec.name and b'"%s"' % name.encode() in case.values[case.which[k]]
    ids = fastscan.IdSet()  # the scanned ids go into the id set as they are
    fresh = ids.add_bytes(sc.id_bytes, sc.id_starts, sc.id_lengths).tolist()
    assert fresh == [sc.ids.index(rid) == j for j, rid in enumerate(sc.ids)]
    stats["records"] += len(which)
    stats["accepted"] += n
    stats["other"] += len(others)
    stats["undecided"] += len(which) - n - len(others)


def _fuzz(max_examples: int, stats: Counter[str]) -> Callable[[], None]:
    @settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(case=_cases())
    def fuzz(case: Case) -> None:
        _check(case, stats)

    return fuzz


def _check_corpus(stats: Counter[str]) -> None:
    for seed, spec in enumerate(SPECS):
        values = _corpus(seed, spec, CORPUS // len(SPECS))
        _check(Case(values, list(range(len(values))), spec, 256), stats)


# ------------------------------------------------------------------ in this process

_STATS: Counter[str] = Counter()


@pytest.fixture(autouse=True, scope="module")
def _scanner() -> None:
    assert fastscan.available(), "the C scanner did not build"


test_generated_batches_never_contradict_the_careful_path = _fuzz(EXAMPLES, _STATS)


def test_a_seeded_corpus_never_contradicts_the_careful_path() -> None:
    stats: Counter[str] = Counter()
    _check_corpus(stats)
    assert stats["records"] == CORPUS
    # the corpus exercises every verdict, not only one
    assert stats["accepted"] > CORPUS // 5 and stats["undecided"] > CORPUS // 10 and stats["other"] > 0, stats


# ------------------------------------------------------------------ under the sanitizers


def _sanitizer_runtime() -> tuple[str, str] | str:
    """gcc and its libasan, or why they cannot be had."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return "gcc is not installed (the sanitizer build needs it)"
    asan = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False)
    path = asan.stdout.strip()
    if asan.returncode != 0 or not os.path.isabs(path) or not os.path.exists(path):
        return "gcc's AddressSanitizer runtime (libasan.so) is missing: install libasan (gcc's package ships it)"
    return gcc, os.path.realpath(path)


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The scanner built with ASan + UBSan, and the environment a process that loads it needs."""
    found = _sanitizer_runtime()
    if isinstance(found, str):
        if IN_CI:
            pytest.fail(f"the sanitizer fuzz test cannot run in CI: {found}")
        pytest.skip(found)
    gcc, libasan = found
    target = tmp_path_factory.mktemp("asan") / "fastscan-asan.so"
    native.build(ROOT / "services" / "ingest" / "fastscan.c", target, ("-lm",), SANITIZE, compiler=[gcc])
    env = {
        **os.environ,
        "CDL_FASTSCAN_LIB": str(target),
        "LD_PRELOAD": libasan,
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=87",
        "PYTHONMALLOC": "malloc",
        "PYTHONPATH": str(ROOT),
        "CDL_FUZZ_EXAMPLES": str(EXAMPLES),
    }
    env.pop("CDL_INGEST_NO_FASTSCAN", None)
    return target, env


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_under_asan_and_ubsan_generated_batches_never_contradict_the_careful_path(
    sanitized: tuple[Path, dict[str, str]],
) -> None:
    _, env = sanitized
    done = _run(env)
    tail = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, f"the sanitized fuzz run failed (exit {done.returncode}):\n{tail}"
    line = next(x for x in done.stdout.splitlines() if x.startswith("fuzz ok "))
    stats = json.loads(line.removeprefix("fuzz ok "))
    assert stats["records"] > EXAMPLES and stats["accepted"] > CORPUS // 5 and stats["undecided"] > 0, stats


def test_the_sanitizer_catches_a_read_past_a_buffer(sanitized: tuple[Path, dict[str, str]]) -> None:
    _, env = sanitized
    done = _run(env, "--canary")
    report = f"exit {done.returncode}\nstdout: {done.stdout[-1000:]}\nstderr: {done.stderr[:4000]}"
    assert done.returncode == 86, report
    assert "AddressSanitizer: heap-buffer-overflow" in done.stderr, report


def _main(argv: list[str]) -> int:
    """The sanitized run (this file as a script, the scanner from ``CDL_FASTSCAN_LIB``)."""
    lib = fastscan._load()
    assert lib is not None and lib._name == os.environ["CDL_FASTSCAN_LIB"], "not the sanitized build"
    if argv == ["--canary"]:  # an id said to run 8 bytes past the end of its buffer: ASan must stop this
        blob = np.full(64, ord("a"), dtype=np.uint8)
        out = np.zeros((1, 72), dtype=np.uint32)
        one = np.zeros(1, dtype=np.int64)
        lengths = one + 72
        # where the buffers lie, for a report that is not the expected one
        where = (blob.ctypes.data, out.ctypes.data, lengths.ctypes.data)
        print("blob {:#x}+64 out {:#x}+288 lengths {:#x}".format(*where), flush=True)
        lib.cdl_ids_ucs4(blob, one, lengths, 1, 72, out)
        print("canary: not caught")
        return 1
    stats: Counter[str] = Counter()
    _fuzz(EXAMPLES, stats)()
    _check_corpus(stats)
    print("fuzz ok " + json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
