"""C helpers built on first use and loaded with ctypes (no Python build step).

Each source is compiled once per version (source, flags and link inputs hashed)
with the system C compiler into ``$CDL_HOME/native/`` and cached there;
``scripts/setup.sh`` builds them ahead of time. Without a compiler, ``load``
returns None and the caller takes its pure-Python path, saying so in the log.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cdl.logging import get_logger
from cdl.settings import cdl_home

__all__ = ["load"]

log = get_logger(__name__)

CFLAGS = ("-O3", "-std=c99", "-Wall", "-Werror", "-shared", "-fPIC")


def _build(source: Path, target: Path, link: Sequence[str]) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise FileNotFoundError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *CFLAGS, "-o", tmp, str(source), *link], check=True, capture_output=True, text=True)
        os.replace(tmp, target)  # atomic: concurrent builders race harmlessly
        for old in target.parent.glob(f"{source.stem}-*.so"):  # builds of earlier versions
            if old != target:
                old.unlink(missing_ok=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(source: Path, link: Sequence[str] = ("-lm",)) -> ctypes.CDLL | None:
    """Build ``source`` (once per version) and load it; None when that is impossible."""
    digest = hashlib.sha256(source.read_bytes() + " ".join([*CFLAGS, *link]).encode()).hexdigest()[:16]
    target = cdl_home() / "native" / f"{source.stem}-{digest}.so"
    try:
        if not target.exists():
            _build(source, target, link)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        log.warning("native helper unavailable; the pure-Python path runs instead", source=source.name, error=detail)
        return None
