"""bench/compressor: the variant table for the digits CNN and an MLP.

Trains each model with the trainer's code on scikit-learn's digits (the CNN on
8x8 images, the MLP on the 64 features as a tabular task), runs the
compressor's pipeline (ONNX export + parity check, FP32 / dynamic INT8 /
static INT8 / FP16 / pruned / pruned INT8, each measured with ONNX Runtime on
one CPU thread) and prints the table. Baseline: FP32 measured in the same run.

The RESULT lines report the variant the compressor chose (what Triton serves).
Goals (DESIGN.md): size <= 0.30 x FP32, CPU latency (p50, batch 32) <= 0.6 x
FP32, accuracy drop <= 0.5 point.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, private_stack, result
from cdl.datasets import DatasetSpec, Task
from cdl.events import decode
from cdl.registry import ModelRegistry
from cdl.store import ObjectStore
from cdl_tools.stack import stack_store
from services.compressor.compressor import Compressor
from services.compressor.settings import CompressorSettings
from services.trainer.settings import TrainerSettings
from services.trainer.trainer import Trainer
from tests.datasets import DatasetWriter


def run_one(store: ObjectStore, bootstrap: str, task: Task, shape: tuple[int, ...]) -> dict[str, Any]:
    digits = load_digits()
    x = digits.data.reshape(-1, *shape).astype(np.float32)
    name = f"bench-{task.value.split('_')[0]}-{uuid.uuid4().hex[:4]}"
    spec = DatasetSpec(
        name=name, task=task, labels=tuple(str(i) for i in range(10)), input_shape=shape, max_interval_s=1.0
    )
    writer = DatasetWriter(store, bootstrap, "bench.unused", spec)
    rec = writer.version(x, [str(int(t)) for t in digits.target], [f"r{i}" for i in range(len(x))])
    registry = ModelRegistry(store)
    out = Trainer(TrainerSettings(), store, registry, "/bench").handle(decode(rec.key, rec.value, list(rec.headers)))
    trained = decode(out[0].key, out[0].value, list(out[0].headers))
    return Compressor(CompressorSettings(latency_runs=300), store, registry, "/bench").compress(trained.payload)  # type: ignore[arg-type]


def table(title: str, doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows = {v["name"]: v for v in doc["variants"]}
    fp32 = rows["fp32"]
    print(f"\n{title}: chosen {doc['chosen']} ({doc['reason']})")
    head = ("variant", "bytes", "size x", "acc", "b1 p50", "b1 p99", "b32 p50", "b32 p99", "lat x")
    widths = (16, 9, 8, 8, 9, 9, 9, 9, 7)
    print("".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(head, widths, strict=True))))
    for v in rows.values():
        print(
            f"{v['name']:<16}{v['size_bytes']:>9}{v['size_bytes'] / fp32['size_bytes']:>8.2f}{v['accuracy']:>8.4f}"
            f"{v['latency_p50_ms_b1']:>9.3f}{v['latency_p99_ms_b1']:>9.3f}{v['latency_p50_ms_b32']:>9.3f}"
            f"{v['latency_p99_ms_b32']:>9.3f}{v['latency_p50_ms_b32'] / fp32['latency_p50_ms_b32']:>7.2f}"
        )
    return rows


def main() -> None:
    print(f"machine: {machine()}; ONNX Runtime CPU, 1 intra-op thread; latency in ms")
    with private_stack() as state:
        store = stack_store(state)
        bootstrap = state["kafka"]["bootstrap"]
        cnn_doc = run_one(store, bootstrap, Task.IMAGE, (1, 8, 8))
        cnn = table("digits CNN", cnn_doc)
        mlp_doc = run_one(store, bootstrap, Task.TABULAR, (64,))
        mlp = table("digits MLP (tabular)", mlp_doc)
    lines = []
    for label, rows, doc in (("mlp", mlp, mlp_doc), ("cnn", cnn, cnn_doc)):
        fp32 = rows["fp32"]
        best = rows[doc["chosen"]]  # what the compressor chose (and Triton serves)
        drop = (fp32["accuracy"] - best["accuracy"]) * 100
        print(f"{label}: the compressor chose {best['name']}; accuracy drop {drop:.2f} points (goal <= 0.5)")
        lines.append(
            result(f"compressor_{label}_int8_accuracy", best["accuracy"], fp32["accuracy"], op=">=", goal=0.995)
        )
        lines.append(
            result(
                f"compressor_{label}_int8_latency_b32",
                best["latency_p50_ms_b32"],
                fp32["latency_p50_ms_b32"],
                op="<=",
                goal=0.6,
                unit="ms",
            )
        )
        lines.append(
            result(
                f"compressor_{label}_int8_size",
                best["size_bytes"],
                fp32["size_bytes"],
                op="<=",
                goal=0.30,
                unit="bytes",
            )
        )
    print()
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
