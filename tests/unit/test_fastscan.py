"""The C fast path of ingest never changes a verdict: what it accepts, the careful path accepts the same way."""

from __future__ import annotations

import json
import random
import tracemalloc

import numpy as np
import pytest

from cdl.datasets import DatasetSpec, Task, holdout_member
from services.ingest import fastscan
from services.ingest.records import RecordError, clean, parse

SPEC = DatasetSpec(
    name="fs",
    task=Task.TABULAR,
    labels=("a", "b", "7"),
    input_shape=(4,),
    dtype="float64",  # so that values compare exactly, not after rounding to float32
    holdout_fraction=0.3,
)

GOOD = [
    b'{"dataset":"fs","id":"r1","features":[1,2.5,-3e2,0.1],"label":"a"}',
    b' {"label":"b" , "features":[ 0 , -0 , 1E5 , 4.000000000000000000001 ],"id":"r2","dataset":"fs"}\n',
    b'{"dataset":"fs","id":"r3","features":[18446744073709551616,0.1e-320,1.7976931348623157e308,-0.0],"label":"7"}',
    b'{"dataset":"fs","id":"r4","features":[1,2,3,4],"label":"a","extra":{"k":[1,{"z":null}],"t":true,"f":false}}',
    b'{"dataset":"fs","id":"r5","features":[0.30000000000000004,1e-7,123456789012345678,5e22],"label":"a"}',
    # shapes the features fast path takes (plain decimals) or hands back to the general scan
    b'{"dataset":"fs","id":"r6","features":[0.0, 13.0, -0.0, -0],"label":"a"}',
    b'{"dataset":"fs","id":"r7","features":[123456789012345,0.12345678901234,-99999999999999.9,0.1],"label":"b"}',
    b'{"dataset":"fs","id":"r8","features":[1234567890123456,0.000000000000001,7, 8],"label":"b"}',
    b'{"dataset":"fs","id":"r9","features":[ 1 , 2 ,3,   4 ],"label":"a"}',
    b'{"dataset":"fs","id":"s1","features":[1,\t2,3,4\n],"label":"a"}',
]

LEFT_TO_CAREFUL = [
    b'{"dataset":"fs","id":"u1","features":[1,2,3],"label":"a"}',  # too few values
    b'{"dataset":"fs","id":"u2","features":[1,2,3,4,5],"label":"a"}',  # too many
    b'{"dataset":"fs","id":"u3","features":[1,true,3,4],"label":"a"}',  # boolean
    b'{"dataset":"fs","id":"u4","features":[1,2,3,1e400],"label":"a"}',  # infinite
    b'{"dataset":"fs","id":"u5","features":[1,2,3,NaN],"label":"a"}',  # not JSON
    b'{"dataset":"fs","id":"u6","features":[1,2,3,4],"label":"zz"}',  # unknown label
    b'{"dataset":"fs","id":"u7","features":[1,2,3,4],"label":"a"} x',  # trailing bytes
    b'{"dataset":"fs","id":"u8","features":[1,2,3,4],"label":"a","e":[1,,2]}',  # bad skipped value
    b'{"dataset":"fs","id":"u9","features":[01,2,3,4],"label":"a"}',  # leading zero
    b'{"dataset":"fs","id":"","features":[1,2,3,4],"label":"a"}',  # empty id
    b'{"dataset":"fs","id":7,"features":[1,2,3,4],"label":"a"}',  # integer id
    b'{"dataset":"fs","id":"v1","features":[1,2,3,4],"label":7}',  # integer label
    b'{"dataset":"fs","id":"v2","features":[1,2,3,4]}',  # unlabelled
    b'{"dataset":"fs","id":"v3","features":[1,2,3,4],"label":null}',
    b'{"dataset":"fs","id":"v4","features":[[1,2],[3,4]],"label":"a"}',  # nested
    b'{"dataset":"fs","id":"v5","features":[1,2,3,4],"label":"a","label":"b"}',  # key twice
    b'{"dataset":"fs","id":"v\\u00e9","features":[1,2,3,4],"label":"a"}',  # escape
    '{"dataset":"fs","id":"vé","features":[1,2,3,4],"label":"a"}'.encode(),  # non-ASCII
    b'{"dataset":"fs","id":"v6","features":[1,2,3,4],"label":"a","text":"hi"}',
    b'{"dataset":"fs","id":"v7","features":"1,2,3,4","label":"a"}',
    b'{"dataset":"fs","id":"v8","features":[1,2,3,4],"label":"a"',  # truncated
    b"[1,2,3]",
    b"",
    b"\xff\xfe",
    b'{"dataset":"fs","id":"v9","features":[1,2,3,-],"label":"a"}',
    b'{"dataset":"fs","id":"w1","features":[1.,2,3,4],"label":"a"}',
    b'{"dataset":"fs","id":"w2","features":[1,2,3,.5],"label":"a"}',
    b'{"dataset":"fs","id":"w3","features":[1,2,3,4e],"label":"a"}',
]


