"""The native floor of bench/gateway (``bench/native_floor``, Go): a plain grpc-go byte-forwarding
proxy and a plain ``httputil.ReverseProxy`` in one process, in front of one Triton. Built once per
source version (:func:`cdl.native.go_program`), started with :class:`NativeFloor`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import IO, Any

from cdl import native

MODULE = Path(__file__).resolve().with_name("native_floor")


class NativeFloor:
    """The floor process, forwarding gRPC to ``grpc_backend`` and HTTP to ``http_backend``
    (``host:port`` each); ``grpc`` and ``http`` are its addresses once started."""

    def __init__(self, grpc_backend: str, http_backend: str, max_bytes: int = 64 << 20) -> None:
        binary = native.go_program(MODULE, "benchfloor")
        if binary is None:
            raise RuntimeError("bench/native_floor could not be built (a Go toolchain is needed)")
        argv = [
            str(binary),
            f"--grpc-backend={grpc_backend}",
            f"--http-backend={http_backend}",
            f"--max-bytes={max_bytes}",
        ]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        out: IO[bytes] | None = self.proc.stdout
        line = out.readline() if out is not None else b""
        if not line:
            self.close()
            raise RuntimeError("bench/native_floor did not start")
        ports: dict[str, Any] = json.loads(line)
        self.grpc = f"127.0.0.1:{int(ports['grpc'])}"
        self.http = f"127.0.0.1:{int(ports['http'])}"

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def close(self) -> None:
        """Close its stdin (it stops), killed when it has not within 5 s."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
