"""One training on several processes: torch.distributed's DistributedDataParallel through torchrun.

:func:`train_distributed` is :func:`cdl.ml.train.train` on ``processes`` processes of this
machine. The calling process writes the job into a private folder (the module, already built
and warm-started, with its frozen parameters; the preprocessed arrays, or a
:class:`~cdl.ml.streaming.ShardStream`) and starts::

    python -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=N \\
        --max-restarts=0 -m cdl.ml._ddp_worker <folder>

Each process (:func:`worker_main`) joins the process group — gloo on CPU (over the loopback
interface), NCCL on CUDA, one GPU per process — within ``init_timeout_s``, wraps the module in
DistributedDataParallel (which makes every process start from rank 0's weights) and runs the
one training loop (:func:`cdl.ml.train.train_batches`) as a :class:`~cdl.ml.train.Replica`:
the batch over all processes is the hyperparameters' batch size, each process computes its
share, gradients are averaged, and validation, early stopping and the time budget are decided
together. The same seed gives one process and N processes the same batches (so the same model,
to rounding and dropout). Rank 0 appends each epoch's metrics to ``metrics.jsonl``, which the
caller relays to its callback (a callback returning False stops the run after the next epoch),
and writes the result (best weights, history) to ``result.pt``, which the caller reads back.

Failures: a process that raises writes its error to ``error-<rank>.json``; torchrun stops the
others and exits non-zero; the caller raises the error again — the same class when it is one of
cdl's (an :class:`~cdl.errors.InvalidInputError` stays one), else
:class:`~cdl.errors.DistributedTrainingError` with the process's traceback and torchrun's log.
The whole run has a deadline: past it, the process group is killed (SIGTERM, then SIGKILL) and
:class:`~cdl.errors.DistributedTrainingError` raised. Nothing waits unbounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from cdl import errors
from cdl.errors import ConfigError, DistributedTrainingError
from cdl.ml.train import EpochCallback, EpochMetrics, Replica, TrainConfig, TrainResult, pick_device

if TYPE_CHECKING:
    from cdl.ml.preprocess import Preprocessor
    from cdl.ml.streaming import ShardStream

__all__ = ["DistributedJob", "backend_for", "launch_command", "train_distributed", "worker_main"]

_ARRAYS = ("x_train", "y_train", "x_val", "y_val")


@dataclass(frozen=True)
class DistributedJob:
    """What every process of one distributed training reads (``job.pkl`` in the run's folder;
    the arrays beside it as ``.npy``)."""

    module: nn.Module
    cfg: TrainConfig
    preprocessor: Preprocessor | None = None
    """Streamed: the preprocessing each batch goes through (arrays come preprocessed)."""
    stream: ShardStream | None = None
    init_timeout_s: float = 120.0


def backend_for(device: str) -> str:
    """torch.distributed's backend for ``device`` ("auto", "cpu", "cuda"): NCCL on CUDA, else gloo."""
    return "nccl" if pick_device(device).type == "cuda" else "gloo"


def launch_command(folder: Path, processes: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={processes}",
        "--max-restarts=0",
        "-m",
        "cdl.ml._ddp_worker",
        str(folder),
    ]


def _environment(processes: int, backend: str) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])  # where cdl is imported from
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # each process its share of the cores (torchrun would give each one thread)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    if backend == "gloo":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: the loopback interface
    return env


