"""Training one dataset version into a gated model version (transport-free)."""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from cdl.datasets import DATASETS_BUCKET, manifest_key
from cdl.errors import ConfigError, ConflictError, InvalidInputError
from cdl.events import Event, OutRecord
from cdl.logging import get_logger
from cdl.ml.core import assess, epochs_to_run, fit, hyperparameters
from cdl.ml.drift import reference_sample, to_npy
from cdl.ml.family import family_of, provenance
from cdl.ml.models import ModelConfig
from cdl.ml.objective import chance, metric_name
from cdl.ml.streaming import prepare_version
from cdl.ml.train import EpochMetrics, pick_device
from cdl.registry import MODELS_BUCKET, LoadedModel, ModelRegistry, score_of
from cdl.store import BlobStore
from cdl.v1 import events_pb2
from services.trainer.settings import TrainerSettings

__all__ = ["Trainer", "code_version"]

log = get_logger(__name__)

TRAININGS = Counter("cdl_trainer_trainings_total", "Finished trainings by verdict", ["model", "verdict"])
TRAIN_SECONDS = Histogram("cdl_trainer_training_seconds", "Training time", buckets=(1, 5, 15, 60, 300, 1800, 7200))
EPOCH = Gauge("cdl_trainer_epoch", "Epochs finished by the training in progress (0: none running)", ["model"])
SAMPLES_PER_S = Gauge("cdl_trainer_samples_per_second", "Training samples/s of the last epoch", ["model"])
LOSS = Gauge("cdl_trainer_loss", "Loss of the last epoch", ["model", "split"])


def code_version() -> str:
    root = Path(__file__).resolve().parent.parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        return f"git:{sha}"
    except (OSError, subprocess.CalledProcessError):
        from importlib.metadata import version

        return f"cdl:{version('cdl')}"