Verdict = tuple[str, int, bool, list[float]]


def _careful(value: bytes, spec: DatasetSpec = SPEC) -> Verdict | None:
    try:
        rec = clean(parse(value, "application/json"), spec)
    except RecordError:
        return None
    assert rec.x is not None
    assert rec.x.dtype == np.dtype(spec.dtype)
    return rec.id, rec.label, rec.holdout, rec.x.reshape(-1).tolist()


def _fast(values: list[bytes], spec: DatasetSpec = SPEC) -> tuple[fastscan.Scan, list[Verdict]]:
    sc = fastscan.scan(fastscan.JsonBatch.of(values), np.arange(len(values)), spec)
    assert sc is not None
    n = int((sc.status == fastscan.ACCEPTED).sum())
    assert len(sc.ids) == len(sc.labels) == len(sc.holdout) == len(sc.x) == n
    assert sc.x.dtype == np.dtype(spec.dtype) and sc.x.shape[1:] == spec.input_shape
    out = [(rid, int(sc.labels[j]), bool(sc.holdout[j]), sc.x[j].reshape(-1).tolist()) for j, rid in enumerate(sc.ids)]
    return sc, out


@pytest.fixture(autouse=True, scope="module")
def _scanner() -> None:
    # the machine this project runs on has a C compiler: no compiler is a failure here
    assert fastscan.available(), "the C scanner did not build"


def test_plain_records_are_accepted_exactly_as_the_careful_path_would() -> None:
    sc, out = _fast(GOOD)
    assert (sc.status == fastscan.ACCEPTED).all()
    for value, got in zip(GOOD, out, strict=True):
        want = _careful(value)
        assert want is not None
        assert got[:3] == want[:3]
        assert np.array_equal(got[3], want[3])


def test_anything_unusual_is_left_to_the_careful_path() -> None:
    sc, out = _fast(LEFT_TO_CAREFUL)
    assert out == []
    assert (sc.status == fastscan.UNDECIDED).all(), [v for v, s in zip(LEFT_TO_CAREFUL, sc.status, strict=True) if s]


def test_features_end_within_their_own_record() -> None:
    # the features fast path reads on past a record's end (up to the buffer's NUL); the
    # record boundary still decides: none of these may borrow bytes from its neighbour
    values = [
        b'{"dataset":"fs","id":"b1","features":[1,2,3,4',
        b'5],"label":"a"}',
        b'{"dataset":"fs","id":"b2","features":[1,2,3,4',
        b'],"label":"a"}',
        b'{"dataset":"fs","id":"b3","features":[1,2,3,',
        b"4]",
        GOOD[5],
    ]
    sc, out = _fast(values)
    assert sc.status.tolist() == [fastscan.UNDECIDED] * 6 + [fastscan.ACCEPTED]
    assert [o[0] for o in out] == ["r6"]


def test_negative_zero_keeps_its_sign() -> None:
    _, out = _fast([GOOD[5]])
    want = _careful(GOOD[5])
    assert want is not None
    assert np.signbit(out[0][3]).tolist() == np.signbit(want[3]).tolist() == [False, False, True, False]


