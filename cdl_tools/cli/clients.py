"""The one place that builds what the ``cdl`` commands talk to.

- the local stack and its recorded state (``stack.json``: endpoints, the API key);
- gRPC channels to the gateway and to ingest: TLS trusting the root ``--tls-ca``
  (``CDL_TLS_CA``) when it is given, plaintext otherwise (:func:`credentials` decides, for
  the admin and ingest stubs and for the inference client alike);
- the key of each call's scope as call metadata (inference, admin, ingest): ``--key``, else
  ``CDL_API_KEY`` / ``CDL_ADMIN_KEY`` / ``CDL_INGEST_KEY``, else the stack's;
- Kafka: the bootstrap servers, a producer and its delivery, readers of the topics;
- the object store (MinIO) of the stack.

What cannot be reached or read ends the command in one line (:mod:`cdl_tools.cli.output`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from cdl.errors import CdlError
from cdl_tools.cli.output import fail, rpc_error
from cdl_tools.settings import StackSettings
from cdl_tools.stack import LocalStack, use_stack_identity

if TYPE_CHECKING:
    import grpc

    from cdl.kafka import Producer
    from cdl.store import ObjectStore

__all__ = [
    "SCOPES",
    "ApiKey",
    "GatewayEndpoint",
    "IngestEndpoint",
    "Metadata",
    "StateDir",
    "admin_call",
    "api_key_metadata",
    "channel",
    "credentials",
    "deliver",
    "gateway",
    "inference_client",
    "ingest_call",
    "kafka_bootstrap",
    "kafka_reader",
    "local_stack",
    "object_store",
    "producer",
    "running_state",
    "service_endpoint",
    "set_tls_ca",
    "stack_state",
    "tls_ca",
]

StateDir = Annotated[
    Path | None,
    typer.Option("--state-dir", help="Stack state directory (default $CDL_STATE_DIR or ~/.cache/cdl/stack)."),
]
IngestEndpoint = Annotated[
    str | None, typer.Option("--ingest", help="Ingest gRPC endpoint host:port (default: from the local stack).")
]
GatewayEndpoint = Annotated[
    str | None, typer.Option("--gateway", help="Gateway gRPC endpoint host:port (default: from the local stack).")
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--key",
        help="The call's key (default: CDL_API_KEY for inference, CDL_ADMIN_KEY for admin, CDL_INGEST_KEY "
        "for ingest, else the local stack's).",
    ),
]

#: gRPC call metadata
Metadata = tuple[tuple[str, str | bytes], ...]

_T = TypeVar("_T")

#: the root ``--tls-ca`` (a PEM file of the CA that signed the servers' certificates), set by the
#: root command's callback before any command runs
_TLS_CA: dict[str, Path | None] = {"path": None}

# --------------------------------------------------------------------------- the stack


def local_stack(state_dir: Path | None, **overrides: Any) -> LocalStack:
    """The local stack recorded in ``state_dir`` (default: the settings'), with ``overrides``."""
    settings = StackSettings()
    if state_dir is not None:
        overrides["state_dir"] = state_dir
    if overrides:
        settings = settings.model_copy(update=overrides)
    return LocalStack(settings)


def stack_state(state_dir: Path | None) -> dict[str, Any]:
    """What the stack recorded (``{}`` when there is none); this process is then the stack's
    operator towards its broker when it is secured (``use_stack_identity``)."""
    state = local_stack(state_dir).read_state()
    use_stack_identity(state)
    return state


def running_state(state_dir: Path | None, *needs: str) -> dict[str, Any]:
    """The stack's state, which must name each of ``needs`` (``kafka``, ``minio``, …)."""
    state = stack_state(state_dir)
    if not all(state.get(need) for need in needs):
        fail("[red]no running stack: start it with cdl stack up[/]")
    return state


def service_endpoint(state: dict[str, Any], service: str, given: str | None) -> str:
    """``given``, else the gRPC endpoint of the stack's ``service`` (``--<service>`` names it)."""
    found = given or state.get("services", {}).get(service, {}).get("grpc")
    if not found:
        fail(f"[red]no {service} endpoint: start the stack (cdl stack up) or pass --{service}[/]")
    return str(found)


#: the stack's key of each scope (``stack.json``), and the environment variable that gives one
SCOPES = {"api_key": "CDL_API_KEY", "admin_key": "CDL_ADMIN_KEY", "ingest_key": "CDL_INGEST_KEY"}


def api_key_metadata(key: str | None, state: dict[str, Any], scope: str = "api_key") -> Metadata:
    """The key of ``scope`` (``api_key``: inference, ``admin_key``, ``ingest_key``) as call
    metadata: ``key`` (``--key``), else the scope's variable (``CDL_API_KEY``, ``CDL_ADMIN_KEY``,
    ``CDL_INGEST_KEY``), else the stack's (none: no metadata)."""
    key = key or os.environ.get(SCOPES[scope]) or state.get(scope)
    return (("authorization", f"Bearer {key}"),) if key else ()


# --------------------------------------------------------------------------- gRPC


def set_tls_ca(path: Path | None) -> None:
    """Talk TLS to the gRPC services, trusting the CA in ``path`` (None: plaintext)."""
    _TLS_CA["path"] = path


def tls_ca() -> bytes | None:
    """The PEM of the ``--tls-ca`` file, or None without one (unreadable: exit 2)."""
    path = _TLS_CA["path"]
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        fail(f"[red]cannot read the TLS CA {path}[/]: {exc}", 2)


def credentials(ca: bytes | None) -> grpc.ChannelCredentials | None:
    """TLS credentials trusting ``ca`` when one is given; None means plaintext."""
    if not ca:
        return None
    import grpc

    return grpc.ssl_channel_credentials(root_certificates=ca)


def channel(target: str) -> grpc.Channel:
    """A channel to ``target``: TLS with ``--tls-ca``, plaintext without."""
    import grpc

    creds = credentials(tls_ca())
    return grpc.secure_channel(target, creds) if creds is not None else grpc.insecure_channel(target)


def _unary(target: str, stub: Callable[[grpc.Channel], Any], method: str, request: Any, **call: Any) -> Any:
    import grpc

    try:
        with channel(target) as ch:
            return getattr(stub(ch), method)(request, **call)
    except grpc.RpcError as exc:
        raise rpc_error(exc) from exc


def ingest_call(
    endpoint: str | None, state_dir: Path | None, method: str, request: Any, *, key: str | None = None
) -> Any:
    """Call ``method`` of the ingest service (``--ingest``, else the stack's); one line if it fails."""
    from cdl.v1 import ingest_pb2_grpc

    state = stack_state(state_dir)
    target = service_endpoint(state, "ingest", endpoint)
    metadata = api_key_metadata(key, state, "ingest_key")
    return _unary(target, ingest_pb2_grpc.IngestServiceStub, method, request, timeout=10, metadata=metadata)


def gateway(
    endpoint: str | None, key: str | None, state_dir: Path | None, scope: str = "api_key"
) -> tuple[str, Metadata]:
    """The gateway's endpoint (``--gateway``, else the stack's) and the call metadata with the
    key of ``scope`` (inference; ``admin_key`` for ModelAdmin)."""
    state = stack_state(state_dir)
    return service_endpoint(state, "gateway", endpoint), api_key_metadata(key, state, scope)


def admin_call(endpoint: str | None, key: str | None, state_dir: Path | None, method: str, request: Any) -> Any:
    """Call ``method`` of the gateway's ModelAdmin service; one line if it fails."""
    from cdl.v1 import admin_pb2_grpc

    target, metadata = gateway(endpoint, key, state_dir, "admin_key")
    return _unary(target, admin_pb2_grpc.ModelAdminStub, method, request, timeout=30, metadata=metadata)


def inference_client(target: str) -> Any:
    """A ``tritonclient.grpc.InferenceServerClient`` of the gateway at ``target``, TLS with ``--tls-ca``."""
    import tritonclient.grpc as tgrpc

    return tgrpc.InferenceServerClient(target, creds=credentials(tls_ca()))


# --------------------------------------------------------------------------- Kafka and the object store


def kafka_bootstrap(given: str | None, state_dir: Path | None, option: str) -> str:
    """``given``, else the stack's Kafka bootstrap servers (``option`` is the flag that gives
    them); one line at once when no broker listens there."""
    bootstrap = given or stack_state(state_dir).get("kafka", {}).get("bootstrap")
    if not bootstrap:
        fail(f"[red]no Kafka: start the stack (cdl stack up) or pass {option}[/]")
    _listening(str(bootstrap))
    return str(bootstrap)


def _listening(bootstrap: str, timeout_s: float = 2.0) -> None:
    """Fail in one line when no address of ``bootstrap`` accepts a connection: a stopped stack
    is said at once, not after the Kafka client's own timeouts (seconds)."""
    import socket

    refused: list[str] = []
    for address in bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout_s):
                return
        except (OSError, ValueError) as exc:
            refused.append(f"{address.strip()} ({exc})")
    fail(f"[red]kafka unreachable[/]: no broker answers at {', '.join(refused)}; is the stack up (cdl stack up)?")


def producer(bootstrap: str, message_timeout_ms: int) -> Producer:
    """A producer of the command line; a record not delivered in ``message_timeout_ms`` fails."""
    from cdl.kafka import Producer

    return Producer(bootstrap, client_id="cdl-cli", **{"message.timeout.ms": message_timeout_ms, "log_level": 0})


def deliver(sender: Producer, timeout_s: float, failure: str) -> None:
    """Wait until what ``sender`` took is delivered; ``failure`` and the errors in one line if not."""
    try:
        sender.flush(timeout_s)
    except CdlError as exc:
        fail(f"[red]{failure}[/]: {exc}")


def kafka_reader(bootstrap: str, open_reader: Callable[[str], _T]) -> _T:
    """``open_reader(bootstrap)``, a reader of the stack's topics; Kafka unreachable is one line."""
    _listening(bootstrap)
    try:
        return open_reader(bootstrap)
    except Exception as exc:  # noqa: BLE001 - one line for the user, not a traceback
        fail(f"[red]kafka unreachable[/]: {exc}")


def object_store(state: dict[str, Any]) -> ObjectStore:
    """The stack's object store (``state`` names its ``minio``)."""
    from cdl_tools.stack import stack_store

    return stack_store(state)
