"""bench/trainer: samples/s of cdl's training loop against a bare PyTorch loop.

Same model (the digits CNN), same data (scikit-learn digits, repeated to
N samples, standardised), same batch size, same optimiser, in the same run,
on the device the trainer would pick (CUDA with bf16 autocast when present,
else CPU). cdl's figure is the wall time of the whole ``cdl.ml.train.train``
call — including its per-epoch validation on 10% extra data, best-weights
bookkeeping and early-stopping checks — over the training samples it
processed. Runs alternate (bare, cdl, bare, cdl, ...) and the median counts.

Goal (DESIGN.md): cdl >= 0.95 x bare.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, result
from cdl.ml.models import Family, ModelConfig, build_model
from cdl.ml.preprocess import Preprocessor
from cdl.ml.train import TrainConfig, pick_device, seed_everything, train

N = int(os.environ.get("CDL_BENCH_TRAINER_SAMPLES", "20000"))
EPOCHS = int(os.environ.get("CDL_BENCH_TRAINER_EPOCHS", "3"))
REPEATS = int(os.environ.get("CDL_BENCH_TRAINER_REPEATS", "5"))
BATCH = 64


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = load_digits()
    reps = -(-N // len(d.data))
    x = np.tile(d.data.reshape(-1, 1, 8, 8), (reps, 1, 1, 1))[:N].astype(np.float32)
    y = np.tile(d.target, reps)[:N].astype(np.int64)
    pre = Preprocessor.fit_tensor(x, per_feature=False)
    x = pre.transform(x)
    n_val = N // 10
    return x, y, x[:n_val].copy(), y[:n_val].copy()


def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(Family.CNN, (1, 8, 8), 10, {}))


def bare(x: np.ndarray, y: np.ndarray, device: torch.device) -> float:
    """The loop someone would write by hand."""
    net = model().to(device)
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    amp = device.type == "cuda"
    gen = seed_everything(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(EPOCHS):
        net.train()
        order = torch.randperm(len(xt), generator=gen).to(device)
        for i in range(0, len(xt), BATCH):
            idx = order[i : i + BATCH]
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return EPOCHS * len(xt) / (time.perf_counter() - start)


def cdl(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, device: torch.device) -> tuple[float, float]:
    """(whole-call samples/s, training-epochs-only samples/s)."""
    net = model()
    cfg = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=3e-3, weight_decay=1e-4, patience=0, device=device.type)
    start = time.perf_counter()
    res = train(net, x, y, xv, yv, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(res.history) * len(x) / (time.perf_counter() - start), res.samples_per_s


def main() -> None:
    device = pick_device("auto")
    x, y, xv, yv = data()
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"machine: {machine()}; device: {name}; torch {torch.__version__}")
    print(f"digits CNN, {N} samples, batch {BATCH}, {EPOCHS} epochs, {REPEATS} alternating repeats")
    bare(x[:2000], y[:2000], device)  # warm-up (allocator, kernels)
    bares, cdls, epochs_only = [], [], []
    for r in range(REPEATS):
        bares.append(bare(x, y, device))
        whole, loop = cdl(x, y, xv, yv, device)
        cdls.append(whole)
        epochs_only.append(loop)
        print(f"  repeat {r + 1}: bare {bares[-1]:,.0f} samples/s, cdl {whole:,.0f} (epochs only {loop:,.0f})")
    b, c, e = statistics.median(bares), statistics.median(cdls), statistics.median(epochs_only)
    print(f"median: bare {b:,.0f} samples/s, cdl {c:,.0f} samples/s, cdl epochs only {e:,.0f}")
    print(result(f"trainer_epochs_only_samples_per_s_{device.type}", e, b, op=">=", goal=0.95, unit="samples/s"))
    print(result(f"trainer_samples_per_s_{device.type}", c, b, op=">=", goal=0.95, unit="samples/s"))


if __name__ == "__main__":
    main()