def test_other_datasets_are_named_for_a_second_scan() -> None:
    values = [GOOD[0], b'{"dataset":"other","id":"o1","features":[1],"label":"x"}', GOOD[3]]
    sc, out = _fast(values)
    assert sc.status.tolist() == [fastscan.ACCEPTED, fastscan.OTHER_DATASET, fastscan.ACCEPTED]
    assert sc.other == {1: "other"}
    assert [o[0] for o in out] == ["r1", "r4"]


def test_split_is_the_datasets_hash() -> None:
    values = [
        json.dumps({"dataset": "fs", "id": f"id-{i}", "features": [i, 0, 0, 0], "label": "a"}).encode()
        for i in range(2000)
    ]
    _, out = _fast(values)
    assert len(out) == 2000
    for rid, _, holdout, _ in out:
        assert holdout == holdout_member("fs", rid, SPEC.holdout_fraction)
    assert 0.25 < sum(o[2] for o in out) / len(out) < 0.35


@pytest.mark.parametrize(
    ("dtype", "accepted", "undecided"),
    [
        ("uint8", [b"[0,1,254,255]", b"[0.0,1e1,2,3]"], [b"[-1,0,0,0]", b"[256,0,0,0]", b"[0.5,0,0,0]"]),
        ("int64", [b"[-5,0,9007199254740992,3]"], [b"[0.5,0,0,0]", b"[1e19,0,0,0]"]),
        ("float32", [b"[0.1,-2.5,3e38,1e-50]"], [b"[1e39,0,0,0]", b"[-1e300,0,0,0]"]),
    ],
)
def test_values_are_written_in_the_datasets_dtype(dtype: str, accepted: list[bytes], undecided: list[bytes]) -> None:
    spec = DatasetSpec(name="fs", task=Task.TABULAR, labels=("a", "b"), input_shape=(2, 2), dtype=dtype)
    values = [b'{"dataset":"fs","id":"i%d","label":"a","features":%s}' % (i, f) for i, f in enumerate(accepted)]
    values += [b'{"dataset":"fs","id":"u%d","label":"a","features":%s}' % (i, f) for i, f in enumerate(undecided)]
    sc, out = _fast(values, spec)
    assert sc.status.tolist() == [fastscan.ACCEPTED] * len(accepted) + [fastscan.UNDECIDED] * len(undecided)
    for value, got in zip(values, out, strict=False):
        assert got == _careful(value, spec)
    for value in values[len(accepted) :]:
        assert _careful(value, spec) is None  # the careful path rejects what does not fit the dtype


def test_random_mutations_never_change_a_verdict() -> None:
    rng = random.Random(7)
    alphabet = b' ,:[]{}"-+.eE0123456789abtrufnl\\'
    values: list[bytes] = []
    for _ in range(3000):
        base = bytearray(rng.choice(GOOD))
        for _ in range(rng.randint(1, 3)):
            op, pos = rng.random(), rng.randrange(len(base) + 1)
            if op < 0.4 and pos < len(base):
                base[pos] = rng.choice(alphabet)
            elif op < 0.7:
                base.insert(pos, rng.choice(alphabet))
            elif pos < len(base):
                del base[pos]
        values.append(bytes(base))
    sc, out = _fast(values)
    accepted = np.flatnonzero(sc.status == fastscan.ACCEPTED).tolist()
    assert accepted, "no mutation survived: the test exercises nothing"
    for k, got in zip(accepted, out, strict=True):
        want = _careful(values[k])
        assert want is not None, values[k]
        assert got[:3] == want[:3], values[k]
        assert np.array_equal(got[3], want[3]), values[k]


def test_the_id_column_holds_the_ids_as_shards_store_them() -> None:
    values = [
        b'{"dataset":"fs","id":"%s","features":[1,2,3,4],"label":"a"}' % rid
        for rid in (b"a", b"longer-id-0123456789", b"x", b"7")
    ]
    sc, _ = _fast(values)
    assert sc.id_column.tolist() == sc.ids == ["a", "longer-id-0123456789", "x", "7"]
    assert sc.id_column.dtype == np.dtype("<U20")
    assert np.array_equal(sc.id_column, np.array(sc.ids))  # what np.array(list of ids) would store
    empty, _ = _fast([b"not json"])
    assert empty.id_column.shape == (0,)


