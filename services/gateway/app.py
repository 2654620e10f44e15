"""Wiring of the gateway: clients are built here and passed in.

Three kinds of work, each on its own thread of control:

- the **hot path** (``server.InferenceService``) on the asyncio event loop of
  the ``grpc.aio`` server, with ``ModelAdmin`` and the health service beside it;
- the **rollout worker**, one thread that carries out what the
  :class:`~services.gateway.rollout.RolloutManager` decides, in order:
  publishes ``model.deployed``, writes ``serving.json`` on promotion, and
  makes the Triton servers load, warm or drop versions (``control``), then
  tells the manager how it went (which may decide more);
- the **event loop over ``model.compressed``**, a :class:`~cdl.kafka.JobLoop`
  in a thread: a job begins a rollout (``RolloutManager.begin``, which saves
  ``rollout.json`` before the candidate may take traffic).

A timer on the event loop calls ``RolloutManager.tick`` every 100 ms (step up,
promote, roll back).

Several instances (docs/gateway.md, "Replicas"): the loop's group is
``group_id`` over ``model.compressed`` and ``gateway.commands``; the member
holding a model's partition is its rollout's single writer
(:class:`~services.gateway.rollout.replicas.Ownership`): on an assignment it
resumes those models from their ``rollout.json`` (``RolloutManager.restore``),
on a revocation it stops driving them (``release``). Every instance also reads,
with a consumer of its own (no group, from the topics' ends at start, taken
before the documents are read), ``model.deployed`` -- on each transition of a
model another instance drives it reads that model's ``rollout.json`` and routes
as it says (``RolloutManager.follow``) --, ``model.health`` (each owner takes
its models' windows) and the results of the admin calls it handed to owners.
At start every model is followed from its document until the group assigns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import shutil
import signal
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import TopicPartition
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cdl import tracing
from cdl.auth import ApiKeys, KeyBudget, KeysFile
from cdl.dedupe import SqliteProcessedStore
from cdl.errors import CdlError, DecodeError, UntrustedModelError
from cdl.events import Event, OutRecord, Topics, decode, new_traceparent, source_name
from cdl.kafka import JobLoop, Producer, RecordContext, consumer_conf, topic_partitions
from cdl.logging import configure_logging, get_logger
from cdl.observability import HttpEndpoint, serve_http
from cdl.provision import provision
from cdl.rpc import add_health, add_port
from cdl.settings import transactional_id
from cdl.signing import TrustedKeys
from cdl.store import ObjectStore
from cdl.store_access import store_buckets
from cdl.v1 import admin_pb2_grpc, events_pb2
from services.gateway.dataplane import lane as lane_module
from services.gateway.dataplane.backends import TritonPool
from services.gateway.dataplane.lane import NativeLane
from services.gateway.dataplane.rest import RestApi
from services.gateway.dataplane.server import InferenceService
from services.gateway.inference_log import LOG_DROPPED, InferenceLog, flush_unacknowledged
from services.gateway.rollout.admin import ModelAdminService
from services.gateway.rollout.control import TritonControl
from services.gateway.rollout.machine import Action, RolloutManager, RolloutPolicy, RolloutState, Transition
from services.gateway.rollout.replicas import Ownership, Replies
from services.gateway.rollout.state import RolloutStore
from services.gateway.routing import RoutingTable
from services.gateway.settings import GatewaySettings

__all__ = ["GatewayApp", "main"]

log = get_logger(__name__)

TICK_S = 0.1
#: how often an idle manager (no rollout under way) is asked whether it has work; anything that
#: hands the worker transitions wakes the ticks at once (:meth:`GatewayApp.execute`)
IDLE_TICK_S = 1.0
#: how often the servers' loaded versions are compared with what the manager wants
RECONCILE_S = 5.0
#: followed models with a rollout under way are read again every follow_refresh_s, all of them
#: every this many times that
FOLLOW_ALL_EVERY = 12


class _RolloutCollector(Collector):
    """``cdl_gateway_rollout_traffic{model,version,state}``: each version's share, read at scrape time."""

    def __init__(self, manager: RolloutManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "cdl_gateway_rollout_traffic",
            "Share of live requests per model version",
            labels=["model", "version", "state"],
        )
        for st in self._manager.models():
            for v in st.versions:
                g.add_metric([st.model, str(v.version), v.state.value.lower()], v.traffic)
        yield g


