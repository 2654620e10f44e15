"""The training loop shared by trainer and tuner.

Tensors live on the device for the whole run (cdl's datasets are small enough),
batches are index slices of them, and nothing synchronises with the device
inside an epoch except the optimiser itself (:func:`train`). A version larger
than memory streams its batches from its shards instead (:func:`train_batches`,
:mod:`cdl.ml.streaming`), and one training may run on several processes
(:class:`Replica`, :mod:`cdl.ml.distributed`): the loop is meant to cost no more
than a hand-written one (``bench/trainer.py`` measures that).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from cdl.ml import objective

__all__ = [
    "Batches",
    "EpochMetrics",
    "Replica",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "index_batches",
    "pick_device",
    "predict",
    "seed_everything",
    "train",
    "train_batches",
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


#: an epoch's training batches, given the epoch's number (from 1) and the loop's seeded generator
#: (the batch order's): (inputs, targets) on the model's device
Batches = Callable[[int, torch.Generator], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class Replica:
    """This process's place in a data-parallel training (torch.distributed, initialised by the
    caller: :mod:`cdl.ml.distributed`). The loop sums its epoch's figures over every process and
    takes their decisions together, so each stops at the same epoch with the same weights."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t


def index_batches(xt: torch.Tensor, yt: torch.Tensor, batch_size: int, replica: Replica | None = None) -> Batches:
    """Batches of tensors held whole: a seeded permutation each epoch, sliced ``batch_size`` at a
    time. Under a :class:`Replica` every process draws the same permutation and takes its share of
    each batch (``batch_size`` stays the batch over all processes: the same steps as one process
    takes); a last batch smaller than the processes are many is left out."""
    n = len(xt)
    rank, world = (replica.rank, replica.world_size) if replica is not None else (0, 1)

    def epoch(_: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(n, generator=gen).to(xt.device)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            if world > 1:
                if len(idx) < world:
                    return
                idx = idx[rank::world]
            yield xt[idx], yt[idx]

    return epoch


def train(
    model: nn.Module,
    x_train: npt.NDArray[Any],
    y_train: npt.NDArray[Any],
    x_val: npt.NDArray[Any],
    y_val: npt.NDArray[Any],
    cfg: TrainConfig,
    callback: EpochCallback | None = None,
    *,
    net: nn.Module | None = None,
    replica: Replica | None = None,
) -> TrainResult:
    """Train with AdamW and the task's loss; keep the weights of the best validation loss.

    ``net``: what computes the forward pass when it is not ``model`` itself (``model`` wrapped in
    DistributedDataParallel); ``replica``: this process's place in a data-parallel training."""
    device = pick_device(cfg.device)
    xt, yt = _tensor(x_train, device), objective.target_tensor(y_train, device, cfg.regression)
    batches = index_batches(xt, yt, cfg.batch_size, replica)
    return train_batches(model, batches, x_val, y_val, cfg, callback, net=net, replica=replica)


def train_batches(
    model: nn.Module,
    batches: Batches,
    x_val: npt.NDArray[Any],
    y_val: npt.NDArray[Any],
    cfg: TrainConfig,
    callback: EpochCallback | None = None,
    *,
    net: nn.Module | None = None,
    replica: Replica | None = None,
) -> TrainResult:
    """:func:`train`'s loop over batches from anywhere (tensors held whole, or shards streamed:
    :mod:`cdl.ml.streaming`). Under a :class:`replica` each process validates on its share of the
    validation part and the sums are added up; losses, scores, early stopping, the time budget and
    a callback's stop (the callback runs where it is given: on one process) are the same on all."""
    gen = seed_everything(cfg.seed)
    if replica is not None and replica.rank:  # dropout: each process its own draws, the batch order shared
        torch.manual_seed(cfg.seed + replica.rank)
    device = pick_device(cfg.device)
    model.to(device)
    forward = net if net is not None else model
    reg = cfg.regression
    if replica is not None and replica.world_size > 1:
        x_val, y_val = x_val[replica.rank :: replica.world_size], y_val[replica.rank :: replica.world_size]
    xv, yv = _tensor(x_val, device), objective.target_tensor(y_val, device, reg)
    opt = _adamw(model, cfg)
    use_amp = cfg.amp and device.type == "cuda"
    result = TrainResult(best_state=copy.deepcopy(model.state_dict()), best_epoch=0, device=str(device))
    best_val = float("inf")
    since_best = 0
    start = time.perf_counter()
    seen = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        forward.train()
        total = torch.zeros((), device=device)
        n = 0
        for xb, yb in batches(epoch, gen):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = objective.loss(forward(xb), yb, reg)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += loss.detach() * len(yb)
            n += len(yb)
        if replica is not None:
            sums = replica.sum(torch.stack([total.float(), torch.tensor(float(n), device=device)]))
            total, n = sums[0], int(sums[1])
        train_loss = float(total) / n if n else float("nan")
        seconds = time.perf_counter() - t0
        seen += n
        val_loss, val_score = _validate(model, xv, yv, use_amp, reg, replica)
        metrics = EpochMetrics(epoch, train_loss, val_loss, val_score, seconds, n / seconds)
        result.history.append(metrics)
        if val_loss < best_val - 1e-6:
            best_val, since_best = val_loss, 0
            result.best_epoch = epoch
            result.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            since_best += 1
        stop = callback is not None and not callback(metrics)
        elapsed = time.perf_counter() - start
        over = bool(cfg.time_budget_s and epoch < cfg.epochs and elapsed + seconds > cfg.time_budget_s)
        if replica is not None:  # one process's stop or budget stops them all
            flags = replica.max(torch.tensor([float(stop), float(over)], device=device))
            stop, over = bool(flags[0]), bool(flags[1])
        if stop:
            result.stopped_by_callback = True
            break
        if cfg.patience and since_best >= cfg.patience:
            result.stopped_early = True
            break
        if over:
            result.stopped_by_budget = True
            break
    result.duration_s = time.perf_counter() - start
    train_time = sum(m.seconds for m in result.history)
    result.samples_per_s = seen / train_time if train_time else 0.0
    model.load_state_dict(result.best_state)
    return result


def _validate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool, regression: bool, replica: Replica | None
) -> tuple[float, float]:
    """(mean loss, score) on the validation part: this process's share, summed over a replica's."""
    if replica is None:
        return _evaluate_tensors(model, x, y, amp, regression)
    sums = _evaluation_sums(model, x, y, amp, regression)
    sums = replica.sum(torch.cat([sums, torch.tensor([float(len(x))], device=sums.device)]))
    n = int(sums[-1])
    if n == 0:
        return float("nan"), float("nan")
    return float(sums[0]) / n, objective.sums_score(sums[1:-1], n, regression)


@torch.no_grad()
def _evaluation_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool, regression: bool) -> torch.Tensor:
    """[summed loss, *the score's sums] of ``model`` on tensors already on its device."""
    model.eval()
    sums = torch.zeros(4 if regression else 2, device=x.device)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        for i in range(0, len(x), 1024):
            out = model(x[i : i + 1024]).float()
            sums[0] += objective.loss(out, y[i : i + 1024], regression, reduction="sum")
            sums[1:] += objective.score_sums(out, y[i : i + 1024], regression)
    return sums


def _evaluate_tensors(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool, regression: bool = False
) -> tuple[float, float]:
    """(mean loss, score) of ``model`` on tensors already on its device."""
    if len(x) == 0:
        return float("nan"), float("nan")
    sums = _evaluation_sums(model, x, y, amp, regression)
    return float(sums[0]) / len(x), objective.sums_score(sums[1:], len(x), regression)


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