@pytest.mark.parametrize("native", [True, False], ids=["C", "python-fallback"])
def test_id_set_keeps_the_first_of_each_id(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not native:
        monkeypatch.setattr(fastscan, "_load", lambda: None)
    ids = fastscan.IdSet()
    assert len(ids) == 0 and "a" not in ids
    assert ids.add("a") and not ids.add("a")
    fresh = ids.add_all(["b", "a", "c", "b", "é", ""])
    assert fresh.tolist() == [True, False, True, False, True, True]
    assert len(ids) == 5 and "é" in ids and "" in ids and "d" not in ids
    many = [f"id-{i}" for i in range(50_000)]  # grows the table and the arena several times
    assert ids.add_all(many).all() and not ids.add_all(many[::-1]).any()
    assert len(ids) == 50_005 and all(rid in ids for rid in many[::997])


def test_scanned_ids_go_into_the_id_set_in_stream_order() -> None:
    values = [b'{"dataset":"fs","id":"%s","features":[1,2,3,4],"label":"a"}' % rid for rid in (b"p", b"q", b"p", b"r")]
    sc, _ = _fast(values)
    ids = fastscan.IdSet()
    ids.add("r")
    assert ids.add_bytes(sc.id_bytes, sc.id_starts, sc.id_lengths).tolist() == [True, True, False, False]
    assert [sc.id_at(k) for k in range(4)] == sc.ids == ["p", "q", "p", "r"]


def test_an_id_over_the_limit_is_left_to_the_careful_path() -> None:
    def rec(rid: bytes) -> bytes:
        return b'{"dataset":"fs","id":"%s","features":[1,2,3,4],"label":"a"}' % rid

    values = [rec(b"i" * n) for n in (1, 255, 256, 257, 50_000)]
    sc, out = _fast(values)
    assert sc.status.tolist() == [fastscan.ACCEPTED] * 3 + [fastscan.UNDECIDED] * 2
    assert [len(o[0]) for o in out] == [1, 255, 256]
    assert sc.id_column.dtype == np.dtype("<U256")
    tight = fastscan.scan(fastscan.JsonBatch.of(values), np.arange(len(values)), SPEC, max_id_bytes=8)
    assert tight is not None
    assert tight.status.tolist() == [fastscan.ACCEPTED] + [fastscan.UNDECIDED] * 4
    assert tight.ids == ["i"] and tight.id_column.dtype == np.dtype("<U1")


def test_one_huge_id_in_a_large_batch_costs_no_more_memory() -> None:
    # the id column was once n x longest id x 12 bytes: ~6 GB for one 50 kB id among 10,000 records
    values = [b'{"dataset":"fs","id":"r%d","features":[1,2,3,4],"label":"a"}' % i for i in range(10_000)]
    values[5000] = b'{"dataset":"fs","id":"%s","features":[1,2,3,4],"label":"a"}' % (b"x" * 50_000)
    batch = fastscan.JsonBatch.of(values)
    tracemalloc.start()
    try:
        sc = fastscan.scan(batch, np.arange(len(values)), SPEC)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sc is not None
    assert sc.status[5000] == fastscan.UNDECIDED and (np.delete(sc.status, 5000) == fastscan.ACCEPTED).all()
    assert sc.id_column.dtype == np.dtype("<U5") and sc.id_column[5000] == "r5001"
    assert peak < 8 * 2**20, f"a scan of 10,000 small records took {peak / 2**20:.1f} MiB"


def test_the_id_column_pads_ids_of_mixed_lengths() -> None:
    rids = [b"a" * n for n in (256, 1, 0, 17, 256, 2)]
    values = [b'{"dataset":"fs","id":"%s","features":[1,2,3,4],"label":"b"}' % r for r in rids]
    sc, _ = _fast(values)
    want = [r.decode() for r in rids if r]
    assert sc.id_column.tolist() == sc.ids == want
    assert np.array_equal(sc.id_column, np.array(want))
