"""Signed Triton entries (cdl.signing): what the compressor signs verifies, and every way an
entry can be changed, unsigned or forged is refused with its reason."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cdl.errors import ConfigError, UntrustedModelError
from cdl.signing import SIGNATURE_FILE, Signer, TrustedKeys, generate_signing_key, public_key_text, verify_entry
from cdl.triton import TRITON_BUCKET
from services.gateway.rollout.control import TritonControl
from tests.fakes import MemoryStore
from tests.helpers import cdl_in_process
from tests.models import write_affine

W, B = np.eye(4, 3, dtype=np.float32), np.zeros(3, dtype=np.float32)


@pytest.fixture
def signer() -> Signer:
    return Signer(Ed25519PrivateKey.generate())


@pytest.fixture
def trusted(signer: Signer) -> TrustedKeys:
    return TrustedKeys([public_key_text(signer.public_key)])


def _refused(store: MemoryStore, trusted: TrustedKeys, version: int = 1) -> str:
    with pytest.raises(UntrustedModelError) as refused:
        verify_entry(store, TRITON_BUCKET, "m", version, trusted)
    return str(refused.value)


def test_a_signed_entry_verifies_and_names_its_files_and_key(signer: Signer, trusted: TrustedKeys) -> None:
    store = MemoryStore()
    write_affine(store, "m", 1, W, B, signer=signer)
    doc = verify_entry(store, TRITON_BUCKET, "m", 1, trusted)
    assert set(doc["manifest"]["files"]) == {"model.onnx", "model.py"}  # the runner is code: signed too
    assert doc["key_id"] in trusted.keys and doc["algorithm"] == "ed25519"


def test_an_entry_changed_after_signing_is_refused(signer: Signer, trusted: TrustedKeys) -> None:
    store = MemoryStore()
    write_affine(store, "m", 1, W, B, signer=signer)
    onnx = store.get_bytes(TRITON_BUCKET, "m/1/model.onnx")
    store.put_bytes(TRITON_BUCKET, "m/1/model.onnx", onnx[:-1] + bytes([onnx[-1] ^ 1]))
    assert "model.onnx differs from its signed digest (tampered)" in _refused(store, trusted)

    write_affine(store, "m", 2, W, B, signer=signer)
    store.put_bytes(TRITON_BUCKET, "m/2/extra.py", b"import os")  # code added beside the model
    assert "added ['extra.py']" in _refused(store, trusted, 2)


def test_unsigned_forged_and_altered_signatures_are_refused(signer: Signer, trusted: TrustedKeys) -> None:
    store = MemoryStore()
    write_affine(store, "m", 1, W, B)  # no signer
    assert "is not signed" in _refused(store, trusted)

    forger = Signer(Ed25519PrivateKey.generate())  # a valid signature, by a key nobody trusts
    write_affine(store, "m", 1, W, B, signer=forger)
    assert "untrusted key" in _refused(store, trusted)

    write_affine(store, "m", 1, W, B, signer=signer)
    doc = store.get_json(TRITON_BUCKET, f"m/1/{SIGNATURE_FILE}")
    doc["manifest"]["files"]["model.onnx"] = "0" * 64  # the manifest edited after signing
    store.put_json(TRITON_BUCKET, f"m/1/{SIGNATURE_FILE}", doc)
    assert "does not match its manifest" in _refused(store, trusted)

    write_affine(store, "m", 1, W, B, signer=signer)  # v1's valid signature copied to v2
    store.put_bytes(TRITON_BUCKET, f"m/2/{SIGNATURE_FILE}", store.get_bytes(TRITON_BUCKET, f"m/1/{SIGNATURE_FILE}"))
    for name in ("model.onnx", "model.py"):
        store.put_bytes(TRITON_BUCKET, f"m/2/{name}", store.get_bytes(TRITON_BUCKET, f"m/1/{name}"))
    assert "the signature is of m v1" in _refused(store, trusted, 2)
    store.put_bytes(TRITON_BUCKET, f"m/2/{SIGNATURE_FILE}", b"{not json")
    assert "unreadable signature" in _refused(store, trusted, 2)


def test_the_gateway_checks_the_models_config_against_the_loaded_versions(signer: Signer, trusted: TrustedKeys) -> None:
    store = MemoryStore()
    write_affine(store, "m", 1, W, B, signer=signer)
    write_affine(store, "m", 2, W, B, max_batch_size=8, signer=signer)  # the config changed with v2
    control = TritonControl(["127.0.0.1:1"], store, timeout_s=1, trusted=trusted)  # no server is called
    try:
        control.verify("m", (1, 2))
        control.verify("m", (2,))
        with pytest.raises(UntrustedModelError, match=r"config\.pbtxt is not the one signed"):
            control.verify("m", (1,))  # v2's config, not v1's
        config = store.get_bytes(TRITON_BUCKET, "m/config.pbtxt")
        store.put_bytes(TRITON_BUCKET, "m/config.pbtxt", config.replace(b"max_batch_size: 8", b"max_batch_size: 9"))
        with pytest.raises(UntrustedModelError, match=r"config\.pbtxt"):
            control.verify("m", (1, 2))
    finally:
        control.close()


def test_keys_are_made_once_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.pem"
    public = generate_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert generate_signing_key(path) == public  # an existing key is kept
    assert public.startswith("ed25519:") and TrustedKeys([public])
    assert public_key_text(Signer.from_file(path).public_key) == public
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="cannot read the signing key"):
        Signer.from_file(tmp_path / "bad.pem")
    for bad in ("ssh-ed25519 AAAA", "ed25519:not base64!", "ed25519:" + "QUJD"):
        with pytest.raises(ConfigError):
            TrustedKeys([bad])
    assert not TrustedKeys([])


def test_cdl_signing_key_makes_the_compressors_key_and_prints_the_gateways_setting(tmp_path: Path) -> None:
    path = tmp_path / "deploy" / "model-signing.pem"
    out = cdl_in_process("signing-key", str(path), state_dir=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    setting = out.stdout.strip().splitlines()[-1]
    assert setting.startswith("CDL_GATEWAY_TRUSTED_KEYS=")
    keys = json.loads(setting.partition("=")[2].strip("'"))
    assert keys == [public_key_text(Signer.from_file(path).public_key)] and TrustedKeys(keys)
