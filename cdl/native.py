"""C helpers built on first use and loaded with ctypes (no Python build step).

Each source is compiled with the system C compiler into
``$CDL_HOME/native/<stem>-<hash>.so`` and cached there; ``scripts/setup.sh``
builds them ahead of time. The hash covers everything that changes the
binary: the source, the flags, the compiler (its path and ``--version``), the
link inputs (a file by path, size and modification time) and the caller's
``key`` (e.g. the Python and confluent-kafka versions), so environments that
share one ``CDL_HOME`` each get their own build and none rebuilds or deletes
another's. Only temp files of builds that died and builds unused for
:data:`PRUNE_AFTER_S` are removed.

Go programs (a module directory: its ``*.go``, ``go.mod`` and ``go.sum``) are built the same
way by :func:`go_program` into ``$CDL_HOME/native/<name>-<hash>`` (the hash covers those files
and ``go version``), with the modules from the Go module proxy cached in Go's own module cache.

A helper that cannot be built or loaded is a warning (with the compiler's
output) and ``load`` returns None: the caller takes its pure-Python path. With
``CDL_NATIVE_REQUIRED=1`` (set by ``scripts/setup.sh``; the default when
``CI=true``) it is an error instead: :class:`NativeBuildError`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from cdl.errors import ConfigError
from cdl.logging import get_logger
from cdl.settings import NativeSettings, cdl_home

__all__ = ["CFLAGS", "PRUNE_AFTER_S", "NativeBuildError", "build", "fallback", "go_program", "load", "required"]

log = get_logger(__name__)

CFLAGS = ("-O3", "-std=c99", "-Wall", "-Werror", "-shared", "-fPIC")
#: a cached build nobody loaded for this long is removed (each load marks its file used)
PRUNE_AFTER_S = 30 * 86400
#: a temp file this old belongs to a build that died (a live build takes seconds)
_STALE_TMP_S = 3600
_TMP_SUFFIX = ".so.tmp"
#: a built Go program's name ends so (``<name>-<hash>.bin``)
_GO_SUFFIX = ".bin"


class NativeBuildError(ConfigError):
    """A C helper could not be built or loaded where it is required (``CDL_NATIVE_REQUIRED``)."""


def required() -> bool:
    """Whether a helper that cannot be built is an error rather than a fallback.

    ``CDL_NATIVE_REQUIRED=1`` (or ``0``) says so; unset, it is required under CI (``CI=true``)
    (:class:`cdl.settings.NativeSettings`).
    """
    return NativeSettings().required()


def fallback(message: str, **context: object) -> None:
    """A helper is unavailable: a warning (its caller takes the pure-Python path), or
    :class:`NativeBuildError` when :func:`required`."""
    if required():
        raise NativeBuildError(message, **context)
    log.warning(f"{message}; the pure-Python path runs instead", **context)


def _compiler_argv() -> list[str]:
    cc = NativeSettings().cc
    argv = shlex.split(cc) if cc else [shutil.which("cc") or shutil.which("gcc") or ""]
    if not argv or not argv[0]:
        raise FileNotFoundError("no C compiler (cc or gcc) on PATH")
    found = shutil.which(argv[0])
    if found is None:
        raise FileNotFoundError(f"C compiler {argv[0]!r} not found")
    return [os.path.realpath(found), *argv[1:]]


@functools.cache
def _compiler_version(argv: tuple[str, ...]) -> str:
    out = subprocess.run([*argv, "--version"], capture_output=True, text=True, check=False, timeout=60)
    return out.stdout + out.stderr


def _link_inputs(link: Sequence[str]) -> list[str]:
    """The link arguments, each file among them with its size and modification time."""
    out = []
    for arg in link:
        path = Path(arg)
        if not arg.startswith("-") and path.is_file():
            st = path.stat()
            out.append(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}")
        else:
            out.append(arg)
    return out


def _fingerprint(source: Path, flags: Sequence[str], link: Sequence[str], key: str) -> str:
    argv = _compiler_argv()
    parts = [
        source.read_bytes(),
        "\0".join(flags).encode(),
        "\0".join(_link_inputs(link)).encode(),
        "\0".join(argv).encode(),
        _compiler_version(tuple(argv)).encode(),
        key.encode(),
    ]
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def build(
    source: Path,
    target: Path,
    link: Sequence[str] = ("-lm",),
    flags: Sequence[str] = CFLAGS,
    compiler: Sequence[str] | None = None,
) -> None:
    """Compile ``source`` into the shared library ``target`` (atomically: concurrent builders race
    harmlessly) with ``compiler`` (default: ``$CC``, else ``cc`` or ``gcc``).

    Raises :class:`NativeBuildError` with the compiler's output when it fails.
    """
    argv = list(compiler) if compiler else _compiler_argv()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=_TMP_SUFFIX, dir=target.parent)
    os.close(fd)
    cmd = [*argv, *flags, "-o", tmp, str(source), *link]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
        if done.returncode != 0:
            output = (done.stderr or done.stdout).strip()
            raise NativeBuildError(
                f"building {source.name} failed (exit {done.returncode}):\n{output}", command=shlex.join(cmd)
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _prune(folder: Path, keep: Path) -> None:
    """Remove temp files of builds that died, and builds nobody loaded for :data:`PRUNE_AFTER_S`."""
    now = time.time()
    for path in folder.iterdir():
        try:
            age = now - path.stat().st_mtime
            stale_tmp = path.name.endswith(_TMP_SUFFIX) and age > _STALE_TMP_S
            built = path.suffix == ".so" or path.name.endswith(_GO_SUFFIX)
            unused = built and path != keep and age > PRUNE_AFTER_S
            if stale_tmp or unused:
                path.unlink()
        except OSError:  # another environment removed or replaced it meanwhile
            continue


def _mark_used(target: Path) -> None:
    """``target`` is in use (not pruned); unused builds beside it are pruned."""
    try:
        os.utime(target)
        _prune(target.parent, target)
    except OSError:
        pass


def load(source: Path, link: Sequence[str] = ("-lm",), key: str = "") -> ctypes.CDLL | None:
    """Build ``source`` (once per build fingerprint, see the module docstring) and load it.

    None, with a warning, when that is impossible; :class:`NativeBuildError` (with the
    compiler's output) instead when :func:`required`.
    """
    try:
        target = cdl_home() / "native" / f"{source.stem}-{_fingerprint(source, CFLAGS, link, key)}.so"
        if not target.exists():
            build(source, target, link)
        lib = ctypes.CDLL(str(target))
    except NativeBuildError as exc:
        if required():
            raise
        log.warning(
            "native helper unavailable; the pure-Python path runs instead",
            source=source.name,
            error=exc.message,
            **exc.context,
        )
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        fallback(f"native helper {source.name} unavailable: {exc}")
        return None
    _mark_used(target)
    return lib


def _go() -> str:
    found = shutil.which("go")
    if found is None:
        raise FileNotFoundError("no Go toolchain (go) on PATH")
    return os.path.realpath(found)


@functools.cache
def _go_version(go: str) -> str:
    out = subprocess.run([go, "version"], capture_output=True, text=True, check=False, timeout=60)
    return out.stdout + out.stderr


def _go_fingerprint(module: Path, go: str) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in module.iterdir() if p.suffix == ".go" or p.name in ("go.mod", "go.sum"))
    for part in [*(f.name.encode() + b"\0" + f.read_bytes() for f in files), _go_version(go).encode()]:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def go_program(module: Path, name: str) -> Path | None:
    """The Go program of ``module`` (a directory holding one ``main`` package), built once per
    fingerprint (see the module docstring): its path, or None with a warning where it cannot
    be built (:class:`NativeBuildError`, with the compiler's output, when :func:`required`)."""
    try:
        go = _go()
        target = cdl_home() / "native" / f"{name}-{_go_fingerprint(module, go)}{_GO_SUFFIX}"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{os.getpid()}{_TMP_SUFFIX}")
            env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-buildvcs=false -mod=readonly"}
            out = subprocess.run(
                [go, "build", "-trimpath", "-o", str(tmp), "."],
                cwd=module,
                capture_output=True,
                text=True,
                check=False,
                timeout=900,
                env=env,
            )
            if out.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise NativeBuildError(f"go build of {module.name} failed", output=(out.stdout + out.stderr)[-4000:])
            os.replace(tmp, target)
    except NativeBuildError as exc:
        if required():
            raise
        log.warning("native program unavailable", module=module.name, error=exc.message, **exc.context)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        fallback(f"native program {module.name} unavailable: {exc}")
        return None
    _mark_used(target)
    return target
