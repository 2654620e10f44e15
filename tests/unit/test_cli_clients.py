"""`cdl --tls-ca` reaches every gRPC client the commands build (cdl_tools.cli.clients): the
ingest calls, the gateway's admin calls and its inference client take a TLS channel trusting
the CA when one is given, a plaintext one without (no servers needed: the calls go to a
closed port and fail there, after the channel was chosen)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import typer
from typer.testing import CliRunner

from cdl.v1 import ingest_pb2
from cdl_tools.cli import app, clients


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _self_signed_ca(tmp_path: Path) -> Path:
    """A CA certificate (PEM): the local stack's own CA maker (cdl.tls)."""
    from cdl.tls import ensure_ca

    return ensure_ca(tmp_path)[0]


class _Channels:
    """Which channel constructor was taken, for which target, trusting which CA."""

    def __init__(self) -> None:
        self.secure: list[str] = []
        self.insecure: list[str] = []
        self.roots: list[bytes | None] = []


@pytest.fixture
def channels(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Channels]:
    seen = _Channels()
    real_secure, real_insecure, real_creds = grpc.secure_channel, grpc.insecure_channel, grpc.ssl_channel_credentials

    def secure(target: str, creds: grpc.ChannelCredentials, *args: Any, **kwargs: Any) -> grpc.Channel:
        seen.secure.append(target)
        return real_secure(target, creds, *args, **kwargs)

    def insecure(target: str, *args: Any, **kwargs: Any) -> grpc.Channel:
        seen.insecure.append(target)
        return real_insecure(target, *args, **kwargs)

    def ssl_credentials(root_certificates: bytes | None = None, *args: Any, **kwargs: Any) -> grpc.ChannelCredentials:
        seen.roots.append(root_certificates)
        return real_creds(root_certificates, *args, **kwargs)

    monkeypatch.setattr(grpc, "secure_channel", secure)
    monkeypatch.setattr(grpc, "insecure_channel", insecure)
    monkeypatch.setattr(grpc, "ssl_channel_credentials", ssl_credentials)
    yield seen
    clients.set_tls_ca(None)  # the root option is process state: the next test starts without it


def test_the_decision_tls_with_a_ca_plaintext_without() -> None:
    assert clients.credentials(None) is None
    assert clients.credentials(b"") is None
    assert isinstance(clients.credentials(b"-----BEGIN CERTIFICATE-----\n"), grpc.ChannelCredentials)


def test_the_ingest_client_takes_a_tls_channel_trusting_the_ca(
    tmp_path: Path, channels: _Channels, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = _self_signed_ca(tmp_path)
    target = _closed_port()
    clients.set_tls_ca(ca)
    with pytest.raises(typer.Exit) as failed:
        clients.ingest_call(target, tmp_path, "ListDatasets", ingest_pb2.ListDatasetsRequest())
    assert failed.value.exit_code == 1 and "UNAVAILABLE" in capsys.readouterr().out
    assert channels.secure == [target] and channels.insecure == []
    assert channels.roots == [ca.read_bytes()]

    clients.set_tls_ca(None)
    with pytest.raises(typer.Exit):
        clients.ingest_call(target, tmp_path, "ListDatasets", ingest_pb2.ListDatasetsRequest())
    assert channels.insecure == [target] and channels.secure == [target]


def test_every_command_honours_the_root_tls_ca(tmp_path: Path, channels: _Channels) -> None:
    ca = _self_signed_ca(tmp_path)
    target = _closed_port()
    inputs = tmp_path / "x.json"
    inputs.write_text("[0.0, 1.0]")
    runner = CliRunner()
    for command in (
        ["datasets", "--ingest", target],
        ["dataset", "show", "digits", "--ingest", target],
        ["models", "digits", "--gateway", target],
        ["predict", "digits", str(inputs), "--gateway", target],
    ):
        channels.secure.clear()
        out = runner.invoke(app, ["--tls-ca", str(ca), *command, "--state-dir", str(tmp_path)])
        assert out.exit_code == 1, (command, out.output)
        assert channels.secure == [target] and channels.insecure == [], command
        assert "Traceback" not in out.output


def test_an_unreadable_ca_is_one_line_and_exit_2(tmp_path: Path, channels: _Channels) -> None:
    inputs = tmp_path / "x.json"
    inputs.write_text("[1.0]")
    missing = tmp_path / "missing.pem"
    for command in (
        ["datasets", "--ingest", _closed_port()],
        ["predict", "digits", str(inputs), "--gateway", _closed_port()],
    ):
        out = CliRunner().invoke(app, ["--tls-ca", str(missing), *command, "--state-dir", str(tmp_path)])
        assert out.exit_code == 2, (command, out.output)
        assert "cannot read the TLS CA" in out.output and len(out.output.strip().splitlines()) == 1, out.output
    assert channels.secure == channels.insecure == []


def test_each_call_carries_the_key_of_its_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference calls the stack's inference key, admin calls its admin key, ingest calls its
    ingest key; each scope's variable overrides the stack's, ``--key`` overrides both."""
    state = {"api_key": "infer", "admin_key": "admin", "ingest_key": "ingest"}
    for variable in clients.SCOPES.values():
        monkeypatch.delenv(variable, raising=False)
    assert [clients.api_key_metadata(None, state, scope) for scope in clients.SCOPES] == [
        (("authorization", f"Bearer {key}"),) for key in ("infer", "admin", "ingest")
    ]
    monkeypatch.setenv("CDL_API_KEY", "from-env")  # `eval "$(cdl stack env)"`: admin calls keep the admin key
    assert clients.api_key_metadata(None, state, "admin_key") == (("authorization", "Bearer admin"),)
    assert clients.api_key_metadata(None, state) == (("authorization", "Bearer from-env"),)
    assert clients.api_key_metadata("given", state, "admin_key") == (("authorization", "Bearer given"),)
    assert clients.api_key_metadata(None, {}, "ingest_key") == ()
