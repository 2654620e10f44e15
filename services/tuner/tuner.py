"""The tuner's job: judge each trigger event, run a study when one fires, publish the result
(transport-free: events in, records out; the loop and Kafka are the app's).

Per model (named after its dataset, as the trainer names it):

- ``cdl-models/<model>/tuning.json``: the trigger state (:class:`TuneState`);
- ``cdl-models/<model>/studies/<study>.json``: each study's summary -- reason,
  dataset version, storage, trial counts, trial-epochs, best parameters and
  values, the Pareto front of a multi-objective study and the point picked.

A study is named ``<model>-<n>`` (its n-th); the name is fixed before the
study starts and the state is saved after it ends, so an event handled again
after a crash resumes the same study in its storage (its finished trials
count) instead of starting another. ``tuning.completed`` carries the best
parameters (JSON values), counts, trial-epochs, the storage (no password)
and the study's name; the trainer stores the parameters, uses them for the
model's next training and names the study in that model's lineage
(``hyperparameters_source: tuning:<study>``).
"""

from __future__ import annotations

import json
import time
from typing import Any

from prometheus_client import Counter, Gauge

from cdl.datasets import latest_version, load_version
from cdl.errors import InvalidInputError, NotFoundError
from cdl.events import Event, OutRecord
from cdl.logging import get_logger
from cdl.ml.core import split_version
from cdl.ml.family import family_of
from cdl.ml.space import space_for
from cdl.registry import MODELS_BUCKET, ModelRegistry
from cdl.store import BlobStore
from cdl.v1 import events_pb2
from services.tuner.settings import TunerSettings
from services.tuner.study import StudyPlan, StudyResult, public_url, run_study
from services.tuner.triggers import TriggerPolicy, TuneState

__all__ = ["Tuner"]

log = get_logger(__name__)

STUDIES = Counter("cdl_tuner_studies_total", "Studies finished", ["model", "reason"])
TRIALS = Counter("cdl_tuner_trials_total", "Trials of finished studies by state", ["model", "state"])
PROGRESS = Gauge("cdl_tuner_study_finished_trials", "Finished trials of the running study", ["model"])