def train_distributed(
    module: nn.Module,
    cfg: TrainConfig,
    x_train: npt.NDArray[Any] | None,
    y_train: npt.NDArray[Any] | None,
    x_val: npt.NDArray[Any],
    y_val: npt.NDArray[Any],
    *,
    processes: int,
    callback: EpochCallback | None = None,
    stream: ShardStream | None = None,
    preprocessor: Preprocessor | None = None,
    timeout_s: float = 0.0,
    init_timeout_s: float = 120.0,
) -> TrainResult:
    """Train ``module`` as :func:`cdl.ml.train.train` does, on ``processes`` processes (DDP);
    the best weights are loaded into ``module``. Preprocessed arrays, or with ``stream`` the
    records it streams (``x_train``/``y_train`` None) through ``preprocessor``.
    ``timeout_s``: the deadline of the whole run (0: none)."""
    backend = backend_for(cfg.device)
    if backend == "nccl" and processes > torch.cuda.device_count():
        raise ConfigError("more training processes than GPUs", processes=processes, gpus=torch.cuda.device_count())
    folder = Path(tempfile.mkdtemp(prefix="cdl-ddp-"))  # 0700: the job may hold the store's credentials
    try:
        arrays = {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}
        for name, arr in arrays.items():
            if arr is not None:
                np.save(folder / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
        job = DistributedJob(module.to("cpu"), cfg, preprocessor, stream, init_timeout_s)
        with (folder / "job.pkl").open("wb") as f:
            pickle.dump(job, f)
        _run(folder, processes, backend, callback, timeout_s)
        doc = torch.load(folder / "result.pt", weights_only=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = TrainResult(
        best_state=doc["best_state"],
        best_epoch=int(doc["best_epoch"]),
        history=[EpochMetrics(**m) for m in doc["history"]],
        device=str(doc["device"]),
        duration_s=float(doc["duration_s"]),
        samples_per_s=float(doc["samples_per_s"]),
        stopped_early=bool(doc["stopped_early"]),
        stopped_by_callback=bool(doc["stopped_by_callback"]),
        stopped_by_budget=bool(doc["stopped_by_budget"]),
    )
    module.load_state_dict(result.best_state)
    return result


def _run(folder: Path, processes: int, backend: str, callback: EpochCallback | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else float("inf")
    relayed = 0
    with (folder / "torchrun.log").open("wb") as log:
        proc = subprocess.Popen(
            launch_command(folder, processes),
            env=_environment(processes, backend),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped as one
        )
        try:
            while True:
                try:
                    rc: int | None = proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    rc = None
                relayed = _relay(folder, relayed, callback)
                if rc is not None:
                    break
                if time.monotonic() > deadline:
                    raise DistributedTrainingError(
                        "distributed training passed its deadline; its processes were stopped",
                        timeout_s=timeout_s,
                        log=_tail(folder / "torchrun.log"),
                    )
        finally:
            _stop(proc)
    if rc != 0:
        raise _failure(folder, rc)


def _relay(folder: Path, relayed: int, callback: EpochCallback | None) -> int:
    """Hand the epochs rank 0 finished since the last call to ``callback``; a False asks the
    processes to stop (the ``stop`` file, which rank 0 reads after each epoch)."""
    path = folder / "metrics.jsonl"
    if callback is None or not path.exists():
        return relayed
    lines = path.read_text().splitlines()
    for line in lines[relayed:]:
        if line.endswith("}") and not callback(EpochMetrics(**json.loads(line))):
            (folder / "stop").touch()
    return len([line for line in lines if line.endswith("}")])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop torchrun and every process it started (its process group), politely first."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


#: what a process that died in native code (gloo, an abort) writes: kept from anywhere in the log
_NATIVE_FAILURE = ("terminate called", "what():", "Exception", "Error:", "Aborted", "Signal ")


def _tail(path: Path, chars: int = 2000) -> str:
    """The log's last ``chars``, after the lines from before them that say why a process died
    in native code (no Python error of its own: only torchrun's report would be left)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    head, tail = text[:-chars], text[-chars:]
    why = [line for line in head.splitlines() if any(m in line for m in _NATIVE_FAILURE)][-10:]
    return "\n".join([*why, "...", tail]) if why else tail


def _failure(folder: Path, rc: int) -> errors.CdlError:
    """The error of the lowest rank that wrote one: cdl's own class when it raised one of cdl's."""
    for path in sorted(folder.glob("error-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        doc = json.loads(path.read_text())
        cls = getattr(errors, doc["type"], None) if doc.get("module") == errors.__name__ else None
        if isinstance(cls, type) and issubclass(cls, errors.CdlError):
            return cls(doc["message"], rank=doc["rank"])
        return DistributedTrainingError(
            f"training process {doc['rank']} failed: {doc['type']}: {doc['message']}",
            traceback=doc["traceback"][-2000:],
        )
    return DistributedTrainingError("distributed training failed", exit_code=rc, log=_tail(folder / "torchrun.log"))


# --------------------------------------------------------------------------- in each process


def worker_main(folder: str) -> None:
    """One process of the training (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous)."""
    rank = int(os.environ.get("RANK", "0"))
    path = Path(folder)
    try:
        _work(path, rank, int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    except BaseException as exc:
        doc = {
            "rank": rank,
            "type": type(exc).__name__,
            "module": type(exc).__module__,
            "message": exc.message if isinstance(exc, errors.CdlError) else str(exc),
            "traceback": traceback.format_exc(),
        }
        (path / f"error-{rank}.json").write_text(json.dumps(doc))
        raise


def _work(folder: Path, rank: int, local_rank: int, world: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cdl.ml.train import train, train_batches

    with (folder / "job.pkl").open("rb") as f:
        job: DistributedJob = pickle.load(f)  # written by the process that started this one, in its 0700 folder
    cfg = job.cfg
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=job.init_timeout_s))
    try:
        module = job.module.to(device)
        net = DistributedDataParallel(module, device_ids=[local_rank] if device.type == "cuda" else None)
        replica = Replica(rank, world)
        callback = _epoch_writer(folder) if rank == 0 else None
        arrays = {
            n: np.load(folder / f"{n}.npy", allow_pickle=False) for n in _ARRAYS if (folder / f"{n}.npy").exists()
        }
        if job.stream is not None:
            assert job.preprocessor is not None
            batches = job.stream.batches(job.preprocessor, cfg.batch_size, device, replica)
            result = train_batches(
                module, batches, arrays["x_val"], arrays["y_val"], cfg, callback, net=net, replica=replica
            )
        else:
            result = train(
                module,
                arrays["x_train"],
                arrays["y_train"],
                arrays["x_val"],
                arrays["y_val"],
                cfg,
                callback,
                net=net,
                replica=replica,
            )
        if rank == 0:
            doc = {
                "best_state": result.best_state,
                "best_epoch": result.best_epoch,
                "history": [m.to_json() for m in result.history],
                "device": result.device,
                "duration_s": result.duration_s,
                "samples_per_s": result.samples_per_s,
                "stopped_early": result.stopped_early,
                "stopped_by_callback": result.stopped_by_callback,
                "stopped_by_budget": result.stopped_by_budget,
            }
            torch.save(doc, folder / "result.pt.part")
            (folder / "result.pt.part").rename(folder / "result.pt")
    finally:
        dist.destroy_process_group()


def _epoch_writer(folder: Path) -> EpochCallback:
    def write(m: EpochMetrics) -> bool:
        with (folder / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(asdict(m)) + "\n")
        return not (folder / "stop").exists()

    return write
