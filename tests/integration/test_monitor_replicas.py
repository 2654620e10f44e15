"""The monitor as replicas (docs/monitor.md, "Replicas"): several processes in one Faust group on
the real broker split the partitions; a model's windows and drift state are kept by the member
holding the model's partition, a request's join by the member holding the request id's, and what
one reads for another is routed to it.

The log is written as the gateway writes it (``InferenceLoggedBatch`` records keyed by model);
labels come on a one-partition ``data.feedback`` (the fixture's), so one member reads them all and
routes most of them on.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cdl.events import Event, key_partition
from cdl.kafka import Producer
from cdl.store import ObjectStore
from cdl.v1 import events_pb2
from tests.helpers import read_committed, wait_for
from tests.integration.conftest import monitor_service_factory, new_monitor_topics
from tests.integration.test_monitor import DIGITS, _events, _label, _metric, _request, _version

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
