"""Triton model control (services/gateway/rollout/control.py) against the session's two real Triton servers,
and the rollout state objects (services/gateway/rollout/state.py) in real MinIO."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as tgrpc

from cdl.errors import NotFoundError, PermanentError, UnavailableError
from cdl.store import ObjectStore
from cdl.triton import ModelSpec, TensorSpec, write_entry
from services.gateway.rollout.control import TritonControl
from services.gateway.rollout.machine import Action, RolloutManager, RolloutPolicy, RolloutState, Transition
from services.gateway.rollout.state import RolloutStore
from services.gateway.routing import Route, RoutingTable
from tests.models import write_affine

S = RolloutState

RNG = np.random.default_rng(7)
W1, B1 = RNG.normal(size=(4, 3)).astype(np.float32), np.zeros(3, np.float32)
W2, B2 = RNG.normal(size=(4, 3)).astype(np.float32), np.ones(3, np.float32)


@pytest.fixture
def control(triton_grpcs: list[str], object_store: ObjectStore) -> Iterator[TritonControl]:
    assert len(triton_grpcs) == 2
    ctl = TritonControl(triton_grpcs, object_store, timeout_s=60)
    yield ctl
    ctl.close()


def infer(endpoint: str, model: str, version: int) -> np.ndarray:
    client = tgrpc.InferenceServerClient(endpoint)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    tensor = tgrpc.InferInput("input", [2, 4], "FP32")
    tensor.set_data_from_numpy(x)
    out = client.infer(model, [tensor], model_version=str(version)).as_numpy("output")
    client.close()
    assert out is not None
    return out


def expected(w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.arange(8, dtype=np.float32).reshape(2, 4) @ w + b


class Hammer:
    """Requests to one version on every server, back to back, while something else happens."""

    def __init__(self, endpoints: list[str], model: str, version: int) -> None:
        self.endpoints, self.model, self.version = endpoints, model, version
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        clients = [tgrpc.InferenceServerClient(ep) for ep in self.endpoints]
        tensor = tgrpc.InferInput("input", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        while not self._stop.is_set():
            for client in clients:
                try:
                    client.infer(self.model, [tensor], model_version=str(self.version))
                    self.ok += 1
                except Exception as exc:  # every failure is the finding
                    self.failures.append(str(exc)[:200])
            time.sleep(0.01)

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)
        self._stop.set()
        self._thread.join(10)


def test_load_exact_versions_on_every_server_and_a_corrupt_version_leaves_the_stable_serving(
    control: TritonControl, object_store: ObjectStore, triton_grpcs: list[str]
) -> None:
    name = f"gwc_{uuid.uuid4().hex[:8]}"
    write_affine(object_store, name, 1, W1, B1)
    control.load(name, (1,))
    assert control.ready(name, 1)
    assert control.loaded_versions(name) == {ep: (1,) for ep in triton_grpcs}
    for ep in triton_grpcs:
        np.testing.assert_allclose(infer(ep, name, 1), expected(W1, B1), rtol=1e-5, atol=1e-5)

    # v2 beside v1: v1 keeps answering throughout the load
    write_affine(object_store, name, 2, W2, B2)
    with Hammer(triton_grpcs, name, 1) as hammer:
        control.load(name, (1, 2))
    assert hammer.failures == [] and hammer.ok > 0
    assert control.ready(name, 1) and control.ready(name, 2)
    assert control.loaded_versions(name) == {ep: (1, 2) for ep in triton_grpcs}
    control.warm(name, 2, 3)
    for ep in triton_grpcs:
        np.testing.assert_allclose(infer(ep, name, 2), expected(W2, B2), rtol=1e-5, atol=1e-5)

    # promotion: v1 leaves, v2 keeps answering
    with Hammer(triton_grpcs, name, 2) as hammer:
        control.load(name, (2,))
    assert hammer.failures == []
    assert control.loaded_versions(name) == {ep: (2,) for ep in triton_grpcs}
    assert not control.ready(name, 1)

    # a corrupt v3 (not ONNX): the load fails with Triton's reason, v2 serves before, during and after
    spec = ModelSpec(name, (TensorSpec("input", "float32", (4,)),), (TensorSpec("output", "float32", (3,)),), 16)
    write_entry(object_store, spec, 3, b"these bytes are not an ONNX model")
    with Hammer(triton_grpcs, name, 2) as hammer, pytest.raises(PermanentError) as failed:
        control.load(name, (2, 3), fallback=(2,))
    assert hammer.failures == [] and hammer.ok > 0
    message = str(failed.value)
    assert "Triton could not load the model" in message and "version 3" in message
    assert "restored [2]" in message and "Protobuf parsing failed" in message
    assert "At:" not in message  # the python backend's stack is left out
    assert control.loaded_versions(name) == {ep: (2,) for ep in triton_grpcs}
    for ep in triton_grpcs:
        np.testing.assert_allclose(infer(ep, name, 2), expected(W2, B2), rtol=1e-5, atol=1e-5)
    with pytest.raises(PermanentError):
        control.warm(name, 3, 1)
    control.warm(name, 2, 2)

    control.unload(name)
    assert control.loaded_versions(name) == {ep: () for ep in triton_grpcs}


def test_missing_entry_and_unreachable_server(
    control: TritonControl, object_store: ObjectStore, triton_grpcs: list[str]
) -> None:
    with pytest.raises(NotFoundError):
        control.load(f"missing_{uuid.uuid4().hex[:8]}", (1,))
    down = TritonControl([triton_grpcs[0], "127.0.0.1:1"], object_store, timeout_s=5)
    try:
        name = f"gwd_{uuid.uuid4().hex[:8]}"
        write_affine(object_store, name, 1, W1, B1)
        with pytest.raises(UnavailableError):
            down.load(name, (1,))
        assert not down.ready(name, 1)
        down.load(name, (1,), servers=[triton_grpcs[0]])  # the reachable one alone
        assert down.ready(name, 1, servers=[triton_grpcs[0]])
        down.unload(name, servers=[triton_grpcs[0]])
    finally:
        down.close()


def test_rollout_and_serving_objects_round_trip(object_store: ObjectStore) -> None:
    from cdl.registry import ModelRegistry  # the trainer's reader (imports torch; the test may)

    states = RolloutStore(object_store)
    name = f"gws_{uuid.uuid4().hex[:8]}"
    assert states.load(name) is None and states.serving(name) is None
    doc = {"format": 1, "model": name, "stable": 1, "candidate": 2, "phase": "canary", "step": 1}
    states.save(name, doc)
    assert states.load(name) == doc
    assert states.load_all()[name] == doc
    states.set_serving(name, 2)
    assert states.serving(name) == 2
    assert object_store.get_json("cdl-models", f"{name}/serving.json") == {"version": 2}
    assert ModelRegistry(object_store).serving(name) == 2


def carry_out(
    manager: RolloutManager, control: TritonControl, states: RolloutStore, todo: list[Transition]
) -> list[Transition]:
    """What the app does with transitions (in order, on one worker); returns the published ones."""
    published: list[Transition] = []
    while todo:
        t = todo.pop(0)
        if t.state is not None:
            published.append(t)
            if t.state is RolloutState.PROMOTED:
                states.set_serving(t.model, t.version)
        if t.action is Action.LOAD:
            try:
                control.load(t.model, t.load, fallback=t.fallback)
            except PermanentError as exc:
                todo += manager.loaded(t.model, t.version, False, str(exc))
            else:
                todo += manager.loaded(t.model, t.version, True)
        elif t.action is Action.WARM:
            try:
                control.warm(t.model, t.version, 2)
            except PermanentError as exc:
                todo += manager.warmed(t.model, t.version, False, str(exc))
            else:
                todo += manager.warmed(t.model, t.version, True)
        elif t.action is Action.SYNC:
            control.load(t.model, t.load)
    return published


def test_rollouts_driven_through_real_triton(
    control: TritonControl, object_store: ObjectStore, triton_grpcs: list[str]
) -> None:
    name = f"gwr_{uuid.uuid4().hex[:8]}"
    states = RolloutStore(object_store)
    table, now = RoutingTable(), [0.0]
    policy = RolloutPolicy(canary_steps=(0.5, 1.0), min_samples=5, step_min_s=0.0, drain_s=0.0)
    manager = RolloutManager(table, policy, lambda: now[0], states.save)

    write_affine(object_store, name, 1, W1, B1)
    events = carry_out(manager, control, states, manager.begin(name, 1))
    assert [e.state for e in events] == [S.LOADED, S.PROMOTED]
    assert table.get(name) == Route(name, 1)
    assert states.serving(name) == 1 and control.loaded_versions(name) == {ep: (1,) for ep in triton_grpcs}

    write_affine(object_store, name, 2, W2, B2)
    events = carry_out(manager, control, states, manager.begin(name, 2))
    assert [(e.state, e.traffic) for e in events] == [(S.LOADED, 0.0), (S.CANARY, 0.5)], [e.reason for e in events]
    assert control.loaded_versions(name) == {ep: (1, 2) for ep in triton_grpcs}
    assert states.load(name) == manager.to_json(name)
    for _ in range(2):
        for _ in range(10):
            manager.served(name, 1, True, 0.002)
            manager.served(name, 2, True, 0.002)
        events = carry_out(manager, control, states, manager.tick())
    assert [e.state for e in events] == [S.PROMOTED]
    assert table.get(name) == Route(name, 2) and states.serving(name) == 2
    assert control.loaded_versions(name) == {ep: (2,) for ep in triton_grpcs}  # v1 unloaded

    spec = ModelSpec(name, (TensorSpec("input", "float32", (4,)),), (TensorSpec("output", "float32", (3,)),), 16)
    write_entry(object_store, spec, 3, b"not onnx either")
    events = carry_out(manager, control, states, manager.begin(name, 3))
    assert [e.state for e in events] == [S.FAILED]
    assert "version 3" in events[0].reason
    assert table.get(name) == Route(name, 2)
    assert control.loaded_versions(name) == {ep: (2,) for ep in triton_grpcs}
    for ep in triton_grpcs:
        np.testing.assert_allclose(infer(ep, name, 2), expected(W2, B2), rtol=1e-5, atol=1e-5)
    control.unload(name)
