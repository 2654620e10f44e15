"""Liveness probes and supervisor state: what the supervisor (``cdl_tools.stack.supervise``) and
``LocalStack.status()`` both read. Standard library only."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["describe_live", "probe_live", "read_supervisor_state"]


def probe_live(url: str, timeout_s: float = 5.0) -> tuple[int | None, str]:
    """``GET url``: (the HTTP status, or None when nothing answered; what the answer says).

    What it says: ``live`` for 200; for another status the body's ``stuck`` field (the
    service's watchdog names the loop and step that makes no progress), else ``HTTP <code>``;
    for no answer the error.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            code = int(resp.status)
            body = resp.read(64 * 1024)
    except urllib.error.HTTPError as exc:
        code, body = int(exc.code), exc.read(64 * 1024)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return None, str(getattr(exc, "reason", exc))
    if code == 200:
        return code, "live"
    try:
        stuck = json.loads(body).get("stuck")
    except (ValueError, AttributeError):
        stuck = None
    return code, str(stuck) if stuck else f"HTTP {code}"


def describe_live(url: str) -> str:
    """``live``, ``not live: <what is stuck>`` or ``down`` (nothing answers)."""
    code, detail = probe_live(url)
    if code is None:
        return "down"
    return "live" if code == 200 else f"not live: {detail}"


def read_supervisor_state(path: Path) -> dict[str, Any]:
    """A supervisor's state file, or ``{}`` when there is none (yet)."""
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return state
