"""The training loop shared by trainer and tuner.

Tensors live on the device for the whole run (cdl's datasets are small enough),
batches are index slices of them, and nothing synchronises with the device
inside an epoch except the optimiser itself: the loop is meant to cost no more
than a hand-written one (``bench/trainer.py`` measures that).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from cdl.ml import objective

__all__ = [
    "EpochMetrics",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "pick_device",
    "predict",
    "seed_everything",
    "train",
]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 6
    """Stop after this many epochs without a better validation loss (0: never)."""
    seed: int = 0
    device: str = "auto"
    """"auto" (CUDA when present), "cpu" or "cuda"."""
    amp: bool = True
    """bf16 autocast on CUDA."""
    regression: bool = False
    """Mean squared error on the first output, scored by R², instead of cross-entropy and
    accuracy (:mod:`cdl.ml.objective`)."""
    time_budget_s: float = 0.0
    """Stop before an epoch that would end past this many seconds of training (the last epoch's
    time tells); at least one epoch runs. 0: no limit."""


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    val_loss: float
    val_score: float
    """The task's score on the validation part: accuracy, or R² (:mod:`cdl.ml.objective`)."""
    seconds: float
    samples_per_s: float

    def to_json(self) -> dict[str, float]:
        return asdict(self)


#: called after each epoch; returning False stops training (tuner pruning)
EpochCallback = Callable[[EpochMetrics], bool]


@dataclass
class TrainResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[EpochMetrics] = field(default_factory=list)
    device: str = "cpu"
    duration_s: float = 0.0
    samples_per_s: float = 0.0
    stopped_early: bool = False
    stopped_by_callback: bool = False
    stopped_by_budget: bool = False


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _adamw(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (one kernel for all parameters) where this torch build has it."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _tensor(a: npt.NDArray[Any], device: torch.device) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # a memory-mapped split (a study's workers): torch wants its own
        a = a.copy()
    return torch.from_numpy(a).to(device)


def train(
    model: nn.Module,
    x_train: npt.NDArray[Any],
    y_train: npt.NDArray[Any],
    x_val: npt.NDArray[Any],
    y_val: npt.NDArray[Any],
    cfg: TrainConfig,
    callback: EpochCallback | None = None,
) -> TrainResult:
    """Train with AdamW and the task's loss; keep the weights of the best validation loss."""
    gen = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model.to(device)
    reg = cfg.regression
    xt, yt = _tensor(x_train, device), objective.target_tensor(y_train, device, reg)
    xv, yv = _tensor(x_val, device), objective.target_tensor(y_val, device, reg)
    opt = _adamw(model, cfg)
    use_amp = cfg.amp and device.type == "cuda"
    n = len(xt)
    result = TrainResult(best_state=copy.deepcopy(model.state_dict()), best_epoch=0, device=str(device))
    best_val = float("inf")
    since_best = 0
    start = time.perf_counter()
    seen = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=gen).to(device)
        total = torch.zeros((), device=device)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = objective.loss(model(xt[idx]), yt[idx], reg)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += loss.detach() * len(idx)
        train_loss = float(total) / n
        seconds = time.perf_counter() - t0
        seen += n
        val_loss, val_score = _evaluate_tensors(model, xv, yv, use_amp, reg)
        metrics = EpochMetrics(epoch, train_loss, val_loss, val_score, seconds, n / seconds)
        result.history.append(metrics)
        if val_loss < best_val - 1e-6:
            best_val, since_best = val_loss, 0
            result.best_epoch = epoch
            result.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            since_best += 1
        if callback is not None and not callback(metrics):
            result.stopped_by_callback = True
            break
        if cfg.patience and since_best >= cfg.patience:
            result.stopped_early = True
            break
        elapsed = time.perf_counter() - start
        if cfg.time_budget_s and epoch < cfg.epochs and elapsed + seconds > cfg.time_budget_s:
            result.stopped_by_budget = True
            break
    result.duration_s = time.perf_counter() - start
    train_time = sum(m.seconds for m in result.history)
    result.samples_per_s = seen / train_time if train_time else 0.0
    model.load_state_dict(result.best_state)
    return result


@torch.no_grad()
def _evaluate_tensors(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool, regression: bool = False
) -> tuple[float, float]:
    """(mean loss, score) of ``model`` on tensors already on its device."""
    if len(x) == 0:
        return float("nan"), float("nan")
    model.eval()
    loss = torch.zeros((), device=x.device)
    sums = torch.zeros(3 if regression else 1, device=x.device)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        for i in range(0, len(x), 1024):
            out = model(x[i : i + 1024]).float()
            loss += objective.loss(out, y[i : i + 1024], regression, reduction="sum")
            sums += objective.score_sums(out, y[i : i + 1024], regression)
    return float(loss) / len(x), objective.sums_score(sums, len(x), regression)


@torch.no_grad()
def predict(
    model: nn.Module, x: npt.NDArray[Any], device: torch.device | None = None, batch_size: int = 1024
) -> npt.NDArray[np.float32]:
    """Logits for ``x`` (already preprocessed)."""
    device = device or next(model.parameters()).device
    model.to(device).eval()
    outs = []
    for i in range(0, len(x), batch_size):
        outs.append(model(_tensor(x[i : i + batch_size], device)).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), dtype=np.float32)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: npt.NDArray[Any],
    y: npt.NDArray[Any],
    device: torch.device,
    amp: bool = False,
    regression: bool = False,
) -> tuple[float, float]:
    """(mean loss, score) of ``model`` on ``x, y``: cross-entropy and accuracy, or for a
    regression mean squared error and R² (``y`` in the units the model outputs)."""
    if len(x) == 0:
        return float("nan"), float("nan")
    model.to(device).eval()
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        out = torch.from_numpy(predict(model, x, device))
    target = objective.target_tensor(y, torch.device("cpu"), regression)
    loss = float(objective.loss(out, target, regression))
    return loss, objective.score(out.numpy(), np.asarray(y), regression)
