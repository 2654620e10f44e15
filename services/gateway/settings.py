"""Settings of the gateway service (env prefix ``CDL_GATEWAY_``)."""

from __future__ import annotations

from typing import Literal

from pydantic_settings import SettingsConfigDict

from cdl.events import Topics
from cdl.settings import ServiceSettings, plaintext_endpoint

__all__ = ["GatewaySettings", "RolloutMode"]

RolloutMode = Literal["canary", "shadow", "manual"]


class GatewaySettings(ServiceSettings):
    """Gateway: the Open Inference Protocol endpoint in front of the Triton servers, and rollouts."""

    model_config = SettingsConfigDict(env_prefix="CDL_GATEWAY_", extra="ignore", use_attribute_docstrings=True)

    grpc_host: str = "127.0.0.1"
    """Address the gRPC server binds to."""
    grpc_port: int = 0
    """Port of the inference, ModelAdmin and health services; 0 picks a free one."""
    http_port: int = 0
    """Port of the REST/HTTP v2 endpoint (services/gateway/dataplane/rest.py), on ``grpc_host``; 0 picks a
    free one, -1: no REST endpoint."""
    data_plane: Literal["auto", "native", "python"] = "auto"
    """Who serves the gRPC port: ``native``, the gateway's Go lane (``services/gateway/dataplane/lane``:
    ModelInfer's common path forwarded natively, every other call and case handed to this
    process's Python server behind it); ``python``, this process's ``grpc.aio`` server alone;
    ``auto``, native where the lane is installed (``lane_path``), else python."""
    lane_path: str = ""
    """The native lane's program; empty: ``cdl-gwlane`` on ``PATH`` or in ``$CDL_HOME/bin``
    (scripts/setup.sh installs it there, the gateway's image in ``/usr/local/bin``). The
    gateway never compiles it: with none installed, ``auto`` serves in Python (a warning)."""
    group_id: str = "cdl-gateway"
    """Consumer group over model.compressed and gateway.commands: the member holding a model's
    partition is its rollout's single writer; the others follow it (docs/gateway.md, "Replicas")."""
    instance: str = ""
    """Instance name, unique among the group's live instances; the transactional id is
    ``<group_id>-<instance>``. Empty: the host's name (a pod's name; keep it stable across
    restarts, as a StatefulSet's is)."""
    compressed_topic: str = Topics.MODEL_COMPRESSED
    """Topic new model versions arrive on."""
    health_topic: str = Topics.MODEL_HEALTH
    """The monitor's health windows: accuracy on feedback of the stable and candidate versions
    (a candidate worse than the stable by ``max_accuracy_drop`` over ``min_feedback`` labelled
    answers is rolled back). Every instance reads all of it (a consumer of its own, from the end
    at start): the monitor's partitioner is not librdkafka's, so a model's windows may be on any
    partition; its writer applies them."""
    deployed_topic: str = Topics.MODEL_DEPLOYED
    """Topic rollout transitions are published to."""
    logged_topic: str = Topics.INFERENCE_LOGGED
    """Topic served requests are logged to."""
    commands_topic: str = Topics.GATEWAY_COMMANDS
    """Topic a ModelAdmin change made on an instance that does not own the model travels on to the
    owner, and its result back (keyed by model, with model.compressed's partition count)."""
    deadletter_topic: str = Topics.DATA_DEADLETTER
    """Topic undecodable or failed rollout events go to."""

    # ------------------------------------------------------------- access
    admin_key_hashes: list[str] = []
    """SHA-256 hex digests of the keys allowed to call ModelAdmin (an inference key,
    ``api_key_hashes``, never is one); empty: ModelAdmin is refused to everyone when inference
    keys are set, open when none is (an open gateway)."""
    key_rate: float = 0.0
    """Each API key's request budget, requests a second (a token bucket per key, at the native
    lane and the Python server alike; a ModelStreamInfer's requests count one by one): over it a
    request is refused with RESOURCE_EXHAUSTED (HTTP 429) while other keys are served; 0: none."""
    key_burst: int = 0
    """How many requests a key may send at once above its rate; 0: the rate, rounded up."""
    trusted_keys: list[str] = []
    """Public keys (``ed25519:<base64>``, JSON list) whose signatures on Triton entries the gateway
    accepts (cdl.signing): with any, a version without a valid signature by one of them, or
    changed since it was signed, is never loaded (its rollout fails, the reason in
    model.deployed); empty: entries are loaded unchecked (a warning at start)."""
    tls_cert_file: str = ""
    """PEM certificate chain for TLS; empty: plaintext."""
    tls_key_file: str = ""
    """PEM private key for TLS."""
    max_message_bytes: int = 16 << 20
    """Largest request or response message; a larger one is refused (RESOURCE_EXHAUSTED)."""
    default_timeout_s: float = 10.0
    """Deadline given to a request forwarded to Triton when the client set none."""
    stream_window: int = 64
    """Requests of one ModelStreamInfer stream in flight at once (more wait, in order)."""

    # ------------------------------------------------------------- inference log
    log_sample: float = 1.0
    """Fraction of requests logged to inference.logged (1: all)."""
    log_inputs_max_bytes: int = 4096
    """Inputs up to this size travel in the log record; larger ones as a SHA-256 digest."""
    log_queue: int = 10000
    """Log records waiting for Kafka at most; past that they are dropped and counted."""
    log_batch: int = 256
    """Requests of one model version logged in one Kafka record (``InferenceLoggedBatch``, keyed
    by model) at most; 1: a record per request (``InferenceLogged``, keyed by model too). What
    the log's readers pay per record (the monitor's Faust consumer: most of its cost) is paid once
    for the batch."""
    log_linger_ms: int = 200
    """How long the log gathers records before it builds and produces them in one round: fewer,
    larger rounds cost the log's thread (a round's fixed cost is a cold start of its code) and
    fewer, larger produce requests cost the broker less per record. Records reach Kafka up to
    this long after the answer; a gateway killed -9 loses what it held."""

    trace_sample: float = 0.01
    """Share of ModelInfer requests given a span of their own (cdl.tracing; a client's
    ``traceparent`` metadata becomes its parent); 1: every request, 0: none. Rollouts are
    always traced."""
    # ------------------------------------------------------------- rollouts
    rollout_mode: RolloutMode = "canary"
    """How a new version is rolled out: canary (a share of live traffic, stepping up),
    shadow (mirrored requests, answers compared) or manual (waits for Approve)."""
    rollout_modes: dict[str, RolloutMode] = {}
    """Per-model rollout mode, overriding ``rollout_mode`` (JSON: {"digits": "shadow"})."""
    canary_steps: list[float] = [0.1, 0.25, 0.5, 1.0]
    """Traffic shares a canary goes through before it is promoted."""
    shadow_share: float = 1.0
    """Share of live requests mirrored to a shadow candidate."""
    min_samples: int = 20
    """Candidate requests needed at each step before it may step up or be promoted."""
    step_min_s: float = 1.0
    """Shortest time at one canary step."""
    max_error_rate: float = 0.05
    """A candidate whose error rate exceeds the stable version's by more than this is rolled back."""
    max_errors: int = 3
    """Candidate errors that roll it back at once, whatever the sample count (fast rollback)."""
    max_latency_ratio: float = 2.0
    """A candidate whose p99 latency exceeds this multiple of the stable version's is rolled back."""
    min_agreement: float = 0.9
    """Shadow: top-1 agreement with the stable version needed for promotion."""
    max_accuracy_drop: float = 0.02
    """A candidate whose accuracy on feedback (model.health) is lower by more than this is rolled back."""
    min_feedback: int = 50
    """Feedback count per version needed before accuracy decides."""
    warmup_requests: int = 5
    """Requests shaped like the model's inputs sent to a loaded version before it takes traffic."""
    drain_s: float = 1.0
    """How long a version that lost its traffic (an old stable, a rolled back candidate) stays loaded,
    so requests already on their way to it finish, on every gateway instance: the others learn of
    the change from model.deployed within a few hundred milliseconds."""
    admin_forward_timeout_s: float = 10.0
    """How long a ModelAdmin change made on an instance that does not own the model waits for the
    owner's answer (or the call's deadline, if shorter); then DEADLINE_EXCEEDED, and an owner that
    reads the call later drops it."""
    follow_refresh_s: float = 5.0
    """How often an instance reads again the rollout documents of the models others drive (the
    safety net under model.deployed: a notification lost with a writer that died)."""
    health_interval_s: float = 1.0
    """How often each Triton server's readiness is checked."""
    health_misses: int = 3
    """Readiness checks in a row a Triton server may answer too late (a busy machine) before it
    leaves the pool; one that refuses the call or answers "not ready" leaves at once."""
    load_timeout_s: float = 120.0
    """Longest time a Triton load of a version may take."""

    def security_problems(self) -> list[str]:
        problems = super().security_problems()
        infer, admin = self.key_digests()
        if not infer:
            problems.append("inference is open: no API key is needed (api_key_hashes)")
            if not admin:
                problems.append("ModelAdmin is open: anyone may roll back or promote (admin_key_hashes)")
        if not self.trusted_keys:
            problems.append("models are loaded unchecked: no key is trusted to sign them (trusted_keys)")
        return problems + plaintext_endpoint(self.grpc_host, self.tls_cert_file, "inference and ModelAdmin")