class Trainer:
    def __init__(
        self,
        settings: TrainerSettings,
        store: BlobStore,
        registry: ModelRegistry,
        source: str,
        open_store: Callable[[], BlobStore] | None = None,
    ) -> None:
        """``open_store``: makes a client of ``store`` in another process (it pickles): what the
        processes of a distributed training stream a version's shards with."""
        self.settings = settings
        self.store = store
        self.open_store = open_store
        self.registry = registry
        self.source = source
        self.code_version = settings.code_version or code_version()

    # ------------------------------------------------------------------ events
    def handle(self, event: Event) -> list[OutRecord]:
        if isinstance(event.payload, events_pb2.TuningCompleted):
            return self.on_tuning(event)
        if isinstance(event.payload, events_pb2.DataUpdated):
            return [self.on_data_updated(event)]
        raise InvalidInputError("trainer cannot handle this event type", ce_type=event.type)

    def on_tuning(self, event: Event) -> list[OutRecord]:
        """Record a study's best hyperparameters for the model's next trainings and, with
        ``train_on_tuning``, train a version with them on the data the study tuned on at once:
        the study's best becomes a version (gated against the champion like any other) without
        waiting for new data."""
        import json

        done = event.payload
        assert isinstance(done, events_pb2.TuningCompleted)
        params = {k: json.loads(v) for k, v in done.best_params.items()}
        self.registry.set_hyperparameters(done.model, params, f"tuning:{done.study}")
        log.info("tuned hyperparameters recorded", model=done.model, study=done.study, params=params)
        if not self.settings.train_on_tuning or not done.dataset or done.dataset_version <= 0:
            return []
        model = done.model
        version, new = self.registry.claim(model, done.dataset, done.dataset_version, cause=f"study-{done.study}")
        if self.registry.result(model, version) is None:
            key = manifest_key(done.dataset, done.dataset_version)
            update = events_pb2.DataUpdated(
                dataset=done.dataset, version=done.dataset_version, manifest_uri=f"s3://{DATASETS_BUCKET}/{key}"
            )
            log.info("training the study's best", model=model, version=version, study=done.study, new_claim=new)
            self.train_version(model, version, update)
        return [self._event(event, model, version)]

    def on_data_updated(self, event: Event) -> OutRecord:
        update = event.payload
        assert isinstance(update, events_pb2.DataUpdated)
        model = update.dataset
        version, new = self.registry.claim(model, update.dataset, update.version)
        done = self.registry.result(model, version)
        if done is not None:  # trained before a crash, its event never committed: publish it now
            log.info("model version already trained", model=model, version=version)
            return self._event(event, model, version)
        log.info("training", model=model, version=version, dataset_version=update.version, new_claim=new)
        self.train_version(model, version, update)
        return self._event(event, model, version)

    def _event(self, cause: Event, model: str, version: int) -> OutRecord:
        result = self.registry.result(model, version)
        lineage = self.registry.document(model, version, "lineage")
        assert result is not None
        msg = events_pb2.ModelTrained(
            model=model,
            version=version,
            checkpoint_uri=result["checkpoint_uri"],
            verdict=events_pb2.VERDICT_ACCEPTED if result["accepted"] else events_pb2.VERDICT_REJECTED,
            reason=result["reason"],
            challenger_score=score_of(result, "challenger") or 0.0,
            champion_score=score_of(result, "champion") or 0.0,
            family=result["family"],
            metric=str(result.get("metric", "accuracy")),
        )
        for k, v in result["metrics"].items():
            msg.metrics[k] = float(v)
        lin = msg.lineage
        lin.dataset = lineage["dataset"]
        lin.dataset_version = lineage["dataset_version"]
        for r in lineage["offset_ranges"]:
            lin.offset_ranges.add(topic=r["topic"], partition=r["partition"], first=r["first"], last=r["last"])
        lin.parent_version = lineage["parent_version"] or 0
        for k, v in lineage["hyperparameters"].items():
            lin.hyperparameters[k] = str(v)
        lin.hyperparameters_source = lineage["hyperparameters_source"]
        lin.code_version = lineage["code_version"]
        lin.device = lineage["device"]
        lin.duration_s = lineage["duration_s"]
        return OutRecord.of(
            self.settings.trained_topic, cause.caused(msg, self.source, key=model, event_id=f"{model}/v{version}")
        )

    # ------------------------------------------------------------------ training
    def _progress(self, model: str, version: int, epochs: int, samples: int) -> Any:
        """The epoch callback: a log line, the gauges and ``<model>/training.json`` (``cdl models``)
        after every epoch, so a long training shows how far it got."""
        started = time.time()

        def report(m: EpochMetrics) -> bool:
            EPOCH.labels(model).set(m.epoch)
            SAMPLES_PER_S.labels(model).set(m.samples_per_s)
            LOSS.labels(model, "train").set(m.train_loss)
            LOSS.labels(model, "validation").set(m.val_loss)
            doc = {"version": version, "epochs": epochs, "samples": samples, "started_at": started, **m.to_json()}
            log.info("training epoch", model=model, version=version, of=epochs, **m.to_json())
            try:
                self.store.put_json(MODELS_BUCKET, f"{model}/training.json", doc)
            except Exception as exc:  # noqa: BLE001 - progress is for people: it never fails a training
                log.warning("training progress not saved", model=model, error=str(exc))
            return True

        return report

    def train_version(self, model: str, version: int, update: events_pb2.DataUpdated) -> None:
        start = time.perf_counter()
        s = self.settings
        data = prepare_version(
            self.store,
            update.dataset,
            update.version,
            window_records=s.window_records,
            val_fraction=s.val_fraction,
            seed=s.seed,
            memory_cap_bytes=int(s.memory_cap_mb * 2**20),
            stream_store=self.open_store if s.processes > 1 else None,
        )
        if data.stream is not None and s.processes > 1 and self.open_store is None:
            raise ConfigError("a distributed training streams through open_store, and none was given")
        spec, split = data.spec, data.split
        tuned = self.registry.hyperparameters(model)
        hparams = hyperparameters(family_of(spec), tuned[0] if tuned else None)
        hp_source = tuned[1] if tuned else "defaults"
        if len(split.x_train) < 1 or len(split.x_hold) < 1:
            raise InvalidInputError("dataset version too small to train and evaluate", dataset=spec.name)
        warm: list[LoadedModel] = []
        origin = self.registry.start(model)  # a user's starting point (cdl checkpoint upload), if any
        frozen: list[str] = []

        def warm_start(config: ModelConfig, module: Any) -> None:
            loaded = self._warm_start(model, config, module)
            if loaded is not None:
                warm.append(loaded)
            elif origin is not None:
                _load_start(module, origin[0])
            if origin is not None:
                frozen.extend(_freeze(module, origin[1]["freeze"]))

        epochs = epochs_to_run(hparams, self.settings.max_epochs)
        progress = self._progress(model, version, epochs, data.train_records)
        with TRAIN_SECONDS.time():
            fitted = fit(
                spec,
                split,
                hparams,
                seed=self.settings.seed,
                device=self.settings.device,
                patience=self.settings.patience,
                max_epochs=self.settings.max_epochs,
                time_budget_s=self.settings.time_budget_s,
                warm_start=warm_start,
                callback=progress,
                stream=data.stream,
                processes=s.processes,
                timeout_s=s.distributed_timeout_s,
            )
        EPOCH.labels(model).set(0)
        module, pre, config, result = fitted.module, fitted.preprocessor, fitted.config, fitted.result
        parent = warm[0].version if warm else None
        y_hold, x_hold = split.y_hold, split.x_hold
        device = pick_device(self.settings.device)
        regression = spec.task.regression
        metric = metric_name(regression)
        hold = assess(module, pre, x_hold, y_hold, regression, device)

        champion = self.registry.champion(model)
        champ_score: float | None = None
        if champion is not None:
            # usually the model we warm-started from: do not read it twice
            champ = warm[0] if warm and warm[0].version == champion else self.registry.load(model, champion)
            champ_score = assess(champ.module, champ.preprocessor, x_hold, y_hold, regression, device).score
        floor = chance(regression, len(spec.labels)) + self.settings.min_accuracy_over_chance
        accepted, reason = self._gate(hold.score, champ_score, champion, floor, metric)
        duration = time.perf_counter() - start
        lineage = {
            "model": model,
            "version": version,
            "dataset": spec.name,
            "dataset_version": update.version,
            "manifest_uri": update.manifest_uri,
            "schema_hash": spec.schema_hash,
            "offset_ranges": data.offset_ranges(),
            "records": data.records,
            "windowed": data.windowed,
            # streamed from the shards (larger than memory_cap_mb), on how many processes
            "streamed": data.stream is not None,
            "processes": s.processes,
            "parent_version": parent,
            "warm_start": parent is not None,
            "hyperparameters": hparams,
            "hyperparameters_source": hp_source,
            "code_version": self.code_version,
            "device": result.device,
            "duration_s": round(duration, 3),
            "seed": self.settings.seed,
            "task": spec.task.value,
            "labels": list(spec.labels),
            # the code that built the model: the family's package, version and source hash
            "family": provenance(config.family),
        }
        if origin is not None:  # where the weights began, and what stayed as it was
            lineage["start"] = {
                "sha256": origin[1]["sha256"],
                "source": origin[1].get("source", ""),
                "loaded": parent is None,
                "freeze": origin[1]["freeze"],
                "frozen_parameters": frozen,
            }
        holdout = {f"holdout_{k}": v for k, v in hold.metrics.items()}  # holdout_accuracy, or _r2 _rmse _mae
        metrics = {
            "epochs": [m.to_json() for m in result.history],
            "best_epoch": result.best_epoch,
            "metric": metric,
            "holdout_loss": hold.loss,
            "holdout_score": hold.score,
            **holdout,
            "champion_version": champion,
            "champion_score": champ_score,
            "samples_per_s": result.samples_per_s,
            # why it stopped before the epochs asked for: no better validation loss, or the time budget
            "stopped_early": result.stopped_early,
            "stopped_by_budget": result.stopped_by_budget,
        }
        summary = {
            "holdout_score": hold.score,
            **holdout,
            "holdout_loss": hold.loss,
            "val_score": result.history[result.best_epoch - 1].val_score if result.best_epoch else math.nan,
            "epochs": float(len(result.history)),
            "train_samples": float(data.train_records),
            "val_samples": float(len(split.x_val)),
            "holdout_samples": float(len(x_hold)),
            "samples_per_s": result.samples_per_s,
        }
        claimed = int(self.registry.document(model, version, "claim")["dataset_version"])
        if claimed != update.version:  # a process that trained on past its claim (cdl.registry)
            raise ConflictError(
                f"model version {version} was claimed again for dataset version {claimed}",
                model=model,
                dataset_version=update.version,
            )
        self.registry.save(
            model,
            version,
            state=result.best_state,
            config=config,
            preprocessor=pre,
            metrics=metrics,
            lineage=lineage,
            result={
                "accepted": accepted,
                "reason": reason,
                "metric": metric,
                "challenger_score": hold.score,
                "champion_score": champ_score,
                "champion_version": champion,
                "family": config.family,
                "metrics": summary,
            },
            reference=self._reference(split.x_train),
        )
        if accepted:
            self.registry.set_champion(model, version)
        TRAININGS.labels(model, "accepted" if accepted else "rejected").inc()
        log.info(
            "model version trained",
            model=model,
            version=version,
            accepted=accepted,
            reason=reason,
            metric=metric,
            holdout_score=round(hold.score, 4),
            parent=parent,
            device=result.device,
            seconds=round(duration, 2),
        )

    def _reference(self, x_train: Any) -> bytes | None:
        """The drift reference of a version: a seeded sample of its training inputs' feature rows."""
        rows = self.settings.reference_rows
        return to_npy(reference_sample(x_train, rows, self.settings.seed)) if rows > 0 else None

    def _warm_start(self, model: str, config: ModelConfig, module: Any) -> LoadedModel | None:
        parent = self.registry.serving(model) or self.registry.champion(model)
        if parent is None:
            return None
        try:
            parent_config = self.registry.config(model, parent)
        except Exception:  # noqa: BLE001 - a broken parent means: start from scratch
            log.warning("parent model unreadable; training from scratch", model=model, parent=parent)
            return None
        if parent_config.architecture() != config.architecture():
            log.info("architecture changed; training from scratch", model=model, parent=parent)
            return None
        loaded = self.registry.load(model, parent)
        module.load_state_dict(loaded.module.state_dict())  # copies: the parent's module stays as it was
        return loaded

    def _gate(
        self, challenger: float, champion: float | None, champion_version: int | None, floor: float, metric: str
    ) -> tuple[bool, str]:
        """The champion/challenger gate on the task's score (``metric``: accuracy or R²)."""
        if champion is None:
            if challenger >= floor:
                return True, f"first accepted version: holdout {metric} {challenger:.4f} >= {floor:.4f}"
            return False, f"holdout {metric} {challenger:.4f} is below {floor:.4f} (chance + margin)"
        if challenger >= champion - self.settings.tolerance:
            return True, (
                f"challenger {challenger:.4f} >= champion v{champion_version} {champion:.4f} "
                f"- tolerance {self.settings.tolerance}"
            )
        return False, (
            f"challenger {challenger:.4f} < champion v{champion_version} {champion:.4f} "
            f"- tolerance {self.settings.tolerance}"
        )


def _load_start(module: Any, state: dict[str, Any]) -> None:
    """Load a user's starting point; one that does not fit the family's module is the input's fault."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:500]
        raise InvalidInputError(f"the uploaded starting point does not fit the model: {detail}") from exc


def _freeze(module: Any, patterns: list[str]) -> list[str]:
    """Stop the gradients of the parameters whose names match one of ``patterns`` (fnmatch); returns
    their names. Patterns that match nothing are an error (a typo would silently train them)."""
    from fnmatch import fnmatchcase

    names = []
    for name, param in module.named_parameters():
        if any(fnmatchcase(name, p) for p in patterns):
            param.requires_grad_(False)
            names.append(name)
    unmatched = [p for p in patterns if not any(fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise InvalidInputError("freeze patterns match no parameter of the model", patterns=unmatched)
    return names
