"""The monitor as replicas (docs/monitor.md, "Replicas"): several processes in one Faust group on
the real broker split the partitions; a model's windows and drift state are kept by the member
holding the model's partition, a request's join by the member holding the request id's, and what
one reads for another is routed to it.

The log is written as the gateway writes it (``InferenceLoggedBatch`` records keyed by model);
labels come on a one-partition ``data.feedback`` (the fixture's), so one member reads them all and
routes most of them on.
"""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cdl.datasets import DATASETS_BUCKET, load_version
from cdl.events import Event, key_partition
from cdl.kafka import Producer
from cdl.store import ObjectStore
from cdl.v1 import events_pb2
from tests.helpers import read_committed, wait_for
from tests.integration.conftest import monitor_service_factory, new_monitor_topics
from tests.integration.test_monitor import DIGITS, LABELS, _events, _label, _metric, _register, _request, _version

pytestmark = pytest.mark.timeout(600)

MODELS = 6
PER_MODEL = 300  # three drift tests of 100 requests per model
ORDER = np.random.default_rng(0).permutation(len(DIGITS.data))


def _spread(prefix: str, uid: str, n: int, partitions: int = 3) -> list[str]:
    """``n`` model names whose partitions (as the monitor keys them) are spread evenly over the
    log's ``partitions``, so that every member of a group keeps some models."""
    names: list[str] = []
    per = [0] * partitions
    want = [n // partitions + (1 if j < n % partitions else 0) for j in range(partitions)]
    i = 0
    while len(names) < n:
        name = f"{prefix}{i}_{uid}"
        p = key_partition(name, partitions)
        if per[p] < want[p]:
            names.append(name)
            per[p] += 1
        i += 1
    return names


def _log_batch(producer: Producer, topic: str, model: str, recs: list[events_pb2.InferenceLogged]) -> None:
    producer.send(topic, Event(events_pb2.InferenceLoggedBatch(records=recs), source="/cdl/test", key=model))


def _workload(producer: Producer, topics: dict[str, str], models: list[str]) -> int:
    """The same requests and labels for every run: PER_MODEL requests of each model in batches of 50
    (the last model's inputs inverted: it drifts), a label for every other request, half of them
    sent before their request is logged; two answers in three right. Returns the labels sent."""
    labels = 0
    for m, model in enumerate(models):
        picked = ORDER[m * 250 : m * 250 + PER_MODEL]  # (the digits come in runs by writer: shuffled)
        rows = DIGITS.data[picked].astype(np.float32)
        rows = 16 - rows if m == len(models) - 1 else rows
        recs = []
        for i, row in enumerate(rows):
            rid = f"{model}-r{i}"
            truth = int(DIGITS.target[picked[i]])
            pred = truth if i % 3 else (truth + 1) % 10
            recs.append(
                events_pb2.InferenceLogged(
                    request_id=rid,
                    model=model,
                    version=1,
                    inputs_sample=_request(row, rid),
                    predicted_labels=[str(pred)],
                    latency_ms=2.0,
                    status="OK",
                )
            )
            if i % 2 == 0 and i % 4 == 0:  # labels that come first
                _label(producer, topics["feedback"], rid, str(truth))
                labels += 1
        producer.flush()
        for start in range(0, len(recs), 50):
            _log_batch(producer, topics["logged"], model, recs[start : start + 50])
        producer.flush()
        for i in range(2, PER_MODEL, 4):  # labels that come after
            truth = int(DIGITS.target[picked[i]])
            _label(producer, topics["feedback"], f"{model}-r{i}", str(truth))
            labels += 1
        producer.flush()
    return labels


def _totals(bootstrap: str, topics: dict[str, str], models: list[str]) -> dict[str, tuple[int, int, int, int]]:
    """Per model (all version 1): requests, errors, labels and right answers over its windows."""
    out: dict[str, list[int]] = {m: [0, 0, 0, 0] for m in models}
    for h in _events(bootstrap, topics["health"]):
        if h.model in out:
            t = out[h.model]
            t[0] += h.requests
            t[1] += h.errors
            t[2] += h.feedback
            t[3] += round(h.score * h.feedback)
    return {m: (t[0], t[1], t[2], t[3]) for m, t in out.items()}


def _run(
    stack: dict[str, Any], bootstrap: str, store: ObjectStore, tmp: Path, instances: int
) -> tuple[dict[str, tuple[int, int, int, int]], list[str], list[dict[str, float]]]:
    """One run of the workload against ``instances`` monitors in one group, on fresh topics: the
    per-model totals (models named by their index), the drifted models and each member's counters."""
    topics = new_monitor_topics(bootstrap)
    uid = topics["group"].rsplit("-", 1)[1]
    models = _spread("rep", uid, MODELS)
    for model in models:
        _version(store, model, 1, f"ds-{model}", reference=DIGITS.data)
    factory = monitor_service_factory(stack, topics, tmp / f"run{instances}")
    (tmp / f"run{instances}").mkdir()
    try:
        mons = [factory() for _ in range(instances)]
        for mon in mons:
            mon.start()

        def settled() -> bool:
            held = [_metric(mon, "cdl_monitor_partitions_held") for mon in mons]
            return all(h > 0 for h in held) and sum(held) == 3

        wait_for(settled, 90, f"{instances} monitors holding the 3 partitions between them")
        p = Producer(bootstrap)
        labels = _workload(p, topics, models)

        def done() -> dict[str, tuple[int, int, int, int]] | None:
            totals = _totals(bootstrap, topics, models)
            finished = all(t[0] == PER_MODEL and t[2] == PER_MODEL // 2 for t in totals.values())
            return totals if finished else None

        totals = wait_for(done, 120, "every request and label in the health windows")
        assert sum(t[2] for t in totals.values()) == labels
        drifted = sorted({a.model for a in _events(bootstrap, topics["drift"])})
        # every labelled request went to data.raw once (no rebalance: none twice)
        raw = Counter(r.key for r in read_committed(bootstrap, topics["raw"], expected=labels, timeout_s=30))
        assert len(raw) == labels and set(raw.values()) == {1}, raw.most_common(3)
        counters = [
            {
                "logged": _metric(mon, "cdl_monitor_events_total", topic=topics["logged"], outcome="ok"),
                "joins": _metric(mon, "cdl_monitor_feedback_total", outcome="joined"),
                "routed": sum(
                    _metric(mon, "cdl_monitor_routed_total", kind=k) for k in ("logged", "served", "labels", "outcomes")
                ),
            }
            for mon in mons
        ]
        named = {str(models.index(m)): t for m, t in totals.items()}
        return named, [str(models.index(m)) for m in drifted], counters
    finally:
        factory.stop_all()


def test_two_monitors_give_the_same_health_windows_as_one(
    stack: dict[str, Any], kafka_bootstrap: str, object_store: ObjectStore, tmp_path: Path
) -> None:
    """The same log and labels through one monitor and through two in one group: per model, the
    same requests, labels and right answers over its windows, the same drift alert (the model fed
    inverted images), each labelled request sent to data.raw once; both members did work. (Windows
    are of processing time, so their boundaries differ from run to run: their sums per model are
    what is compared.)"""
    one, drift_one, [c1] = _run(stack, kafka_bootstrap, object_store, tmp_path, 1)
    two, drift_two, counters = _run(stack, kafka_bootstrap, object_store, tmp_path, 2)
    assert one == two
    assert all(t == (PER_MODEL, 0, PER_MODEL // 2, t[3]) for t in one.values()), one
    assert sum(t[3] for t in one.values()) == MODELS * (PER_MODEL // 2) * 2 // 3, one
    assert drift_one == drift_two == [str(MODELS - 1)]
    assert c1["routed"] == 0  # one member holds every partition: nothing is routed
    assert all(c["logged"] > 0 for c in counters), counters  # both kept models
    assert all(c["joins"] > 0 for c in counters), counters  # both joined labels
    assert sum(c["logged"] for c in counters) == MODELS * PER_MODEL
    assert sum(c["routed"] for c in counters) > 0


def test_monitor_replicas_killed_and_added_mid_stream_land_each_labelled_request_once(
    monitor_factory: Any,
    monitor_topics: dict[str, str],
    ingest_factory: Any,
    kafka_bootstrap: str,
    object_store: ObjectStore,
) -> None:
    """Two monitors; one killed -9 while requests and labels stream, a third added: every labelled
    request becomes one record of the model's dataset (ingest keeps a redelivered join once), none
    is lost, and the members left count every request."""
    uid = uuid.uuid4().hex[:8]
    models = _spread("kr", uid, 4)
    dataset = f"served-{uid}"
    for model in models:
        _version(object_store, model, 1, dataset)
    ingest = ingest_factory(raw_topic=monitor_topics["raw"]).start()
    total = 4 * 60
    _register(ingest, dataset, min_new_records=total // 2)
    mons = [monitor_factory().start(), monitor_factory().start()]
    wait_for(
        lambda: (
            sum(_metric(m, "cdl_monitor_partitions_held") for m in mons) == 3
            and all(_metric(m, "cdl_monitor_partitions_held") > 0 for m in mons)
        ),
        90,
        "two monitors sharing the partitions",
    )
    logged, feedback = monitor_topics["logged"], monitor_topics["feedback"]
    rng = np.random.default_rng(3)
    p = Producer(kafka_bootstrap)

    def wave(first: int, last: int) -> None:
        for model in models:
            recs = [
                events_pb2.InferenceLogged(
                    request_id=f"{model}-{i}",
                    model=model,
                    version=1,
                    inputs_sample=_request(rng.normal(size=4).astype(np.float32), f"{model}-{i}"),
                    predicted_labels=[str(i % 3)],
                    latency_ms=1.0,
                    status="OK",
                )
                for i in range(first, last)
            ]
            _log_batch(p, logged, model, recs)
            for i in range(first + first % 2, last, 2):  # a label for each even request
                _label(p, feedback, f"{model}-{i}", LABELS[i % 3])
        p.flush()

    wave(0, 30)
    wait_for(lambda: sum(_metric(m, "cdl_monitor_feedback_total", outcome="joined") for m in mons) >= 40, 60, "joins")
    mons[0].kill()  # -9, mid-stream
    wave(30, 45)
    mons.append(monitor_factory().start())
    wave(45, 60)
    want = {f"{model}-{i}" for model in models for i in range(0, 60, 2)}

    def missing() -> list[str]:  # labelled requests not on data.raw yet (what a failure names)
        raw = read_committed(kafka_bootstrap, monitor_topics["raw"], expected=10**6, timeout_s=3)
        return sorted(want - {r.key.decode() for r in raw if r.key})

    try:
        wait_for(lambda: object_store.exists(DATASETS_BUCKET, f"{dataset}/versions/1.json"), 120, "version 1")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; labelled requests not on data.raw: {missing()}") from None
    data = load_version(object_store, dataset, 1)
    expected = sorted(f"served-{model}-{i}" for model in models for i in range(0, 60, 2))
    assert sorted(str(i) for i in data.ids) == expected  # each once, none lost
    labels = dict(zip((str(i) for i in data.ids), (LABELS[int(y)] for y in data.labels), strict=True))
    assert all(labels[rid] == LABELS[int(rid.rsplit("-", 1)[1]) % 3] for rid in expected)

    def counted() -> dict[str, tuple[int, int, int, int]] | None:
        totals = _totals(kafka_bootstrap, monitor_topics, models)
        return totals if all(t[0] >= 60 and t[2] >= 30 for t in totals.values()) else None

    # at least once: a member killed before its offsets were committed has its records counted
    # again by the one taking its partitions over; none is lost
    try:
        wait_for(counted, 60, "every request and label of every model in the windows")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {_totals(kafka_bootstrap, monitor_topics, models)}") from None
    assert all(_metric(m, "cdl_monitor_events_total", topic=logged, outcome="ok") > 0 for m in mons[1:])
