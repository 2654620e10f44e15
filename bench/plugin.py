"""bench/plugin: a user's model family as served.

The example plugin (examples/resnet_family: torchvision's ResNet-18 architecture, random
initial weights, its stem adapted to small images) is trained by the trainer's code on
scikit-learn's digits, compressed by the compressor's pipeline, and the variant it chooses is
loaded into Triton and scored on the holdout through Triton's gRPC API. Baselines, in the same
run: the FP32 PyTorch model's holdout accuracy, and the FP32 ONNX file's size.

Goals (issue 25): accuracy as served >= 0.995 x the FP32 PyTorch model's; compressed size
<= 0.5 x FP32.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, private_stack, result
from cdl.datasets import DatasetSpec, Task, load_version
from cdl.events import decode
from cdl.ml.train import evaluate
from cdl.registry import ModelRegistry
from cdl_tools.stack import stack_store
from services.compressor.compressor import Compressor
from services.compressor.settings import CompressorSettings
from services.trainer.settings import TrainerSettings
from services.trainer.trainer import Trainer
from tests.datasets import DatasetWriter


def main() -> None:
    import tritonclient.grpc as tgrpc

    print(f"machine: {machine()}; family resnet18 (examples/resnet_family) on digits 1x8x8, CPU")
    digits = load_digits()
    x = digits.data.reshape(-1, 1, 8, 8).astype(np.float32)
    with private_stack() as state:
        store = stack_store(state)
        name = f"bench-plugin-{uuid.uuid4().hex[:4]}"
        labels = tuple(str(i) for i in range(10))
        spec = DatasetSpec(
            name=name, task=Task.IMAGE, labels=labels, input_shape=(1, 8, 8), max_interval_s=1.0, family="resnet18"
        )
        writer = DatasetWriter(store, state["kafka"]["bootstrap"], "bench.unused", spec)
        rec = writer.version(x, [str(int(t)) for t in digits.target], [f"r{i}" for i in range(len(x))])
        registry = ModelRegistry(store)
        trainer = Trainer(TrainerSettings(max_epochs=10), store, registry, "/bench")
        out = trainer.handle(decode(rec.key, rec.value, list(rec.headers)))
        trained: Any = decode(out[0].key, out[0].value, list(out[0].headers)).payload
        print(f"trained v{trained.version}: {trained.verdict}, holdout {trained.metrics['holdout_accuracy']:.4f}")
        doc = Compressor(CompressorSettings(latency_runs=100), store, registry, "/bench").compress(trained)
        rows = {v["name"]: v for v in doc["variants"]}
        for v in rows.values():
            print(f"  {v['name']:<14} {v['size_bytes']:>10} bytes  accuracy {v['accuracy']:.4f}")
        print(f"chosen: {doc['chosen']} ({doc['reason']})")

        loaded = registry.load(name, trained.version)
        data = load_version(store, name, 1)
        x_hold, y_hold = data.subset(holdout=True)
        xh = np.asarray(x_hold, dtype=np.float32)
        cpu = torch.device("cpu")
        _, fp32_acc = evaluate(loaded.module, loaded.preprocessor.transform(xh), np.asarray(y_hold), cpu)

        client = tgrpc.InferenceServerClient(state["triton"][0]["grpc"])
        client.load_model(name)
        got = []
        for i in range(0, len(xh), 64):
            inp = tgrpc.InferInput("input", list(xh[i : i + 64].shape), "FP32")
            inp.set_data_from_numpy(xh[i : i + 64])
            got.append(client.infer(name, [inp]).as_numpy("logits"))
        served_acc = float((np.concatenate(got).argmax(1) == np.asarray(y_hold)).mean())
        client.close()
    chosen, fp32 = rows[doc["chosen"]], rows["fp32"]
    print(f"holdout accuracy: served {served_acc:.4f}, FP32 PyTorch {fp32_acc:.4f}")
    print()
    print(result("plugin_accuracy_as_served", served_acc, fp32_acc, op=">=", goal=0.995))
    print(result("plugin_compressed_size", chosen["size_bytes"], fp32["size_bytes"], op="<=", goal=0.5, unit="bytes"))


if __name__ == "__main__":
    main()