class Tuner:
    def __init__(self, settings: TunerSettings, store: BlobStore, registry: ModelRegistry, source: str) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.source = source
        self.policy = TriggerPolicy(settings.every_versions, settings.accuracy_drop, settings.first_after_model)
        self.running: str | None = None

    # ------------------------------------------------------------------ state
    def state(self, model: str) -> TuneState:
        try:
            return TuneState.from_json(self.store.get_json(MODELS_BUCKET, f"{model}/tuning.json"))
        except NotFoundError:
            return TuneState()

    def _save(self, model: str, state: TuneState) -> None:
        self.store.put_json(MODELS_BUCKET, f"{model}/tuning.json", state.to_json())

    # ------------------------------------------------------------------ events
    def handle(self, event: Event) -> list[OutRecord]:
        msg = event.payload
        when = event.time.timestamp()
        unfinished = self._unfinished(event)
        if unfinished is not None:
            return unfinished
        if isinstance(msg, events_pb2.DataUpdated):
            model, version = msg.dataset, int(msg.version)
            state = self.state(model)
            return self._maybe(event, model, state, self.policy.on_data_updated(state, version), version)
        if isinstance(msg, events_pb2.ModelTrained):
            model = msg.model
            state = self.state(model)
            accepted = msg.verdict == events_pb2.VERDICT_ACCEPTED
            champion = msg.challenger_score if accepted else msg.champion_score
            had_mark = state.accuracy_mark is not None
            reason = self.policy.on_trained(state, float(champion))
            if not had_mark and state.accuracy_mark is not None:
                self._save(model, state)  # the mark after a study
            return self._maybe(event, model, state, reason, None)
        if isinstance(msg, events_pb2.DriftDetected):
            state = self.state(msg.model)
            return self._maybe(event, msg.model, state, self.policy.on_drift(state, when), None)
        if isinstance(msg, events_pb2.TuningRequested):
            state = self.state(msg.model)
            reason = self.policy.on_request(state, when)
            if reason and msg.reason:
                reason = f"requested: {msg.reason}"
            return self._maybe(event, msg.model, state, reason, None)
        log.info("event ignored", type=event.type)
        return []

    def _unfinished(self, event: Event) -> list[OutRecord] | None:
        """What a crash left: a study under way (resumed as it was planned), or a finished one
        whose tuning.completed was not committed (sent again); None when neither."""
        msg = event.payload
        model = msg.dataset if isinstance(msg, events_pb2.DataUpdated) else str(getattr(msg, "model", ""))
        if not model:
            return None
        state = self.state(model)
        if state.running is not None:
            run = state.running
            return self._study(event, model, state, str(run["reason"]), int(run["dataset_version"]), run)
        if state.last_cause == event.id and state.last_study:
            return [self._resend(event, model, state.last_study)]
        return None

    def _maybe(
        self, cause: Event, model: str, state: TuneState, reason: str | None, dataset_version: int | None
    ) -> list[OutRecord]:
        if reason is None:
            return []
        version = dataset_version or latest_version(self.store, model)
        if version is None:
            log.info("nothing to tune on yet", model=model, reason=reason)
            return []
        run = {"study": f"{model}-{state.studies + 1}", "dataset_version": version, "reason": reason}
        state.running = {**run, "cause": cause.id}
        self._save(model, state)  # before the study: a restart resumes this one
        return self._study(cause, model, state, reason, version, state.running)

    def _study(
        self, cause: Event, model: str, state: TuneState, reason: str, version: int, run: dict[str, Any]
    ) -> list[OutRecord]:
        result, plan = self.tune(model, version, state, reason, str(run["study"]))
        self.policy.studied(state, plan.study, version, time.time(), cause=cause.id)
        self._save(model, state)  # a failed study answers its trigger too (the next gets a new name)
        if not result.best_params:
            raise InvalidInputError("no trial of the study completed", model=model, study=plan.study)
        return [self._completed(cause, model, version, plan.study, public_url(plan.storage), result, reason)]

    def _resend(self, cause: Event, model: str, study: str) -> OutRecord:
        """The tuning.completed of a study that finished before a crash (same event id)."""
        doc = self.store.get_json(MODELS_BUCKET, f"{model}/studies/{study}.json")
        result = StudyResult(
            study=study,
            best_params=dict(doc["best_params"]),
            best_value=float(doc["objective_values"][0]) if doc["objective_values"] else float("nan"),
            objective_values=[float(v) for v in doc["objective_values"]],
            complete=int(doc["complete"]),
            pruned=int(doc["pruned"]),
            failed=int(doc["failed"]),
            trial_epochs=int(doc["trial_epochs"]),
            front=list(doc["pareto_front"]),
        )
        log.info("study already finished; its result is sent again", model=model, study=study)
        version, storage, reason = int(doc["dataset_version"]), str(doc["storage"]), str(doc["reason"])
        return self._completed(cause, model, version, study, storage, result, reason)

    # ------------------------------------------------------------------ a study
    def plan(self, model: str, spec: Any, study: str) -> StudyPlan:
        s = self.settings
        previous = self.registry.hyperparameters(model)
        warm = previous[0] if previous is not None and previous[1].startswith("tuning:") else None
        return StudyPlan(
            study=study,
            storage=s.storage(),
            spec=spec,
            space=space_for(family_of(spec), s.spaces.get(model)),
            nice=s.worker_nice,
            n_trials=s.n_trials,
            max_epochs=s.max_epochs,
            time_budget_s=s.trial_time_budget_s,
            objectives=tuple(s.objectives_by_model.get(model, s.objectives)),
            pruner=s.pruner,
            prune_min_epochs=s.prune_min_epochs,
            prune_margin=s.prune_margin,
            pick_tolerance=s.pick_tolerance,
            seed=s.seed,
            warm_params=warm,
            device=s.device,
            heartbeat_s=s.heartbeat_s,
            grace_s=s.grace_s,
        )

    def tune(
        self, model: str, version: int, state: TuneState, reason: str, study: str
    ) -> tuple[StudyResult, StudyPlan]:
        data = load_version(self.store, model, version, self.settings.window_records)
        split = split_version(data, self.settings.val_fraction, self.settings.seed)
        if len(split.x_train) < 2 or len(split.x_val) < 1:
            raise InvalidInputError("dataset version too small to tune on", dataset=model, version=version)
        plan = self.plan(model, data.spec, study)
        self.running = plan.study
        log.info(
            "study starting",
            model=model,
            study=plan.study,
            reason=reason,
            dataset_version=version,
            trials=plan.n_trials,
            workers=self.settings.workers,
            objectives=list(plan.objectives),
            storage=public_url(plan.storage),
        )
        last = [0.0]

        def progress(done: int, total: int) -> None:
            PROGRESS.labels(model).set(done)
            if time.monotonic() - last[0] >= 10:
                last[0] = time.monotonic()
                log.info("study progress", study=plan.study, finished=done, budget=total)

        try:
            result = run_study(plan, split, self.settings.workers, on_progress=progress)
        finally:
            self.running = None
        for st, n in (("complete", result.complete), ("pruned", result.pruned), ("failed", result.failed)):
            TRIALS.labels(model, st).inc(n)
        STUDIES.labels(model, reason.split(":", maxsplit=1)[0]).inc()
        summary = {
            "study": plan.study,
            "model": model,
            "reason": reason,
            "dataset_version": version,
            "storage": public_url(plan.storage),
            "objectives": list(plan.objectives),
            "n_trials": plan.n_trials,
            "complete": result.complete,
            "pruned": result.pruned,
            "failed": result.failed,
            "trial_epochs": result.trial_epochs,
            "best_params": result.best_params,
            "objective_values": result.objective_values,
            "pareto_front": result.front,
            "warm_start": plan.warm_params,
            "seconds": round(result.seconds, 2),
        }
        self.store.put_json(MODELS_BUCKET, f"{model}/studies/{plan.study}.json", summary)
        log.info(
            "study finished",
            model=model,
            study=plan.study,
            best=result.objective_values,
            complete=result.complete,
            pruned=result.pruned,
            failed=result.failed,
            trial_epochs=result.trial_epochs,
            seconds=round(result.seconds, 1),
        )
        return result, plan

    def _completed(
        self, cause: Event, model: str, version: int, study: str, storage: str, result: StudyResult, reason: str
    ) -> OutRecord:
        msg = events_pb2.TuningCompleted(
            model=model,
            study=study,
            dataset=model,
            dataset_version=version,
            best_value=result.best_value,
            trials=result.complete,
            pruned_trials=result.pruned,
            failed_trials=result.failed,
            objective_values=result.objective_values,
            trial_epochs=result.trial_epochs,
            storage=storage,
            reason=reason,
            pareto_front_size=len(result.front),
        )
        for k, v in result.best_params.items():
            msg.best_params[k] = json.dumps(v)
        event = cause.caused(msg, self.source, key=model, event_id=f"{model}/study/{study}")
        return OutRecord.of(self.settings.completed_topic, event)
