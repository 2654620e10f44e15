"""Settings of the compressor service (env prefix ``CDL_COMPRESSOR_``)."""

from __future__ import annotations

from typing import Literal

from pydantic_settings import SettingsConfigDict

from cdl.events import Topics
from cdl.settings import ServiceSettings

__all__ = ["CompressorSettings"]


class CompressorSettings(ServiceSettings):
    """Compressor: consumes model.trained (accepted), publishes model.compressed."""

    model_config = SettingsConfigDict(env_prefix="CDL_COMPRESSOR_", extra="ignore", use_attribute_docstrings=True)

    group_id: str = "cdl-compressor"
    """Consumer group over model.trained."""
    instance: str = ""
    """Instance name, unique among the group's live instances; the transactional id is
    ``<group_id>-<instance>``. Empty: the host's name (a pod's name; keep it stable across
    restarts, as a StatefulSet's is)."""
    trained_topic: str = Topics.MODEL_TRAINED
    """Topic with the trainer's verdicts."""
    compressed_topic: str = Topics.MODEL_COMPRESSED
    """Topic the variant tables go to."""
    deadletter_topic: str = Topics.DATA_DEADLETTER
    """Topic for events that cannot be handled."""
    parity_tolerance: float = 1e-3
    """Largest allowed |ONNX - PyTorch| logit difference on holdout samples."""
    parity_samples: int = 256
    """Holdout samples used for the parity check."""
    accuracy_budget: float = 0.005
    """A variant may lose at most this much holdout score against FP32 (accuracy: 0.005 = 0.5
    point; R² for a regression)."""
    objective: Literal["size", "cpu_latency", "gpu"] = "size"
    """What the best variant minimises: file size, CPU latency, or GPU serving (prefers FP16)."""
    calibration_samples: int = 256
    """Training samples used to calibrate static INT8."""
    latency_runs: int = 200
    """Timed runs per batch size for the latency figures."""
    triton_backend: Literal["python", "onnxruntime"] = "python"
    """Repository entry kind: the python-backend ONNX Runtime runner (local Triton) or onnxruntime_onnx."""
    max_batch_size: int = 64
    """max_batch_size of the Triton entry."""
    signing_key_file: str = ""
    """PEM file of the Ed25519 key the compressor signs each Triton entry with (cdl.signing; the
    gateway verifies it before loading); empty: entries go unsigned, and a gateway with trusted
    keys refuses them. Only the compressor holds it."""
    intra_op_threads: int = 1
    """ONNX Runtime's intra-op threads in each instance of the Triton entry (its
    ``intra_op_thread_count`` parameter, which both backends read)."""
    demo_fault_dir: str = ""
    """Where ``cdl demo`` asks for its bad candidate: a file ``<model>.failing`` there makes the
    next version of that model get a Triton entry that fails on real inputs (taken once;
    services/compressor/faults.py). Empty: off."""
    prune_fraction: float = 0.5
    """Structured pruning: share of channels (CNN) or hidden neurons (MLP) removed by L1 norm
    for the ``pruned`` and ``pruned-int8`` variants (0: no pruned variants)."""
    prune_finetune_records: int = 10_000
    """The pruned model fine-tunes on at most this many training records (a seeded sample; 0:
    all): a large version compresses in minutes."""
    prune_finetune_epochs: int = 3
    """Epochs the pruned model is fine-tuned on the version's train split (shared training core)."""
    prune_finetune_lr_scale: float = 0.3
    """The fine-tune's learning rate: the model's own times this."""

    def security_problems(self) -> list[str]:
        problems = super().security_problems()
        if not self.signing_key_file:
            problems.append("Triton entries go unsigned: no signing key (signing_key_file)")
        return problems
