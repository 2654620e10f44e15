"""The monitor service: a Faust app (faust-streaming on aiokafka) over the inference log and late labels.

Agents and tables (docs/monitor.md):

- ``inference.logged`` → the ``served`` table (request id → what was served), the
  open ``health`` windows of its (model, version), and the version's drift tracker
  (state in the ``drift`` table); a full drift window over the threshold
  ``persist`` times in a row → ``drift.detected``.
- ``data.feedback`` with a ``request_id`` → joined to ``served`` (or kept in
  ``pending`` until its request is logged): the answer's correctness goes into
  the version's health window; the request's inputs with the label go to
  ``data.raw`` as a record of the model's dataset. Feedback for records
  (``record_id``) is ingest's and is skipped here; feedback whose request never
  shows up within ``join_ttl_s`` is counted (``cdl_monitor_feedback_total{outcome}``),
  never dead-lettered.
- timers: closed windows → ``model.health``; expired joins dropped and counted;
  consumer lag per input partition into Prometheus.

Replicas (docs/monitor.md, "Replicas"): the members of the group split the
partitions (the inputs, the route topic ``<group_id>-route`` and the tables'
changelogs have the same count: faust assigns partition i of each to one member).
A model's health windows and drift state are kept by the member holding the
model's partition (librdkafka's partitioner on the model, as the gateway keys its
log); a request's join by the member holding the request id's partition. What a
member reads for another (a log record of another's model, a served request or a
label whose id another joins, a join's outcome for another's model) goes to it on
the route topic, at that partition; with one member nothing is routed.

Tables live in memory and are backed by compacted changelog topics
(``<group_id>-<table>-changelog``): a restarted monitor (kill -9 included) reads
them back before it processes anything. An entry is written to the changelog
partition of its model or request id (not the event's: timers write too), so the
member that takes a partition over reads back that partition's windows, joins
and drift state whole. Processing is at-least-once:
outputs are acknowledged before the table entries that say they were sent are
changed; a join redone after a crash sends its training record again under the
same id, which ingest keeps once (the repeat is dead-lettered as
``duplicate_id``). Open health windows are kept in memory and written to their
table after each handled event or batch (before its offset can be committed:
faust flushes the producer first, so a killed monitor loses no count); every
handler changes them without awaiting, so concurrent agents never lose each
other's counts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import faust
import numpy as np
import orjson
from prometheus_client import Counter, Gauge

from cdl import tracing
from cdl.datasets import Task
from cdl.errors import ConfigError, DecodeError, InvalidInputError
from cdl.events import Event, Headers, decode, encode, header_dict, key_partition, new_traceparent, source_name
from cdl.feedback import parse_feedback
from cdl.kafka import security as kafka_security
from cdl.kafka import topic_partitions
from cdl.liveness import WATCHDOG
from cdl.logging import configure_logging, get_logger
from cdl.ml.drift import featurize
from cdl.observability import HttpEndpoint, serve_http
from cdl.provision import provision
from cdl.registry import ModelRegistry
from cdl.store import ObjectStore
from cdl.v1 import events_pb2
from services.monitor import offsets
from services.monitor.drift import DriftTracker, WindowTest
from services.monitor.health import HealthWindow, window_key, window_model, window_start
from services.monitor.join import (
    Outcome,
    PendingLabel,
    Served,
    inputs_rows,
    parse_route,
    route_labels,
    route_logged,
    route_outcomes,
    route_served,
    training_record,
)
from services.monitor.settings import MonitorSettings
from services.monitor.versions import VersionCatalog, VersionInfo

__all__ = ["Monitor", "main"]

log = get_logger(__name__)

EVENTS = Counter("cdl_monitor_events_total", "Events the monitor read, by topic and outcome", ["topic", "outcome"])
FEEDBACK = Counter(
    "cdl_monitor_feedback_total",
    "Labels for served requests: joined, waiting (before their request), unmatched (expired unjoined), skipped",
    ["outcome"],
)
JOINS = Counter("cdl_monitor_joins_total", "Labels joined to served requests", ["model"])
EXPIRED = Counter("cdl_monitor_expired_total", "Served requests dropped unlabelled after join_ttl_s")
WINDOWS = Counter("cdl_monitor_windows_total", "Health windows published to model.health", ["model"])
DRIFT_TESTS = Counter("cdl_monitor_drift_tests_total", "Drift tests of served-input windows", ["model", "over"])
ALERTS = Counter("cdl_monitor_drift_alerts_total", "drift.detected published", ["model"])
RECORDS = Counter("cdl_monitor_training_records_total", "Labelled served requests sent to data.raw", ["dataset"])
LAG = Gauge("cdl_monitor_lag", "Records behind the end of each input partition", ["topic", "partition"])
OPEN = Gauge("cdl_monitor_open_entries", "Entries of the monitor's tables", ["table"])
ROUTED = Counter("cdl_monitor_routed_total", "Records sent to another member on the route topic, by kind", ["kind"])
HELD = Gauge("cdl_monitor_partitions_held", "Partitions this member holds (of its inputs, route topic and tables)")

#: model versions whose drift trackers are kept in memory (the oldest go first)
_MAX_VERSIONS = 64


class _Table(faust.Table[str, bytes]):
    """A faust table whose changelog partition is a function of the key (``partition_of``: the
    partition of the model or request id the entry belongs to), not the partition of the event
    being handled: timers write entries too, and a member writes entries of every partition it
    holds. After each recovery the entries of partitions this member no longer holds are dropped
    from memory (faust drops only those it read from the changelog) and ``on_recovered`` is told
    the partitions it holds."""

    def __init__(
        self,
        app: Any,
        *,
        partition_of: Callable[[str], int],
        on_recovered: Callable[[set[int]], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._partition_of = partition_of
        self._on_recovered = on_recovered

    def partition_for_key(self, key: Any) -> int:
        return self._partition_of(str(key))

    async def on_recovery_completed(self, active_tps: set[Any], standby_tps: set[Any]) -> None:
        await super().on_recovery_completed(active_tps, standby_tps)
        held = {tp.partition for tp in active_tps}
        data = self.data.data  # the memory store's dict
        for key in [k for k in data if self._partition_of(str(k)) not in held]:
            del data[key]
        self._on_recovered(held)


def _headers(message: Any) -> Headers:
    raw = getattr(message, "headers", None) or []
    if isinstance(raw, dict):
        return list(raw.items())
    return list(raw)


class Monitor:
    """The Faust app and its state; :meth:`run` blocks until SIGTERM/SIGINT."""

    def __init__(self, settings: MonitorSettings) -> None:
        self.settings = s = settings
        self.source = source_name("monitor")
        tracing.setup("monitor", settings)
        self.store = ObjectStore.from_settings(s)
        self.catalog = VersionCatalog(
            ModelRegistry(self.store), window=s.drift_window, alpha=s.drift_alpha, draws=s.drift_draws, seed=s.seed
        )
        self.route_topic = f"{s.group_id}-route"
        self.partitions = self._ensure_topics()
        offsets.install()  # a rebalance re-reads from the committed offsets, 0 and none included
        datadir = Path(s.state_dir) / "monitor" / "faust"
        datadir.mkdir(parents=True, exist_ok=True)
        self.app = faust.App(
            s.group_id,
            broker=f"kafka://{s.kafka_bootstrap.split(',')[0]}",
            broker_credentials=kafka_security.current(s.kafka_bootstrap).faust_credentials(),  # set by main
            store="memory://",
            datadir=str(datadir),
            topic_partitions=self.partitions,
            topic_replication_factor=1,
            web_enabled=False,
            consumer_auto_offset_reset="earliest",
            processing_guarantee="at_least_once",
            producer_acks=-1,
            broker_commit_every=500,
            broker_commit_interval=1.0,
            broker_session_timeout=s.session_timeout_s,
            broker_heartbeat_interval=min(3.0, s.session_timeout_s / 4),
            stream_wait_empty=False,
            # no standby copies of the tables: a member keeps only the partitions it holds (one that
            # takes a partition over reads its changelog, compacted, from the start)
            table_standby_replicas=0,
        )
        offsets.keep_fetched_on_resume(self.app.flow_control)
        raw = {"key_type": str, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
        self.logged = self.app.topic(s.logged_topic, **raw)  # type: ignore[arg-type]
        self.feedback = self.app.topic(s.feedback_topic, **raw)  # type: ignore[arg-type]
        self.out_health = self.app.topic(s.health_topic, **raw)  # type: ignore[arg-type]
        self.out_drift = self.app.topic(s.drift_topic, **raw)  # type: ignore[arg-type]
        self.out_raw = self.app.topic(s.raw_topic, **raw)  # type: ignore[arg-type]
        self.route = self.app.topic(self.route_topic, **raw)  # type: ignore[arg-type]
        #: the partitions this member holds (set when a rebalance's recovery completed, emptied
        #: when partitions are revoked): what it keeps; the rest is routed to the others
        self._held: set[int] = set()

        def table(name: str, key_of: Callable[[str], str], recovered: Callable[[], None]) -> Any:
            def on_recovered(held: set[int]) -> None:
                self._held = held
                HELD.set(len(held))
                recovered()

            # faust takes a table's serializers from key_type/value_type (not from a schema): bytes
            # values are raw both ways, so what recovery reads back is what was written. (The
            # names are not the one-process monitor's: those tables' changelogs were partitioned
            # by Kafka's partitioner, not by model or request id.)
            return self.app.tables.add(
                _Table(
                    self.app,
                    name=name,
                    partitions=self.partitions,
                    key_type=str,
                    value_type=bytes,
                    beacon=self.app.tables.beacon,
                    partition_of=lambda key: self._part(key_of(key)),
                    on_recovered=on_recovered,
                )
            )

        def request_id(key: str) -> str:
            return key

        def drift_model(key: str) -> str:
            return key.rsplit("/", 1)[0]

        self.served = table("served-by-request", request_id, self._served_recovered)
        self.pending = table("pending-by-request", request_id, self._pending_recovered)
        self.health = table("health-by-model", window_model, self._health_recovered)
        self.drift = table("drift-by-model", drift_model, self._drift_recovered)
        self._trackers: dict[tuple[str, int], DriftTracker] = {}
        #: the open health windows: the one copy the handlers change (the table is written from
        #: it every ``flush_s``, and read back into it after a recovery)
        self._windows: dict[str, HealthWindow] = {}
        self._dirty: set[str] = set()
        #: (time, request id) of served and pending entries in arrival order: what expires first
        self._served_order: deque[tuple[float, str]] = deque()
        self._pending_order: deque[tuple[float, str]] = deque()
        self._offsets: dict[tuple[str, int], int] = {}
        # the counters of inference.logged's outcomes (a label look-up per event costs)
        self._logged_ok = EVENTS.labels(s.logged_topic, "ok")
        self._logged_failed = EVENTS.labels(s.logged_topic, "failed")
        self._logged_ignored = EVENTS.labels(s.logged_topic, "ignored")
        self._logged_undecodable = EVENTS.labels(s.logged_topic, "undecodable")
        self._done_at_last_look = -1
        self._ready = threading.Event()
        self.http: HttpEndpoint | None = None
        self._wire()

    # ------------------------------------------------------------------ set-up
    def _ensure_topics(self) -> int:
        s = self.settings
        want = {s.logged_topic: 3, s.feedback_topic: 3, s.health_topic: 3, s.drift_topic: 3, s.raw_topic: 3}
        provision(s.kafka_bootstrap, None, want)
        n = topic_partitions(s.kafka_bootstrap, s.logged_topic)
        # the route topic has the log's partitions (faust assigns partition i of both to one member)
        provision(s.kafka_bootstrap, None, {self.route_topic: n}, {self.route_topic: {"retention.ms": "86400000"}})
        route = topic_partitions(s.kafka_bootstrap, self.route_topic)
        if route != n:
            raise ConfigError(
                "the monitor's route topic must have as many partitions as the inference log",
                topic=self.route_topic,
                partitions=route,
                log_partitions=n,
            )
        return n

    def _part(self, key: str) -> int:
        """The partition ``key`` (a model, a request id) belongs to."""
        return key_partition(key, self.partitions)

    def _wire(self) -> None:
        s = self.settings

        async def on_logged(stream: Any) -> None:
            # in batches: the per-event cost (asyncio hand-offs, metric look-ups, drift rows) is
            # what limits the monitor at a gateway's full rate; each event is still acknowledged
            async for events in stream.take_events(s.batch_max, within=s.batch_within_s):
                await self._on_logged_batch(events)
                self._flush_windows()  # (before the batch's offsets can be committed)

        async def on_feedback(stream: Any) -> None:
            async for event in stream.events():
                await self._guarded(self._on_feedback, event, s.feedback_topic)

        async def on_route(stream: Any) -> None:
            async for event in stream.events():
                await self._guarded(self._on_route, event, self.route_topic)

        async def close_windows() -> None:
            if self._settled():
                self._flush_windows()
                await self._close_windows(time.time())

        async def expire() -> None:
            if self._settled():
                self._expire(time.time())

        async def lag() -> None:
            self._lag()

        async def alive() -> None:  # a blocked event loop (faust, aiokafka) stops these beats
            self._live_loop.beat()

        async def started() -> None:
            # the changelog writes of a busy table outgrow faust's default of 100 buffered messages
            self.app.producer.buffer.max_messages = 10_000
            await self.app.tables.wait_until_recovery_completed()
            self._ready.set()
            log.info("monitor ready", partitions=self.partitions, window_s=s.window_s, served=len(self._served_order))

        # (called, not used as decorators: faust's decorators are untyped)
        agent: Any = self.app.agent
        agent(self.logged, name="logged")(on_logged)
        agent(self.feedback, name="feedback")(on_feedback)
        agent(self.route, name="route")(on_route)
        timer: Any = self.app.timer
        timer(max(0.1, min(0.5, s.window_s / 5)))(close_windows)
        timer(max(1.0, min(30.0, s.join_ttl_s / 10)))(expire)
        timer(5.0)(lag)
        timer(1.0)(alive)
        task: Any = self.app.task
        task(started)
        revoked: Any = self.app.on_partitions_revoked
        revoked.connect(self._on_revoked)

    def _settled(self) -> bool:
        """Ready and not in a rebalance (the timers wait: the windows are rebuilt after it)."""
        return self._ready.is_set() and not self.app.rebalancing

    async def _on_revoked(self, sender: Any, revoked: set[Any], **_: Any) -> None:
        """Before a rebalance hands partitions on: the open windows are written to their table and
        the producer flushed, so that a member taking a partition over reads back its windows as
        they are (faust has waited for the agents' events in hand)."""
        try:
            self._held = set()
            HELD.set(0)
            self._flush_windows()
            await self.app.producer.flush()
        except Exception:
            log.exception("writing the open windows before a rebalance failed")

    # (after a rebalance's recovery, each table's entries are those of the partitions held)
    def _health_recovered(self) -> None:
        log.info("partitions held", held=sorted(self._held))
        # a deleted key's tombstone may come back as a None value: it is no entry. The table holds
        # what the windows of the partitions held so far were at the revocation, and what the
        # changelog had of those taken over
        self._windows = {k: HealthWindow.from_json(_loads(v)) for k, v in self.health.items() if v}
        self._dirty &= set(self._windows)

    def _served_recovered(self) -> None:
        self._served_order = deque(sorted((_entry_time(v) or 0.0, k) for k, v in self.served.items() if v))

    def _pending_recovered(self) -> None:
        self._pending_order = deque(sorted((_entry_time(v) or 0.0, k) for k, v in self.pending.items() if v))

    def _drift_recovered(self) -> None:
        for key in [k for k in self._trackers if self._part(k[0]) not in self._held]:
            del self._trackers[key]

    async def _route_to(self, partition: int, kind: str, values: list[bytes]) -> None:
        """Records for the member holding ``partition`` (each acknowledged before this returns)."""
        futures = [await self.route.send(key=None, value=value, partition=partition) for value in values]
        for fut in futures:
            await fut
        ROUTED.labels(kind).inc(len(values))

    async def _guarded(self, handler: Callable[[Any], Awaitable[None]], event: Any, topic: str) -> None:
        """One event through its handler; whatever it raises is logged and counted, and the stream
        goes on (a hostile record must not stop the agent)."""
        msg = event.message
        self._offsets[(msg.topic, msg.partition)] = msg.offset
        try:
            await handler(event)
            # the windows it changed go to their table now: faust flushes the producer before it
            # commits an offset, so a count is never behind a committed offset (kill -9 loses none)
            self._flush_windows()
        except Exception:
            EVENTS.labels(topic, "failed").inc()
            log.exception("monitor event failed: skipped", topic=msg.topic, partition=msg.partition, offset=msg.offset)

    # ------------------------------------------------------------------ inference.logged
    def _decode_logged(self, fevent: Any) -> list[events_pb2.InferenceLogged]:
        """The logged requests of one record (one, or the gateway's batch of a model version's),
        none (counted) when it is not one the monitor can use."""
        msg = fevent.message
        self._offsets[(msg.topic, msg.partition)] = msg.offset
        key = fevent.key.encode() if isinstance(fevent.key, str) else fevent.key
        try:
            event = decode(key, fevent.value, _headers(msg))
        except DecodeError as exc:
            self._logged_undecodable.inc()
            log.warning("inference log record skipped", error=str(exc))
            return []
        payload = event.payload
        if isinstance(payload, events_pb2.InferenceLoggedBatch):
            recs = [r for r in payload.records if r.model]
        elif isinstance(payload, events_pb2.InferenceLogged) and payload.model:
            return [payload]
        else:
            recs = []
        if (missing := len(getattr(payload, "records", [None])) - len(recs)) > 0:
            self._logged_ignored.inc(missing)
        return recs

    async def _on_logged_batch(self, fevents: list[Any]) -> None:
        """A batch of log records. A record that fails is logged, counted and skipped (a hostile
        record must not stop the agent, nor cost the others in its batch)."""
        topic = self.settings.logged_topic
        recs: list[events_pb2.InferenceLogged] = []
        for fevent in fevents:
            try:
                recs += self._decode_logged(fevent)
            except Exception:
                self._logged_failed.inc()
                log.exception("monitor event failed: skipped", topic=topic)
        await self._on_logged(recs)

    async def _on_logged(self, logged: list[events_pb2.InferenceLogged]) -> None:
        """Logged requests: those of models another member keeps go to it; of the others, each
        one's health count and join as one at a time would, its version's drift rows together."""
        topic = self.settings.logged_topic
        recs: list[events_pb2.InferenceLogged] = []
        away: dict[int, list[events_pb2.InferenceLogged]] = {}
        for rec in logged:
            p = self._part(rec.model)
            if p in self._held:
                recs.append(rec)
            else:
                away.setdefault(p, []).append(rec)
        infos: dict[tuple[str, int], VersionInfo] = {}
        for rec in recs:
            mv = (rec.model, int(rec.version))
            if mv not in infos:
                try:
                    infos[mv] = await self._info(*mv)
                except Exception:
                    self._logged_failed.inc()
                    log.exception("model version unreadable: its requests skipped", model=mv[0], version=mv[1])
        # nothing below awaits until the state is changed: the handlers never see a half-done batch
        now = time.time()
        outputs: list[tuple[Any, str, bytes]] = []
        served_away: dict[int, list[tuple[str, Served]]] = {}
        joined: dict[str, None] = {}  # (in order)
        drift_inputs: dict[tuple[str, int], list[bytes]] = {}
        windows: dict[tuple[str, int], HealthWindow] = {}
        ok_count = 0
        for rec in recs:
            mv = (rec.model, int(rec.version))
            info = infos.get(mv)
            if info is None:
                continue
            try:
                window = windows.get(mv) or windows.setdefault(mv, self._window(mv[0], mv[1], now))
                ok = rec.status in ("", "OK")
                window.served(ok, rec.latency_ms)
                ok_count += 1
                if not ok:
                    continue  # an error is health, not a join (a retried request is logged again) or drift
                served = Served.from_log(rec, now)
                if rec.request_id and (p := self._part(rec.request_id)) not in self._held:
                    served_away.setdefault(p, []).append((rec.request_id, served))  # another joins it
                elif rec.request_id:
                    # a label joined earlier in this batch is gone for the rest of it (its entry is
                    # popped once the batch's outputs were sent): a request logged twice joins once
                    waiting = None if rec.request_id in joined else self.pending.get(rec.request_id)
                    if waiting is not None:
                        outcome, record = self._join(rec.request_id, served, PendingLabel.from_bytes(waiting), info)
                        if outcome is not None:
                            outcome.count(window)  # (the model is this member's)
                        if record is not None:
                            outputs.append(record)
                        joined[rec.request_id] = None
                    else:
                        self.served[rec.request_id] = served.to_bytes()
                        self._served_order.append((now, rec.request_id))
                if served.inputs and info.test is not None:
                    drift_inputs.setdefault(mv, []).append(served.inputs)
            except Exception:
                self._logged_failed.inc()
                log.exception("monitor event failed: skipped", topic=topic, request_id=rec.request_id)
        for window in windows.values():
            self._dirty.add(window.key)
        alerts: list[tuple[VersionInfo, WindowTest]] = []
        tested: list[VersionInfo] = []
        for mv, inputs in drift_inputs.items():
            info = infos[mv]
            results = self._drift_rows(info, inputs)
            for result in results:
                windows[mv].drift(result.statistic, result.threshold)
                DRIFT_TESTS.labels(info.model, str(result.over).lower()).inc()
                if result.alert:
                    alerts.append((info, result))
            if results:
                tested.append(info)
        self._logged_ok.inc(ok_count)  # (after the drift tests: a reader of both sees them done)
        # outputs first, then the state that says they were sent: a crash in between repeats an
        # output (at least once), it never loses one
        for out_topic, out_key, value in outputs:
            await self._send_raw(out_topic, out_key, value)
        for p, away_recs in away.items():
            await self._route_to(p, "logged", route_logged(away_recs))
        for p, entries in served_away.items():
            await self._route_to(p, "served", route_served(entries))
        for request_id in joined:
            self.pending.pop(request_id, None)
        for info, result in alerts:
            await self._alert(info, result, now)
        for info in tested:  # the streak moved (after its alert went out)
            self._save_tracker(info)

    async def _info(self, model: str, version: int) -> VersionInfo:
        info = self.catalog.cached(model, version)
        if info is None:
            info = await asyncio.get_running_loop().run_in_executor(None, self.catalog.load, model, version)
        return info

    def _window(self, model: str, version: int, now: float) -> HealthWindow:
        start = window_start(now, self.settings.window_s)
        key = window_key(model, version, start)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = HealthWindow(model, version, start)
        return window

    def _tracker(self, info: VersionInfo) -> DriftTracker | None:
        if info.test is None:
            return None
        key = (info.model, info.version)
        tracker = self._trackers.get(key)
        if tracker is None:
            doc = self.drift.get(f"{info.model}/{info.version}")
            tracker = DriftTracker(info.test, self.settings.drift_persist, _loads(doc) if doc else None)
            self._trackers[key] = tracker
            while len(self._trackers) > _MAX_VERSIONS:  # the oldest versions' trackers go first
                self._trackers.pop(next(iter(self._trackers)))
        return tracker

    def _drift_rows(self, info: VersionInfo, requests: list[bytes]) -> list[WindowTest]:
        """The served requests' input rows into the version's drift tracker (in order); the tests
        of the windows they completed."""
        tracker = self._tracker(info)
        if tracker is None:
            return []
        numeric: list[np.ndarray[Any, Any]] = []
        texts: list[bytes] = []
        for request in requests:
            values = inputs_rows(request)
            if values is None:
                continue
            if isinstance(values, list):
                texts.extend(values)
            else:
                numeric.append(np.asarray(values).reshape(len(values), -1))
        results: list[WindowTest] = []
        if numeric:
            widths = {a.shape[1] for a in numeric}
            if len(widths) == 1:
                results += tracker.add(featurize(np.concatenate(numeric)))
            else:  # requests of several shapes: each as it is (the tracker skips the wrong width)
                for a in numeric:
                    results += tracker.add(featurize(a))
        if texts:
            results += tracker.add(featurize(texts))
        return results

    def _save_tracker(self, info: VersionInfo) -> None:
        tracker = self._trackers.get((info.model, info.version))
        if tracker is not None:
            self.drift[f"{info.model}/{info.version}"] = _json_doc(tracker.state())

    async def _alert(self, info: VersionInfo, result: WindowTest, now: float) -> None:
        s = self.settings
        msg = events_pb2.DriftDetected(
            model=info.model,
            version=info.version,
            test="mmd",
            statistic=result.statistic,
            threshold=result.threshold,
            window_requests=s.drift_window,
            dataset=info.dataset,
        )
        msg.window_end.FromNanoseconds(int(now * 1e9))
        attrs = {"cdl.model": info.model, "cdl.version": info.version, "cdl.statistic": result.statistic}
        with tracing.span("monitor drift alert", None, attrs):  # each alert starts a trace of its own
            traceparent = tracing.current_traceparent() or new_traceparent()
        event = Event(
            msg, source=self.source, id=f"{info.model}/v{info.version}/drift", key=info.model, traceparent=traceparent
        )
        await self._send(self.out_drift, event)
        ALERTS.labels(info.model).inc()
        log.warning(
            "input drift detected",
            model=info.model,
            version=info.version,
            statistic=round(result.statistic, 5),
            threshold=round(result.threshold, 5),
            windows=result.windows,
        )

    # ------------------------------------------------------------------ data.feedback
    async def _on_feedback(self, fevent: Any) -> None:
        topic = self.settings.feedback_topic
        try:
            fb = parse_feedback(fevent.value, header_dict(_headers(fevent.message)).get("content-type", ""))
        except InvalidInputError:
            EVENTS.labels(topic, "invalid").inc()  # ingest dead-letters it with its reason
            return
        if not fb.request_id:
            FEEDBACK.labels("skipped").inc()  # a record's label: ingest's
            return
        EVENTS.labels(topic, "ok").inc()
        await self._on_labels([(fb.request_id, PendingLabel(fb.label, fb.dataset, time.time()))])

    async def _on_labels(self, labels: list[tuple[str, PendingLabel]]) -> None:
        """Labels for served requests: those whose ids another member joins go to it; the others
        are joined to their request, or wait for it."""
        away: dict[int, list[tuple[str, PendingLabel]]] = {}
        for request_id, label in labels:
            if (p := self._part(request_id)) not in self._held:
                away.setdefault(p, []).append((request_id, label))
                continue
            doc = self.served.get(request_id)
            if doc is None:
                now = time.time()
                self.pending[request_id] = PendingLabel(label.label, label.dataset, now).to_bytes()
                self._pending_order.append((now, request_id))
                FEEDBACK.labels("waiting").inc()
                continue
            served = Served.from_bytes(doc)
            info = await self._info(served.model, served.version)
            outcome, record = self._join(request_id, served, label, info)
            outcomes = self._count([outcome] if outcome is not None else [], time.time())
            if record is not None:
                await self._send_raw(*record)
            await self._route_outcomes(outcomes)
            self.served.pop(request_id, None)  # after its record was acknowledged
        for p, entries in away.items():
            await self._route_to(p, "labels", route_labels(entries))

    async def _on_served(self, entries: list[tuple[str, Served]]) -> None:
        """Served requests whose ids this member joins (another keeps their models): each joined
        to its waiting label, or kept until its label comes."""
        infos: dict[tuple[str, int], VersionInfo] = {}
        for _, served in entries:
            mv = (served.model, served.version)
            if mv not in infos:
                infos[mv] = await self._info(*mv)
        # nothing below awaits until the state is changed
        now = time.time()
        away: dict[int, list[tuple[str, Served]]] = {}
        outcomes: list[Outcome] = []
        outputs: list[tuple[Any, str, bytes]] = []
        joined: dict[str, None] = {}
        for request_id, served in entries:
            if (p := self._part(request_id)) not in self._held:  # (a rebalance since it was sent)
                away.setdefault(p, []).append((request_id, served))
                continue
            waiting = None if request_id in joined else self.pending.get(request_id)
            if waiting is None:
                self.served[request_id] = replace(served, time=now).to_bytes()
                self._served_order.append((now, request_id))
                continue
            outcome, record = self._join(
                request_id, served, PendingLabel.from_bytes(waiting), infos[served.model, served.version]
            )
            if outcome is not None:
                outcomes.append(outcome)
            if record is not None:
                outputs.append(record)
            joined[request_id] = None
        away_outcomes = self._count(outcomes, now)
        for out_topic, out_key, value in outputs:
            await self._send_raw(out_topic, out_key, value)
        await self._route_outcomes(away_outcomes)
        for p, away_entries in away.items():
            await self._route_to(p, "served", route_served(away_entries))
        for request_id in joined:
            self.pending.pop(request_id, None)

    def _count(self, outcomes: list[Outcome], now: float) -> dict[int, list[Outcome]]:
        """Joined labels into the health windows of the models this member keeps; the others', by
        the partition of their model (for :meth:`_route_outcomes`)."""
        away: dict[int, list[Outcome]] = {}
        for outcome in outcomes:
            if (p := self._part(outcome.model)) in self._held:
                window = self._window(outcome.model, outcome.version, now)
                outcome.count(window)
                self._dirty.add(window.key)
            else:
                away.setdefault(p, []).append(outcome)
        return away

    async def _route_outcomes(self, away: dict[int, list[Outcome]]) -> None:
        for p, outcomes in away.items():
            await self._route_to(p, "outcomes", route_outcomes(outcomes))

    async def _on_route(self, fevent: Any) -> None:
        """A record another member routed here (or this one, before a rebalance)."""
        try:
            routed = parse_route(fevent.value)
        except DecodeError as exc:
            EVENTS.labels(self.route_topic, "undecodable").inc()
            log.warning("route record skipped", error=str(exc))
            return
        EVENTS.labels(self.route_topic, "ok").inc()
        if routed.logged:
            await self._on_logged(routed.logged)
        if routed.served:
            await self._on_served(routed.served)
        if routed.labels:
            await self._on_labels(routed.labels)
        if routed.outcomes:
            await self._route_outcomes(self._count(routed.outcomes, time.time()))

    def _join(
        self, request_id: str, served: Served, label: PendingLabel, info: VersionInfo
    ) -> tuple[Outcome | None, tuple[Any, str, bytes] | None]:
        """What a label says of what was served (None when it cannot be scored), and the training
        record to send, if any."""
        outcome: Outcome | None = None
        if info.task == Task.REGRESSION.value:
            try:
                target = float(label.label)
            except ValueError:
                target = math.nan
            if math.isnan(target) or math.isnan(served.value):  # ingest dead-letters a bad label
                FEEDBACK.labels("unscorable").inc()
            else:
                outcome = Outcome(served.model, served.version, None, served.value, target)
        else:
            outcome = Outcome(served.model, served.version, served.correct(label.label, list(info.labels)))
        FEEDBACK.labels("joined").inc()
        JOINS.labels(served.model).inc()
        if not self.settings.training_records:
            return outcome, None
        dataset = info.dataset or label.dataset
        record = training_record(served, request_id, label.label, dataset)
        if record is None:
            return outcome, None
        RECORDS.labels(dataset).inc()
        return outcome, (self.out_raw, request_id, record)

    # ------------------------------------------------------------------ timers
    def _flush_windows(self) -> None:
        """Write the windows changed since the last flush to the table (its changelog)."""
        for key in self._dirty:
            window = self._windows.get(key)
            if window is not None:
                self.health[key] = _json(window)
        self._dirty.clear()

    async def _close_windows(self, now: float) -> None:
        s = self.settings
        for key, window in list(self._windows.items()):
            if window.start + s.window_s + s.grace_s > now:
                continue
            event = Event(
                window.event(s.window_s),
                source=self.source,
                id=f"{window.model}/v{window.version}/health/{int(window.start * 1000)}",
                key=window.model,
            )
            await self._send(self.out_health, event)
            del self._windows[key]
            self.health.pop(key, None)
            WINDOWS.labels(window.model).inc()

    def _expire(self, now: float) -> None:
        s = self.settings
        cutoff = now - s.join_ttl_s
        for order, table, on_drop in (
            (self._served_order, self.served, EXPIRED.inc),
            (self._pending_order, self.pending, FEEDBACK.labels("unmatched").inc),
        ):
            # the oldest go when they are past their time, or when the table holds too many
            while order and (order[0][0] < cutoff or len(order) > s.join_max_entries):
                t, key = order.popleft()
                doc = table.get(key)
                if doc is None:
                    continue  # joined meanwhile
                entry_time = _entry_time(doc)
                if entry_time is not None and entry_time > t:
                    continue  # the same id again since: its own entry is further on
                table.pop(key, None)
                on_drop()
        OPEN.labels("served").set(len(self.served))
        OPEN.labels("pending").set(len(self.pending))
        OPEN.labels("health").set(len(self._windows))

    def _lag(self) -> None:
        consumer = self.app.consumer
        assignment = consumer.assignment()
        # a partition that left this instance forgets its offset: when it comes back, its records
        # count as waiting only once one of them was handled here again
        for gone in set(self._offsets) - {(tp.topic, tp.partition) for tp in assignment}:
            del self._offsets[gone]
        behind = 0
        for tp in assignment:
            if tp.topic not in (self.settings.logged_topic, self.settings.feedback_topic, self.route_topic):
                continue
            high = consumer.highwater(tp)
            done = self._offsets.get((tp.topic, tp.partition))
            if high is not None:
                lag = max(0, int(high) - (-1 if done is None else done) - 1)
                LAG.labels(tp.topic, str(tp.partition)).set(lag)
                if done is not None:
                    behind += lag
        # the consumer is stuck when records wait behind ones it handled and none was handled since
        # the last look; while faust recovers tables or rebalances, waiting is expected
        done_now = sum(self._offsets.values())
        app: Any = self.app
        busy = bool(app.rebalancing) or bool(getattr(app, "in_recovery", False))
        waiting_is_expected = not self._ready.is_set() or busy
        if waiting_is_expected or not behind or done_now != self._done_at_last_look:
            self._live_consume.beat()
        self._done_at_last_look = done_now

    async def _send(self, topic: Any, event: Event) -> None:
        key, value, headers = encode(event)
        fut = await topic.send(key=key.decode() if key else None, value=value, headers=headers)
        await fut

    async def _send_raw(self, topic: Any, key: str, value: bytes) -> None:
        fut = await topic.send(key=key, value=value)
        await fut

    # ------------------------------------------------------------------ running
    def _health(self) -> tuple[bool, dict[str, Any]]:
        return self._ready.is_set(), {
            "partitions": self.partitions,
            "held": sorted(self._held),
            "trackers": len(self._trackers),
        }

    def run(self) -> None:
        # the one liveness rule (cdl.liveness): faust's event loop and its consumer each report progress
        deadline = self.settings.progress_deadline_s
        self._live_loop = WATCHDOG.track("monitor/event-loop", deadline)
        self._live_consume = WATCHDOG.track("monitor/consume", deadline)
        self.http = serve_http(self.settings.metrics_port, health=self._health, host=self.settings.metrics_host)
        log.info("monitor started", metrics_port=self.http.port)
        worker = _Worker(self.app, loglevel="WARN", redirect_stdouts=False, quiet=True)
        try:
            worker.execute_from_commandline()
        finally:
            WATCHDOG.untrack(self._live_loop)
            WATCHDOG.untrack(self._live_consume)
            self._ready.clear()
            self.http.close()


class _Worker(faust.Worker):
    """faust's worker without its logging set-up: cdl's structured logs stay as they are
    (faust's own loggers at WARNING: it logs every service start and stop at INFO), and no
    terminal spinner."""

    def _setup_logging(self) -> None:
        self.spinner = None
        for name in ("faust", "mode", "aiokafka"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _loads(doc: bytes) -> dict[str, Any]:
    out: dict[str, Any] = orjson.loads(doc)
    return out


def _json(window: HealthWindow) -> bytes:
    return _json_doc(window.to_json())


def _json_doc(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)


def _entry_time(doc: bytes) -> float | None:
    try:
        t = _loads(doc).get("t")
    except ValueError:
        return None
    return float(t) if isinstance(t, int | float) else None


def main() -> None:
    settings = MonitorSettings()
    configure_logging("monitor", settings.log_level)
    settings.secure_process("monitor")
    Monitor(settings).run()
