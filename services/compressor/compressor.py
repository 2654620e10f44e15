"""Compressing one accepted model version into a Triton repository entry (transport-free)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from prometheus_client import Counter

from cdl.datasets import DatasetVersion, load_version
from cdl.errors import CdlError, PermanentError
from cdl.events import Event, OutRecord
from cdl.logging import get_logger
from cdl.ml.core import fit, hyperparameters, split_version
from cdl.ml.family import get_family
from cdl.ml.objective import metric_name
from cdl.ml.pruning import parameters, prune
from cdl.registry import MODELS_BUCKET, LoadedModel, ModelRegistry
from cdl.signing import SIGNATURE_FILE, Signer
from cdl.store import BlobStore
from cdl.triton import TRITON_BUCKET, Backend, ModelSpec, TensorSpec, write_entry
from cdl.v1 import events_pb2
from services.compressor.faults import failing_onnx, take_fault
from services.compressor.settings import CompressorSettings
from services.compressor.variants import (
    INPUT,
    OUTPUT,
    Measured,
    Served,
    export_onnx,
    fp16_variant,
    int8_dynamic_variant,
    int8_static_variant,
    measure,
    parity,
    served_input,
    slim,
)

#: the input of a text model's Triton entry: texts, one per row (BYTES ``[batch, 1]``)
TEXT_INPUT = "text"

__all__ = ["Compressor", "choose"]

log = get_logger(__name__)

COMPRESSIONS = Counter("cdl_compressor_versions_total", "Compressed model versions by outcome", ["outcome"])


def choose(variants: list[Measured], budget: float, objective: str) -> tuple[Measured, list[str]]:
    """The best variant within ``budget`` accuracy of FP32 by ``objective``; also the names within budget."""
    fp32 = next(v for v in variants if v.name == "fp32")
    floor = fp32.accuracy - budget - 1e-12
    ok = [v for v in variants if v.accuracy >= floor]
    names = [v.name for v in ok]
    if objective == "gpu":
        preferred = [v for v in ok if v.name == "fp16"]
        return (preferred[0] if preferred else fp32), names
    if objective == "cpu_latency":
        return min(ok, key=lambda v: (v.latency_p50_ms_b32, v.size_bytes)), names
    # size: the smallest variant that does not serve batches slower than FP32 (+10%)
    fast_enough = [v for v in ok if v.latency_p50_ms_b32 <= fp32.latency_p50_ms_b32 * 1.1] or [fp32]
    return min(fast_enough, key=lambda v: (v.size_bytes, v.latency_p50_ms_b32)), names


class Compressor:
    def __init__(
        self,
        settings: CompressorSettings,
        store: BlobStore,
        registry: ModelRegistry,
        source: str,
        signer: Signer | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.source = source
        #: signs each Triton entry (cdl.signing); None: entries go unsigned
        self.signer = signer

    def handle(self, event: Event) -> list[OutRecord]:
        trained = event.payload
        if not isinstance(trained, events_pb2.ModelTrained):
            raise PermanentError("compressor cannot handle this event type", ce_type=event.type)
        if trained.verdict != events_pb2.VERDICT_ACCEPTED:
            log.info("rejected version not compressed", model=trained.model, version=trained.version)
            return []
        model, version = trained.model, trained.version
        key = f"{model}/{version}/compression.json"
        if self.store.exists(MODELS_BUCKET, key):  # done before a crash; publish the same result
            return [self._event(event, self.store.get_json(MODELS_BUCKET, key))]
        try:
            doc = self.compress(trained)
        except CdlError as exc:
            doc = self._failure(model, version, str(exc))
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            doc = self._failure(model, version, f"{type(exc).__name__}: {exc}")
        self.store.put_json(MODELS_BUCKET, key, doc)
        COMPRESSIONS.labels("ok" if doc["ok"] else "failed").inc()
        return [self._event(event, doc)]

    def _failure(self, model: str, version: int, reason: str) -> dict[str, Any]:
        log.error("compression failed", model=model, version=version, reason=reason)
        return {"model": model, "version": version, "ok": False, "reason": reason, "variants": [], "chosen": ""}

    def _event(self, cause: Event, doc: dict[str, Any]) -> OutRecord:
        msg = events_pb2.ModelCompressed(
            model=doc["model"],
            version=doc["version"],
            chosen_variant=doc["chosen"],
            triton_repository_path=doc.get("triton_repository_path", ""),
            ok=doc["ok"],
            reason=doc["reason"],
        )
        for v in doc["variants"]:
            msg.variants.add(
                name=v["name"],
                uri=v["uri"],
                size_bytes=v["size_bytes"],
                latency_p50_ms_b1=v["latency_p50_ms_b1"],
                latency_p99_ms_b1=v["latency_p99_ms_b1"],
                latency_p50_ms_b32=v["latency_p50_ms_b32"],
                latency_p99_ms_b32=v["latency_p99_ms_b32"],
                accuracy=v["accuracy"],
                within_budget=v["within_budget"],
                error=v.get("error", ""),
            )
        event_id = f"{doc['model']}/v{doc['version']}"
        return OutRecord.of(
            self.settings.compressed_topic, cause.caused(msg, self.source, key=doc["model"], event_id=event_id)
        )

    # ------------------------------------------------------------------ the work
    def compress(self, trained: events_pb2.ModelTrained) -> dict[str, Any]:
        start = time.perf_counter()
        model, version = trained.model, trained.version
        try:
            loaded = self.registry.load(model, version)
        except CdlError as exc:
            raise PermanentError(f"checkpoint unreadable: {exc}", model=model, version=version) from exc
        except Exception as exc:  # corrupt safetensors / shapes: a clear reason, not a crash
            raise PermanentError(
                f"checkpoint unreadable: {type(exc).__name__}: {exc}", model=model, version=version
            ) from exc
        config, pre = loaded.config, loaded.preprocessor
        lineage = self.registry.document(model, version, "lineage")
        # the records the model was trained on (its window), not an ever-growing whole version
        window = int(lineage["records"]) if lineage.get("windowed") else 0
        data = load_version(self.store, lineage["dataset"], int(lineage["dataset_version"]), window)
        x_hold, y_hold = data.subset(holdout=True)
        x_train, _ = data.subset(holdout=False)
        dtype = data.spec.dtype
        xh = served_input(config, pre, x_hold, dtype)
        served = Served(loaded.module, config, pre, dtype).eval()

        fp32 = export_onnx(served, xh)
        rng = np.random.default_rng(0)
        sample = xh[rng.permutation(len(xh))[: self.settings.parity_samples]]
        max_diff = parity(fp32, served, sample, self.settings.parity_tolerance)
        with torch.no_grad():
            reference = served(torch.from_numpy(xh)).numpy()
        regression = data.spec.task.regression

        family = get_family(config.family)
        allowed = family.compressions
        builders: dict[str, Any] = {"fp32": lambda: slim(fp32)}
        if "int8-dynamic" in allowed:
            builders["int8-dynamic"] = lambda: slim(int8_dynamic_variant(fp32))
        if "fp16" in allowed:
            builders["fp16"] = lambda: slim(fp16_variant(fp32))
        if "int8-static" in allowed and not family.text_input:
            calib = served_input(
                config, pre, x_train[rng.permutation(len(x_train))[: self.settings.calibration_samples]], dtype
            )
            builders["int8-static"] = lambda: slim(int8_static_variant(fp32, calib))
            builders["int8-static-qop"] = lambda: slim(int8_static_variant(fp32, calib, operator_format=True))
            if "pruned" in allowed and self.settings.prune_fraction > 0:
                # built when its turn comes (a failure fails that variant only), once for both
                cache: list[bytes] = []

                def pruned() -> bytes:
                    if not cache:
                        cache.append(self._pruned(loaded, data, xh))
                    return cache[0]

                builders["pruned"] = lambda: slim(pruned())
                builders["pruned-int8"] = lambda: slim(int8_static_variant(pruned(), calib, operator_format=True))
        measured: list[Measured] = []
        blobs: dict[str, bytes] = {}
        errors: dict[str, str] = {}
        for name, build in builders.items():
            try:
                blob = build()
                measured.append(measure(name, blob, xh, y_hold, reference, self.settings.latency_runs, regression))
                blobs[name] = blob
            except Exception as exc:  # noqa: BLE001 - one variant failing does not fail the version
                errors[name] = f"{type(exc).__name__}: {exc}"
                log.warning("variant failed", model=model, version=version, variant=name, error=errors[name])
        chosen, within = choose(measured, self.settings.accuracy_budget, self.settings.objective)

        uris = {}
        for name, blob in blobs.items():
            uris[name] = self.store.put_bytes(MODELS_BUCKET, f"{model}/{version}/variants/{name}.onnx", blob)
        text = family.text_input
        # a text model's entry takes texts (BYTES) and tokenizes them with its own version's
        # tokenizer, which only the python-backend runner can: text entries use it everywhere
        served_in = TensorSpec(TEXT_INPUT, "string", (1,)) if text else TensorSpec(INPUT, xh.dtype.name, xh.shape[1:])
        spec = ModelSpec(
            name=model,
            inputs=(served_in,),
            outputs=(TensorSpec(OUTPUT, "float32", (config.num_classes,)),),
            max_batch_size=self.settings.max_batch_size,
            intra_op_threads=self.settings.intra_op_threads,
            backend=Backend.PYTHON_ONNXRUNTIME if text else Backend(self.settings.triton_backend),
        )
        files = {"tokenizer.json": json.dumps(pre.to_json()).encode()} if text else None
        fault = take_fault(self.settings.demo_fault_dir, model, version)
        served_blob = failing_onnx(tuple(xh.shape[1:]), config.num_classes, INPUT, OUTPUT, text) if fault else None
        repo = write_entry(self.store, spec, version, served_blob or blobs[chosen.name], files, self.signer)
        fp32_m = next(v for v in measured if v.name == "fp32")
        variants = [{**m.to_json(), "uri": uris[m.name], "within_budget": m.name in within} for m in measured] + [
            {"name": n, "uri": "", "error": e, "within_budget": False, **_EMPTY} for n, e in errors.items()
        ]
        reason = (
            f"chose {chosen.name} by {self.settings.objective}: {chosen.size_bytes} bytes "
            f"({chosen.size_bytes / fp32_m.size_bytes:.2f}x fp32), {metric_name(regression)} {chosen.accuracy:.4f} "
            f"(fp32 {fp32_m.accuracy:.4f}, budget {self.settings.accuracy_budget})"
        )
        if fault:
            reason += f"; DEMO FAULT: the Triton entry serves a model that fails on real inputs ({fault})"
            log.warning("demo fault: this version's Triton entry fails on real inputs", model=model, version=version)
        doc: dict[str, Any] = {
            "model": model,
            "version": version,
            "ok": True,
            "reason": reason,
            "chosen": chosen.name,
            "triton_repository_path": repo,
            "triton_bucket": TRITON_BUCKET,
            "parity_max_abs_diff": max_diff,
            "variants": variants,
            "duration_s": round(time.perf_counter() - start, 3),
        }
        if fault:
            doc["demo_fault"] = fault
        if self.signer is not None:  # lineage: who signed the entry, and what
            signed = self.store.get_json(TRITON_BUCKET, f"{model}/{version}/{SIGNATURE_FILE}")
            doc["signature"] = {k: signed[k] for k in ("algorithm", "key_id", "signature")}
        log.info("model version compressed", model=model, version=version, chosen=chosen.name, reason=doc["reason"])
        return doc

    def _pruned(self, loaded: LoadedModel, data: DatasetVersion, example: npt.NDArray[Any]) -> bytes:
        """The pruned model, fine-tuned through the shared core, exported as FP32 ONNX."""
        s = self.settings
        small = prune(loaded.module, loaded.config, s.prune_fraction)
        hp = dict(loaded.config.hparams)
        hp["epochs"] = s.prune_finetune_epochs
        hp["lr"] = float(hp.get("lr", 3e-3)) * s.prune_finetune_lr_scale
        split = split_version(data, 0.1, seed=0)
        if s.prune_finetune_records and len(split.x_train) > s.prune_finetune_records:
            keep = np.random.default_rng(0).permutation(len(split.x_train))[: s.prune_finetune_records]
            split = replace(split, x_train=split.x_train[keep], y_train=split.y_train[keep])
        fitted = fit(
            data.spec,
            split,
            hyperparameters(loaded.config.family, hp),
            seed=0,
            device="cpu",
            patience=0,
            module=small,
            preprocessor=loaded.preprocessor,  # what the kept weights were trained with
        )
        log.info(
            "pruned model fine-tuned",
            fraction=s.prune_fraction,
            parameters=parameters(fitted.module),
            parameters_before=parameters(loaded.module),
            val_accuracy=max((m.val_score for m in fitted.result.history), default=float("nan")),
        )
        served = Served(fitted.module, loaded.config, loaded.preprocessor, data.spec.dtype)
        return export_onnx(served.eval(), example)


_EMPTY: dict[str, Any] = {
    "size_bytes": 0,
    "accuracy": 0.0,
    "latency_p50_ms_b1": 0.0,
    "latency_p99_ms_b1": 0.0,
    "latency_p50_ms_b32": 0.0,
    "latency_p99_ms_b32": 0.0,
    "top1_agreement": 0.0,
}
