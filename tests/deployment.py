"""What the deployment files (deploy/compose.yml, the Helm chart deploy/helm/cdl) are checked
against: the services, their settings classes, and the variables a service reads
(tests/unit/test_deploy.py, tests/unit/test_helm.py)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from cdl.settings import SHARED_FIELDS, SHARED_SWITCHES, ServiceSettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
#: the six cdl services and their settings classes (services/<name>/settings.py)
SERVICES = {
    "ingest": "IngestSettings",
    "trainer": "TrainerSettings",
    "tuner": "TunerSettings",
    "compressor": "CompressorSettings",
    "gateway": "GatewaySettings",
    "monitor": "MonitorSettings",
}
#: the connection fields and switches every service reads from the generic CDL_<FIELD> variables
SHARED_VARIABLES = frozenset(f"CDL_{f.upper()}" for f in SHARED_FIELDS + SHARED_SWITCHES)


def settings_class(name: str) -> type[ServiceSettings]:
    cls: type[ServiceSettings] = getattr(importlib.import_module(f"services.{name}.settings"), SERVICES[name])
    return cls


def unread_variables(names: Iterable[str], cls: type[BaseSettings], prefix: str) -> list[str]:
    """The variables of ``names`` that neither a shared connection field nor a field of ``cls``
    (under ``prefix``, e.g. ``CDL_INGEST_``) reads."""
    own = {prefix + f.upper() for f in cls.model_fields}
    return sorted(k for k in names if k not in SHARED_VARIABLES | own)


def configure(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str], state_dir: Path) -> None:
    """Make ``env`` the process's only CDL_* variables (and ``state_dir`` its state directory)."""
    for k in [k for k in os.environ if k.startswith("CDL_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CDL_STATE_DIR", str(state_dir))
