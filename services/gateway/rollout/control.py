"""Triton model control: which versions of a model every Triton server holds.

The Triton servers run in explicit model-control mode, so nothing loads unless
the gateway asks. :meth:`TritonControl.load` loads a model with exactly the
versions it names: it reads the entry's ``config.pbtxt`` from the repository
in MinIO (``cdl-triton/<model>/config.pbtxt``), replaces its
``version_policy`` with ``specific { versions: [...] }`` and sends that as the
config override of Triton's load request, so the compressor writing a newer
entry never changes what is loaded.

What Triton (2.51, explicit mode, checked by tests/integration/test_gateway_control.py)
does with such a load:

* a version loaded before and named again is not reloaded: it answers
  throughout the load of a new one beside it (no failed request);
* versions left out are unloaded asynchronously: the load returns while they
  are ``UNLOADING`` (not ready; gone a few seconds later); ``unload`` too;
* a load in which a version fails (e.g. bytes that are not ONNX) returns
  INVALID_ARGUMENT, "load failed for model 'm': version 3 is at UNAVAILABLE
  state: ..."; the versions that were loaded stay loaded and keep answering
  (even those the failed config left out), the bad one is ``UNAVAILABLE``.

So a failed load leaves the stable version serving on that server. With
several servers it may still succeed on some and fail on others; with
``fallback`` the versions that served before are loaded again on every server
(which unloads the new one where it did load, and is a no-op elsewhere) and
checked ready before the error is raised.

Synchronous (``tritonclient.grpc``): the app calls it from a worker thread,
off the event loop. Every call is made on all servers in parallel; calls for
one model are serialised (a per-model lock, reentrant). A caller that decides
*which* versions to load from state another thread changes holds
:meth:`TritonControl.holding` around the decision and the load, so that a
decision taken a moment ago never undoes a newer one (a server rejoining
while a candidate loads must not unload it). Errors: :class:`UnavailableError`
when a server cannot be reached (retry later), :class:`NotFoundError` for a
missing repository entry, :class:`PermanentError` with Triton's message for a
version that fails to load or to answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as tgrpc
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from cdl.errors import CdlError, NotFoundError, PermanentError, UnavailableError, UntrustedModelError
from cdl.logging import get_logger
from cdl.signing import TrustedKeys, config_matches, verify_entry
from cdl.store import BlobStore
from cdl.triton import TRITON_BUCKET

__all__ = ["TritonControl", "config_override", "warmup_inputs"]

log = get_logger(__name__)

T = TypeVar("T")

ModelConfig = model_config_pb2.ModelConfig


def config_override(config: Any, versions: Sequence[int]) -> str:
    """The JSON config of a load request that serves exactly ``versions`` of ``config``."""
    cfg = ModelConfig()
    cfg.CopyFrom(config)
    cfg.version_policy.specific.versions[:] = sorted(set(versions))
    return str(json_format.MessageToJson(cfg, preserving_proto_field_name=True, indent=None))


def warmup_inputs(config: Any) -> list[Any]:
    """One request's inputs shaped like the model's: batch 1, variable dimensions 1, zeros."""
    inputs = []
    for spec in config.input:
        dims = [int(d) if d > 0 else 1 for d in spec.dims]
        if config.max_batch_size > 0:
            dims = [1, *dims]
        datatype = model_config_pb2.DataType.Name(spec.data_type).removeprefix("TYPE_")
        if datatype == "STRING":
            datatype = "BYTES"
            data = np.full(dims, b"", dtype=np.object_)
        else:
            dtype = triton_to_np_dtype(datatype)
            if dtype is None:
                raise PermanentError("cannot warm up an input of this type", input=spec.name, data_type=datatype)
            data = np.zeros(dims, dtype=dtype)
        tensor = tgrpc.InferInput(spec.name, dims, datatype)
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    return inputs


def _error(exc: InferenceServerException, client: Any, what: str, **context: object) -> CdlError:
    """A Triton client error as a cdl error. Triton answers UNAVAILABLE both when it cannot be
    reached and when the version asked for is not ready: a server that is live was reached."""
    status = str(exc.status() or "")
    message = str(exc.message() or exc).split("\n\nAt:", 1)[0].strip()[:1000]  # not the python backend's stack
    if "UNAVAILABLE" in status and not _live(client):
        return UnavailableError(f"Triton server unreachable: {what}", triton=message, **context)
    if "NOT_FOUND" in status:
        return NotFoundError(f"{what}: not found", triton=message, **context)
    return PermanentError(what, triton=message, status=status.removeprefix("StatusCode."), **context)


def _live(client: Any) -> bool:
    try:
        return bool(client.is_server_live(client_timeout=2.0))
    except InferenceServerException:
        return False


class TritonControl:
    """Loads, unloads, checks and warms model versions on every Triton server."""

    def __init__(
        self,
        endpoints: Sequence[str],
        store: BlobStore,
        timeout_s: float = 120.0,
        trusted: TrustedKeys | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("no Triton servers")
        self.endpoints = tuple(endpoints)
        self._store = store
        #: with keys, every version is verified (cdl.signing) before any server loads it
        self._trusted = trusted if trusted else None
        self._timeout_s = timeout_s
        self._check_timeout_s = min(timeout_s, 10.0)
        self._clients = {ep: tgrpc.InferenceServerClient(ep) for ep in self.endpoints}
        self._pool = ThreadPoolExecutor(max_workers=len(self.endpoints), thread_name_prefix="triton-control")
        self._locks: dict[str, threading.RLock] = {}
        self._locks_lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for client in self._clients.values():
            client.close()

    # ------------------------------------------------------------------ the repository entry

    def config(self, model: str, text: bytes | None = None) -> Any:
        """``model``'s ``config.pbtxt`` from the repository (or ``text``, its bytes as already
        read), parsed (a ``ModelConfig``)."""
        key = f"{model}/config.pbtxt"
        if text is None:
            text = self._store.get_bytes(TRITON_BUCKET, key)  # NotFoundError when there is no entry
        cfg = ModelConfig()
        try:
            text_format.Parse(text.decode(), cfg)
        except (text_format.ParseError, UnicodeDecodeError) as exc:
            raise PermanentError("unreadable config.pbtxt", uri=f"s3://{TRITON_BUCKET}/{key}", error=str(exc)) from exc
        return cfg

    def verify(self, model: str, versions: Sequence[int]) -> bytes:
        """Refuse (:class:`~cdl.errors.UntrustedModelError`, saying why) unless each of
        ``versions`` is signed by a trusted key and unchanged since, and the model's
        ``config.pbtxt`` is one signed with one of them (the newest write of the compressor);
        returns that config, as read and checked."""
        assert self._trusted is not None
        docs = [verify_entry(self._store, TRITON_BUCKET, model, v, self._trusted) for v in versions]
        config = self._store.get_bytes(TRITON_BUCKET, f"{model}/config.pbtxt")
        if not any(config_matches(doc, config) for doc in docs):
            raise UntrustedModelError(f"{model}: config.pbtxt is not the one signed with v{max(versions)}")
        return config

    # ------------------------------------------------------------------ load and unload

    def load(
        self,
        model: str,
        versions: Sequence[int],
        fallback: Sequence[int] | None = None,
        servers: Sequence[str] | None = None,
    ) -> None:
        """Make every server (or ``servers``) hold exactly ``versions`` of ``model``, each ready.

        ``()`` unloads the model. If the load fails and ``fallback`` is given, ``fallback``
        is loaded again (and checked ready) before the error is raised; the error then
        says whether that worked (``fallback``/``fallback_error`` in its context).
        """
        wanted = tuple(sorted(set(versions)))
        targets = tuple(servers or self.endpoints)
        if not wanted:
            self.unload(model, targets)
            return
        # the config Triton is given is the one just verified (not read again)
        checked = self.verify(model, wanted) if self._trusted is not None else None
        cfg = self.config(model, checked)
        override = config_override(cfg, wanted)
        with self._lock(model):
            try:
                self._each(targets, lambda ep, client: self._load_one(ep, client, model, override, wanted))
            except CdlError as exc:
                if fallback is None:
                    raise
                raise self._restore(model, cfg, tuple(sorted(set(fallback))), targets, exc) from exc
        log.info("model loaded", model=model, versions=list(wanted), servers=list(targets))

    def _load_one(self, ep: str, client: Any, model: str, override: str, wanted: tuple[int, ...]) -> None:
        try:
            client.load_model(model, config=override, client_timeout=self._timeout_s)
        except InferenceServerException as exc:
            what = "Triton could not load the model"
            raise _error(exc, client, what, model=model, versions=list(wanted), server=ep) from exc
        for version in wanted:
            if not self._ready_one(client, model, version):
                raise PermanentError("version not ready after its load", model=model, version=version, server=ep)

    def _restore(
        self, model: str, cfg: Any, fallback: tuple[int, ...], targets: tuple[str, ...], error: CdlError
    ) -> CdlError:
        """Load ``fallback`` again after a failed load; returns ``error`` with what happened."""
        context: dict[str, object] = dict(error.context)
        try:
            if fallback:
                override = config_override(cfg, fallback)
                self._each(targets, lambda ep, client: self._load_one(ep, client, model, override, fallback))
            else:
                self._each(targets, lambda ep, client: self._unload_one(ep, client, model))
            context["fallback"] = f"restored {list(fallback)}"
            log.warning("load failed; previous versions restored", model=model, versions=list(fallback))
        except CdlError as exc:
            context["fallback_error"] = str(exc)
            log.error("load failed and the previous versions could not be restored", model=model, error=str(exc))
        return type(error)(error.message, **context)

    def unload(self, model: str, servers: Sequence[str] | None = None) -> None:
        """Unload every version of ``model`` (and wait until none is ready)."""
        with self._lock(model):
            self._each(tuple(servers or self.endpoints), lambda ep, client: self._unload_one(ep, client, model))

    def _unload_one(self, ep: str, client: Any, model: str) -> None:
        try:
            client.unload_model(model, client_timeout=self._timeout_s)
        except InferenceServerException as exc:
            raise _error(exc, client, "Triton could not unload the model", model=model, server=ep) from exc
        deadline = time.monotonic() + self._timeout_s
        while self._loaded_one(ep, client, model):  # Triton unloads asynchronously
            if time.monotonic() > deadline:
                raise UnavailableError("model still loaded after unload", model=model, server=ep)
            time.sleep(0.05)

    # ------------------------------------------------------------------ checks

    def ready(self, model: str, version: int, servers: Sequence[str] | None = None) -> bool:
        """Whether ``version`` is ready on every server (an unreachable server: not ready)."""
        try:
            return all(self._each(tuple(servers or self.endpoints), lambda _, c: self._ready_one(c, model, version)))
        except UnavailableError:
            return False

    def _ready_one(self, client: Any, model: str, version: int) -> bool:
        try:
            return bool(client.is_model_ready(model, str(version), client_timeout=self._check_timeout_s))
        except InferenceServerException as exc:
            error = _error(exc, client, "readiness check", model=model, version=version)
            if isinstance(error, UnavailableError):
                raise error from exc
            return False

    def loaded_versions(self, model: str, servers: Sequence[str] | None = None) -> dict[str, tuple[int, ...]]:
        """The versions of ``model`` each server has ready (from its repository index)."""
        targets = tuple(servers or self.endpoints)
        found = self._each(targets, lambda ep, client: self._loaded_one(ep, client, model))
        return dict(zip(targets, found, strict=True))

    def held(self, server: str) -> dict[str, tuple[int, ...]]:
        """Every model's ready versions on ``server`` (one repository index)."""

        def one(ep: str, client: Any) -> dict[str, tuple[int, ...]]:
            try:
                index = client.get_model_repository_index(client_timeout=self._check_timeout_s)
            except InferenceServerException as exc:
                raise _error(exc, client, "repository index", server=ep) from exc
            found: dict[str, set[int]] = {}
            for m in index.models:
                if m.state == "READY" and m.version:
                    found.setdefault(m.name, set()).add(int(m.version))
            return {name: tuple(sorted(versions)) for name, versions in found.items()}

        return self._each((server,), one)[0]

    def _loaded_one(self, ep: str, client: Any, model: str) -> tuple[int, ...]:
        try:
            index = client.get_model_repository_index(client_timeout=self._check_timeout_s)
        except InferenceServerException as exc:
            raise _error(exc, client, "repository index", server=ep) from exc
        versions = {int(m.version) for m in index.models if m.name == model and m.state == "READY" and m.version}
        return tuple(sorted(versions))

    # ------------------------------------------------------------------ warm-up

    def warm(self, model: str, version: int, n: int, servers: Sequence[str] | None = None) -> None:
        """Send ``n`` requests shaped like ``model``'s inputs to ``version`` on every server; raise if any fails."""
        if n <= 0:
            return
        inputs = warmup_inputs(self.config(model))

        def one(ep: str, client: Any) -> None:
            for i in range(n):
                try:
                    client.infer(model, inputs, model_version=str(version), client_timeout=self._timeout_s)
                except InferenceServerException as exc:
                    what = "warm-up request failed"
                    raise _error(exc, client, what, model=model, version=version, server=ep, request=i) from exc

        self._each(tuple(servers or self.endpoints), one)

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def holding(self, model: str) -> Iterator[None]:
        """No other thread loads or unloads ``model`` while this is held (reentrant)."""
        with self._lock(model):
            yield

    def _lock(self, model: str) -> threading.RLock:
        with self._locks_lock:
            lock = self._locks.get(model)
            if lock is None:
                lock = self._locks[model] = threading.RLock()
            return lock

    def _each(self, servers: tuple[str, ...], fn: Callable[[str, Any], T]) -> list[T]:
        """``fn(endpoint, client)`` on every server in parallel; the first permanent error wins over outages."""
        unknown = [ep for ep in servers if ep not in self._clients]
        if unknown:
            raise ValueError(f"unknown Triton servers {unknown}")
        futures = [self._pool.submit(fn, ep, self._clients[ep]) for ep in servers]
        results: list[T] = []
        errors: list[CdlError] = []
        for future in futures:
            try:
                results.append(future.result())
            except CdlError as exc:
                errors.append(exc)
        if errors:
            errors.sort(key=lambda e: isinstance(e, UnavailableError))
            raise errors[0]
        return results
