"""The gateway process imports no torch (nor anything that pulls it in)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_the_gateway_imports_no_torch() -> None:
    code = (
        "import sys; import services.gateway.app, services.gateway.__init__; "
        "heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'sklearn') if m in sys.modules); "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the gateway imported {out.stdout.strip()}"