class GatewayApp:
    """The gateway process: serving, rollouts, the Kafka loop and Triton control."""

    def __init__(self, settings: GatewaySettings) -> None:
        if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
            raise CdlError("TLS needs both CDL_GATEWAY_TLS_CERT_FILE and CDL_GATEWAY_TLS_KEY_FILE")
        if not settings.triton_grpc:
            raise CdlError("the gateway needs at least one Triton server (CDL_GATEWAY_TRITON_GRPC or the stack)")
        self.settings = settings
        self.source = source_name("gateway")
        tracing.setup("gateway", settings)
        self.store = ObjectStore.from_settings(settings)
        self.table = RoutingTable()
        self.rollouts = RolloutStore(self.store, settings.group_id)  # (another group's documents: not read)
        self.manager = RolloutManager(
            self.table, RolloutPolicy.from_settings(settings), time.monotonic, persist=self._persist
        )
        trusted = TrustedKeys(settings.trusted_keys)
        if not trusted:
            log.warning("model signatures are not checked: set trusted_keys (CDL_GATEWAY_TRUSTED_KEYS)")
        self.control = TritonControl(settings.triton_grpc, self.store, settings.load_timeout_s, trusted)
        # delivery reports for failures only: the log's per-record callbacks were a Python call per
        # request in the poll (every cdl producer counts failures only)
        self.producer = Producer(
            settings.kafka_bootstrap, client_id="cdl-gateway", **{"delivery.report.only.error": True}
        )
        # the log's records are built and produced by the log's thread, in rounds every
        # log_linger_ms, with a producer of its own (model.deployed does not wait behind a round)
        self.log_producer: Producer | None = (
            Producer(settings.kafka_bootstrap, client_id="cdl-gateway-log", **{"delivery.report.only.error": True})
            if settings.log_sample > 0
            else None
        )
        self.log = InferenceLog(
            self.log_producer,
            settings.logged_topic,
            sample=settings.log_sample,
            inputs_max_bytes=settings.log_inputs_max_bytes,
            queue_size=settings.log_queue,
            source=self.source,
            interval_s=settings.log_linger_ms / 1000,
            records_per_batch=settings.log_batch,
        )
        infer_keys, admin_keys = settings.key_digests()
        self.keys = ApiKeys(infer_keys, admin_keys)
        self._keys_stop = threading.Event()
        if self.keys.open and not admin_keys:
            log.warning("the gateway is open: no API key is needed for inference or ModelAdmin (api_key_hashes)")
        self.pool = TritonPool(
            settings.triton_grpc,
            settings.max_message_bytes,
            health_interval_s=settings.health_interval_s,
            health_misses=settings.health_misses,
            on_ready=self._server_ready,
        )
        #: the models whose rollouts this instance writes (its partitions of the group's topics)
        self.ownership = Ownership()
        #: this process among the group's instances: the results of the admin calls it hands over
        #: are addressed to it
        self.replica_id = f"{settings.instance or os.uname().nodename}-{uuid.uuid4().hex[:8]}"
        self.replies: Replies[events_pb2.GatewayCommandResult] = Replies()
        self.loop = JobLoop(
            bootstrap=settings.kafka_bootstrap,
            group_id=settings.group_id,
            topics=[settings.compressed_topic, settings.commands_topic],
            transactional_id=transactional_id(settings.group_id, settings.instance),
            job=self._on_event,
            key=lambda e: e.id,
            deadletter_topic=settings.deadletter_topic,
            processed=SqliteProcessedStore(Path(settings.state_dir) / "gateway" / f"{settings.group_id}.sqlite"),
            policy=settings.failure_policy(),
            on_assigned=self._assigned,
            on_revoked=self._revoked,
        )
        self.admin = ModelAdminService(
            self.manager,
            self.execute,
            self.keys,
            forward=self._hand_over,
            forward_timeout_s=settings.admin_forward_timeout_s,
        )
        self._work: queue.Queue[Transition | None] = queue.Queue()
        #: the traceparent of each version's rollout (its model.compressed span), newest 1,000
        self._traces: dict[tuple[str, int], str] = {}
        self._worker = threading.Thread(target=self._run_worker, name="cdl-gateway-rollouts", daemon=True)
        self._kafka = threading.Thread(target=self._run_loop, name="cdl-gateway-events", daemon=True)
        self._follow_stop = threading.Event()
        self._follower: threading.Thread | None = None
        self.server: grpc.aio.Server | None = None
        self.lane: NativeLane | None = None
        self._socket_dir = ""
        self.http: HttpEndpoint | None = None
        self.port = 0
        self.rest: RestApi | None = None
        self.http_port = -1
        self._ready = threading.Event()
        self._stopping = asyncio.Event()
        self._tick_wake = asyncio.Event()  # set by execute() and on stopping
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        REGISTRY.register(_RolloutCollector(self.manager))

    def _persist(self, model: str, doc: Mapping[str, Any]) -> None:
        """Save a rollout document (``rollout.json``)."""
        self.rollouts.save(model, doc)

    # ------------------------------------------------------------------ rollouts
    def execute(self, transitions: Sequence[Transition], wake: bool = True) -> None:
        """Hand transitions to the rollout worker (in order); where there are some, the ticks wake
        (from any thread: the manager has work now), unless ``wake`` is False (the ticks' own)."""
        for t in transitions:
            self._work.put(t)
        loop = self._aio_loop
        if transitions and wake and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # (closing)
                loop.call_soon_threadsafe(self._tick_wake.set)

    def _run_worker(self) -> None:
        while (t := self._work.get()) is not None:
            try:
                self.execute(self._carry_out(t))
            except Exception:
                log.exception("rollout step failed", model=t.model, version=t.version, action=t.action.value)

    def _carry_out(self, t: Transition) -> list[Transition]:
        step = (t.state.value if t.state is not None else t.action.value).lower()
        attrs = {"cdl.model": t.model, "cdl.version": t.version, "cdl.traffic": t.traffic, "cdl.reason": t.reason}
        with tracing.span(f"gateway rollout {step}", self._traces.get((t.model, t.version)), attrs):
            return self._carry_out_traced(t)

    def _carry_out_traced(self, t: Transition) -> list[Transition]:
        if t.state is not None:
            if t.state is RolloutState.PROMOTED:
                self.rollouts.set_serving(t.model, t.version)  # what the trainer warm-starts from
            self._publish(t)  # decided (and saved) while this instance drove the model
        if not self.manager.owns(t.model):
            # handed to another instance since: its writer makes Triton hold what it wants now
            if t.action is not Action.NONE:
                log.info("rollout step left to the model's new writer", model=t.model, action=t.action.value)
            return []
        # transitions reach this worker from two threads (the event loop's tick, the Kafka job):
        # one computed earlier may arrive after a later one, so a version the manager wants *now*
        # is never dropped, and a SYNC loads what the manager wants when it is carried out (read
        # with the model held: a server joining loads it too, _server_ready)
        if t.action is Action.LOAD:
            try:
                with self.control.holding(t.model):
                    wanted = self.manager.wanted_versions(t.model)
                    self.control.load(t.model, tuple(sorted({*t.load, *wanted})), fallback=t.fallback)
            except CdlError as exc:
                return self.manager.loaded(t.model, t.version, False, str(exc))
            return self.manager.loaded(t.model, t.version, True)
        if t.action is Action.WARM:
            try:
                self.control.warm(t.model, t.version, self.settings.warmup_requests)
            except CdlError as exc:
                return self.manager.warmed(t.model, t.version, False, f"warm-up failed: {exc}")
            return self.manager.warmed(t.model, t.version, True)
        if t.action is Action.SYNC:
            with self.control.holding(t.model):
                wanted = self.manager.wanted_versions(t.model)
                try:
                    self.control.load(t.model, wanted)
                except CdlError as exc:
                    log.warning("dropping versions from Triton failed", model=t.model, versions=wanted, error=str(exc))
        return []

    def _publish(self, t: Transition) -> None:
        assert t.state is not None
        msg = events_pb2.ModelDeployed(
            model=t.model,
            version=t.version,
            state=events_pb2.RolloutState.Value(t.state.proto_name),
            reason=t.reason,
            traffic_fraction=t.traffic,
            previous_version=t.previous_version,
            actor=t.actor or "gateway",
        )
        event = Event(
            msg, source=self.source, key=t.model, traceparent=tracing.current_traceparent() or new_traceparent()
        )
        self.producer.send(self.settings.deployed_topic, event)
        self.producer.poll(0)
        log.info("rollout", model=t.model, version=t.version, state=t.state.value, traffic=t.traffic, reason=t.reason)

    async def _server_ready(self, endpoint: str) -> bool:
        """A Triton server turned ready (at start, or back after a restart, when in explicit
        mode it holds nothing): it takes requests once it holds what every model serves.

        Every instance does it for every model (idempotent: a version held already is not loaded
        again). The models this instance drives get exactly what it wants; the others, what
        their writers' documents want, added to what the server holds (a follower never
        unloads: its writer's view may be newer than its own)."""

        def load_one(model: str, hint: tuple[int, ...]) -> None:
            # what the model wants and what the server holds are read with the model held, so a
            # rollout step loading a candidate meanwhile is never undone with what was wanted before
            with self.control.holding(model):
                versions = self.manager.wanted_versions(model)
                if not versions:
                    return
                held = set(hint)  # (the index read before the lock: checked now unless it already matches)
                if held != set(versions):
                    held = set(self.control.loaded_versions(model, servers=[endpoint])[endpoint])
                if self.manager.owns(model):
                    if held == set(versions):
                        return
                elif held >= set(versions):
                    return
                else:
                    versions = tuple(sorted(held | set(versions)))
                self.control.load(model, versions, servers=[endpoint])

        def load_all() -> None:
            on_server = self.control.held(endpoint)
            for st in self.manager.models():
                try:
                    load_one(st.model, on_server.get(st.model, ()))
                except UntrustedModelError as exc:  # never loaded; the server joins for the other models
                    log.error("versions fail their signature check and are not loaded", model=st.model, error=str(exc))

        try:
            await asyncio.to_thread(load_all)
        except CdlError as exc:
            log.warning("a Triton server is not ready for the gateway's models yet", server=endpoint, error=str(exc))
            return False
        models = len(self.manager.models())
        if models:
            log.info("Triton server joins with every serving version loaded", server=endpoint, models=models)
        return True

    # ------------------------------------------------------------------ replicas
    def _assigned(self, partitions: list[tuple[str, int]]) -> None:
        """The group gave this instance partitions (in the loop's thread, before it consumes):
        it becomes the writer of their models, resumed from their documents."""
        s = self.settings
        mine = [p for topic, p in partitions if topic == s.compressed_topic]
        count = topic_partitions(s.kafka_bootstrap, s.compressed_topic)
        commands = topic_partitions(s.kafka_bootstrap, s.commands_topic)
        if commands != count:  # admin calls would reach another instance than the model's writer
            log.error(
                "the commands topic must have the partitions of model.compressed",
                commands_topic=s.commands_topic,
                partitions=commands,
                compressed_partitions=count,
            )
        self.ownership.assign(mine, count)
        taken = self.rollouts.load_all(self.ownership.owns)
        self.execute(self.manager.restore(taken))
        log.info("rollouts written here", partitions=sorted(self.ownership.partitions), models=sorted(taken))

    def _revoked(self, partitions: list[tuple[str, int]]) -> None:
        """Partitions went to another instance (or were lost): their models' rollouts are driven
        there from now on; this one saves what it has not saved yet and follows them."""
        gone = [p for topic, p in partitions if topic == self.settings.compressed_topic]
        self.ownership.revoke(gone)
        self.manager.release([m for m in self.manager.owned() if not self.ownership.owns(m)])

    def _hand_over(
        self, model: str, method: str, request: bytes, actor: str, timeout_s: float
    ) -> Future[events_pb2.GatewayCommandResult]:
        """Send a ModelAdmin change to the instance that owns ``model`` (gateway.commands, keyed by
        model: the partition its group member holds); the future is its result."""
        command_id = uuid.uuid4().hex
        fut = self.replies.expect(command_id)
        fut.add_done_callback(lambda f: self.replies.forget(command_id) if f.cancelled() else None)
        command = events_pb2.GatewayCommand(
            command_id=command_id,
            model=model,
            method=method,
            request=request,
            actor=actor,
            reply_to=self.replica_id,
            group=self.settings.group_id,
            expires_unix_ms=int((time.time() + timeout_s) * 1000),
        )
        event = Event(
            command, source=self.source, key=model, traceparent=tracing.current_traceparent() or new_traceparent()
        )
        self.producer.send(self.settings.commands_topic, event)
        self.producer.poll(0)
        log.info("admin call handed to the model's writer", model=model, method=method, command=command_id)
        return fut

    def _follow_offsets(self) -> list[TopicPartition]:
        """Where this instance's own reading of model.deployed, model.health and the commands'
        results starts: each partition's end now (taken before the documents are read, so no
        transition after them is missed)."""
        s = self.settings
        consumer = KafkaConsumer(consumer_conf(s.kafka_bootstrap, f"{s.group_id}-follower"))
        try:
            out: list[TopicPartition] = []
            for topic in dict.fromkeys((s.deployed_topic, s.health_topic, s.commands_topic)):
                meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
                if meta is None or meta.error is not None:
                    raise CdlError("topic not found", topic=topic)
                for p in sorted(meta.partitions):
                    _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                    out.append(TopicPartition(topic, p, high))
            return out
        finally:
            consumer.close()

    def _follow(self, model: str) -> None:
        """Route ``model`` as its writer's document says now (unless this instance writes it)."""
        if self.manager.owns(model):
            return
        try:
            doc = self.rollouts.load(model)
        except CdlError as exc:
            log.warning("rollout state of a followed model not read", model=model, error=str(exc))
            return
        if self.manager.follow(model, doc):
            route = self.table.get(model)
            log.info("following", model=model, route=str(route) if route else None)

    def _run_follower(self, start: list[TopicPartition]) -> None:
        s = self.settings
        consumer = KafkaConsumer(consumer_conf(s.kafka_bootstrap, f"{s.group_id}-follower"))
        try:
            consumer.assign(start)
            refreshed = all_refreshed = time.monotonic()
            while not self._follow_stop.is_set():
                changed: set[str] = set()
                # (librdkafka's consume(n, t) waits the whole t unless n came: wait for one only)
                msgs = consumer.consume(1, 0.2)
                if msgs:
                    msgs += consumer.consume(199, 0)
                for msg in msgs:
                    if msg.error() is not None:
                        log.warning("reading rollouts", error=str(msg.error()))
                        continue
                    ctx = RecordContext.of(msg)
                    try:
                        payload = decode(ctx.key, ctx.value, ctx.headers).payload
                    except DecodeError:
                        continue
                    if isinstance(payload, events_pb2.ModelDeployed):
                        changed.add(payload.model)
                    elif isinstance(payload, events_pb2.ModelHealth):
                        # the monitor's window: the score on feedback (accuracy, or R²) feeds the
                        # candidate's rollback rule, at the model's writer
                        self.manager.observe_health(payload.model, payload.version, payload.score, payload.feedback)
                    elif isinstance(payload, events_pb2.GatewayCommandResult) and payload.reply_to == self.replica_id:
                        self.replies.resolve(payload.command_id, payload)
                now = time.monotonic()
                if now - refreshed >= s.follow_refresh_s:  # the safety net under the notifications
                    refreshed = now
                    everything = now - all_refreshed >= FOLLOW_ALL_EVERY * s.follow_refresh_s
                    if everything:
                        all_refreshed = now
                    changed.update(self.manager.followed(under_way_only=not everything))
                for model in sorted(changed):
                    self._follow(model)
        except Exception:
            log.exception("following the other instances' rollouts stopped")
            signal.raise_signal(signal.SIGTERM)
        finally:
            consumer.close()

    def _on_event(self, event: Event, ctx: RecordContext) -> list[OutRecord]:
        msg = event.payload
        if isinstance(msg, events_pb2.GatewayCommand):
            return self._on_command(event, msg)
        if not isinstance(msg, events_pb2.ModelCompressed):
            if not isinstance(msg, events_pb2.GatewayCommandResult):  # (read by the asker's own consumer)
                log.info("event ignored", type=event.type)
            return []
        if not msg.ok:
            log.info("compression failed upstream; nothing to roll out", model=msg.model, version=msg.version)
            return []
        # the rollout's steps run in the worker thread: they join this event's trace there
        parent = tracing.current_traceparent()
        if parent is not None:
            self._traces[(msg.model, int(msg.version))] = parent
            while len(self._traces) > 1000:
                del self._traces[next(iter(self._traces))]
        self.execute(self.manager.begin(msg.model, msg.version))
        return []

    def _on_command(self, event: Event, command: events_pb2.GatewayCommand) -> list[OutRecord]:
        """An admin call another instance handed to this one (the model's writer): applied, and its
        result committed with the command's offset."""
        if command.group != self.settings.group_id:  # another deployment's gateways share the topic
            return []
        result = self.admin.apply(command)
        return [OutRecord.of(self.settings.commands_topic, event.caused(result, self.source, key=command.model))]

    def _run_loop(self) -> None:
        try:
            self.loop.run()
        except Exception:
            log.exception("event loop over model.compressed and gateway.commands stopped")
            signal.raise_signal(signal.SIGTERM)

    def _reconcile(self) -> None:
        """Make every server hold what the manager wants where it does not (a server that
        dropped a version, a load that half failed): only the servers that differ are loaded.
        Only for the models this instance drives: the others' writers reconcile them."""
        # a server out of the pool is left alone: it is loaded before it joins again (_server_ready)
        ready = [s.endpoint for s in self.pool.servers() if s.ready]
        for model in self.manager.owned() if ready else ():
            wanted = self.manager.wanted_versions(model)
            if not wanted:
                continue
            try:
                held = self.control.loaded_versions(model, servers=ready)
            except CdlError as exc:  # (a server that went away meanwhile: the pool takes it out)
                log.warning("reconciling Triton servers failed", model=model, error=str(exc))
                continue
            stale = [ep for ep, versions in held.items() if tuple(sorted(versions)) != wanted]
            if stale and self.manager.owns(model):
                # the loading is the rollout worker's, in turn with the rollout's own steps: loaded
                # from here, what was wanted a moment ago could unload a candidate the worker has
                # just loaded (a SYNC loads what the manager wants when it is carried out)
                log.warning("Triton servers out of step; loading them again", model=model, servers=stale)
                reason = "servers out of step"
                self.execute([Transition(model, max(wanted), None, 0.0, reason, action=Action.SYNC, load=wanted)])

    async def _ticks(self) -> None:
        reconciled = time.monotonic()
        while not self._stopping.is_set():
            self._tick_wake.clear()
            busy = False
            try:
                busy = self.manager.busy()
                if busy:  # idle: no thread hand-off, and a wake-up a second, not ten
                    self.execute(await asyncio.to_thread(self.manager.tick), wake=False)
                if time.monotonic() - reconciled >= RECONCILE_S:
                    reconciled = time.monotonic()
                    await asyncio.to_thread(self._reconcile)
            except Exception:
                log.exception("rollout tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick_wake.wait(), TICK_S if busy else IDLE_TICK_S)

    # ------------------------------------------------------------------ life cycle
    def _health(self) -> tuple[bool, dict[str, Any]]:
        ready = self._ready.is_set() and self.pool.ready_count() > 0
        details: dict[str, Any] = {"triton_ready": self.pool.ready_count(), "models": len(self.table.all())}
        details["writes"] = len(self.manager.owned())  # the models whose rollouts this instance drives
        details["partitions"] = sorted(self.ownership.partitions)
        details["data_plane"] = "python" if self.lane is None else "native"
        if self.lane is not None:
            ready = ready and self.lane.alive()
            details["lane_pid"] = self.lane.pid()
        ready = ready and self.loop.assigned.is_set()
        return ready, details

    def _provision(self) -> None:
        s = self.settings
        topics = dict(Topics.PARTITIONS)
        for topic in (
            s.compressed_topic,
            s.health_topic,
            s.deployed_topic,
            s.logged_topic,
            s.commands_topic,
            s.deadletter_topic,
        ):
            topics.setdefault(topic, 1)
        provision(s.kafka_bootstrap, self.store, topics, buckets=store_buckets("gateway"))

    def _stop(self) -> None:
        self._stopping.set()
        self._tick_wake.set()

    async def serve(self) -> None:
        s = self.settings
        self._aio_loop = asyncio.get_running_loop()
        self._provision()
        self._worker.start()
        # every model is followed from its document until the group makes this instance the writer
        # of some (their rollouts then resume from the same documents: _assigned)
        start = await asyncio.to_thread(self._follow_offsets)
        docs = await asyncio.to_thread(self.rollouts.load_all)
        for model, doc in sorted(docs.items()):
            self.manager.follow(model, doc)
        self._follower = threading.Thread(
            target=self._run_follower, args=(start,), name="cdl-gateway-follower", daemon=True
        )
        self._follower.start()
        await self.pool.start()
        lane_binary = lane_module.lane_binary(s.data_plane, s.lane_path)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", s.max_message_bytes),  # larger: RESOURCE_EXHAUSTED
            ("grpc.max_send_message_length", s.max_message_bytes),
        ]
        server = grpc.aio.server(options=options)
        service = InferenceService(
            self.table,
            self.pool,
            self.manager,
            self.log,
            self.keys,
            s.default_timeout_s,
            s.max_message_bytes,
            trace_sample=s.trace_sample,
            behind_lane=lane_binary is not None,
            stream_window=s.stream_window,
            budget=KeyBudget(s.key_rate, s.key_burst),
        )
        server.add_generic_rpc_handlers((service.handler(),))
        admin_pb2_grpc.add_ModelAdminServicer_to_server(self.admin, server)
        add_health(server, ["inference.GRPCInferenceService", "cdl.v1.ModelAdmin"])
        address = f"{s.grpc_host}:{s.grpc_port}"
        if lane_binary is not None:
            # the lane serves the public port; this server listens behind it on a unix socket
            self._socket_dir = tempfile.mkdtemp(prefix="cdl-gateway-")
            socket = f"{self._socket_dir}/backend.sock"
            server.add_insecure_port(f"unix:{socket}")
            await server.start()
            args = self._lane_args(address, socket, service.id_prefix + "l")
            if s.http_port >= 0:  # the lane serves the REST port too; this process's behind it
                self.rest = RestApi(service, s.max_message_bytes, behind_lane=True)
                rest_socket = f"{self._socket_dir}/rest.sock"
                await self.rest.start_unix(rest_socket)
                args += [f"--http-listen={s.grpc_host}:{s.http_port}", f"--http-backend={rest_socket}"]
                if len(s.triton_http) == len(s.triton_grpc):
                    args.append(f"--triton-http={','.join(s.triton_http)}")
            self.lane = NativeLane(
                lane_binary,
                args,
                service.lane_served,
                self.table.all,
                lambda: [info.endpoint for info in self.pool.servers() if info.ready],
                on_served_http=service.lane_served_http,
                keys=lambda: self.keys.inference_digests,
            )
            self.table.subscribe(self.lane.changed)  # the lane routes by a change at once
            self.pool.subscribe(self.lane.changed)
            try:
                self.port = await asyncio.to_thread(self.lane.start)
            except Exception:
                await server.stop(None)
                if self.rest is not None:
                    await self.rest.stop()
                raise
            self.http_port = self.lane.http_port if self.rest is not None else -1
        else:
            self.port = add_port(server, address, s.tls_cert_file, s.tls_key_file)
        if self.lane is None:
            await server.start()
        self.server = server
        if s.http_port >= 0 and self.lane is None:
            self.rest = RestApi(service, s.max_message_bytes)
            tls = None
            if s.tls_cert_file:  # the REST port speaks TLS when the gRPC port does, with the same files
                tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                tls.load_cert_chain(s.tls_cert_file, s.tls_key_file)
            self.http_port = await self.rest.start(s.grpc_host, s.http_port, ssl_context=tls)
        self.http = serve_http(s.metrics_port, health=self._health, host=s.metrics_host)
        if s.api_keys_file:  # a rotation reaches the lane at once (its sync sends the keys)
            lane = self.lane
            rotated = lane.changed if lane is not None else None
            KeysFile(s.api_keys_file, self.keys, on_change=rotated).watch(self._keys_stop, s.keys_reload_s)
        self._kafka.start()
        ticks = asyncio.create_task(self._ticks(), name="cdl-gateway-ticks")
        self._ready.set()
        log.info(
            "gateway started",
            grpc_port=self.port,
            http_port=self.http_port,
            metrics_port=self.http.port,
            triton=s.triton_grpc,
            tls=bool(s.tls_cert_file),
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop)
        try:
            await self._stopping.wait()
        finally:
            self._ready.clear()
            self._keys_stop.set()
            log.info("gateway stopping")
            if self.lane is not None:  # the public port closes first; what it has in flight finishes
                await asyncio.to_thread(self.lane.close)
            if self.rest is not None:
                await self.rest.stop()
            await server.stop(grace=5)
            await service.drain()
            self.loop.stop()
            self._kafka.join(30)
            self._follow_stop.set()
            if self._follower is not None:
                self._follower.join(10)
            await ticks
            self._work.put(None)
            self._worker.join(30)
            await self.pool.close()
            self.log.close()
            if self.log_producer is not None:  # what it cannot deliver is counted: model.deployed is flushed next
                LOG_DROPPED.labels(reason="kafka").inc(flush_unacknowledged(self.log_producer, 10))
            self.producer.flush(10)
            self.control.close()
            if self.http is not None:
                self.http.close()
            if self._socket_dir:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _lane_args(self, address: str, socket: str, id_prefix: str) -> list[str]:
        s = self.settings
        args = [
            f"--listen={address}",
            f"--backend={socket}",
            f"--triton={','.join(s.triton_grpc)}",
            f"--key-hashes={','.join(self.keys.inference_digests)}",
            f"--timeout={s.default_timeout_s}",
            f"--max-bytes={s.max_message_bytes}",
            f"--log-sample={s.log_sample if self.log.enabled else 0}",
            f"--id-prefix={id_prefix}",  # this process's, apart from its own ids (gw-<hex>-l<n>)
            f"--key-rate={s.key_rate}",
            f"--key-burst={s.key_burst}",
        ]
        if s.tls_cert_file:
            args += [f"--tls-cert={s.tls_cert_file}", f"--tls-key={s.tls_key_file}"]
        return args


def main() -> None:
    settings = GatewaySettings()
    configure_logging("gateway", settings.log_level)
    settings.secure_process("gateway")
    asyncio.run(GatewayApp(settings).serve())
