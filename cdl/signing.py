"""Signed model repository entries: the compressor signs what it writes to Triton's repository,
the gateway verifies it before any Triton server loads it.

An entry's version directory (``<model>/<version>/`` in the ``cdl-triton`` bucket) holds, beside
its files, ``cdl-signature.json``: a manifest -- the model, the version, the SHA-256 of every
file of the version (``model.onnx``, the python-backend runner ``model.py``, a text model's
``tokenizer.json``) and of the model's ``config.pbtxt`` as written with it -- and an Ed25519
signature over the manifest's canonical JSON, with the id of the key that made it.

:func:`verify_entry` reads the entry back from the store and refuses it
(:class:`~cdl.errors.UntrustedModelError`, with the reason) when it has no signature, when the
signature is not by a trusted key or does not match the manifest, or when a file differs from
its digest (tampered, added or missing). The private key stays with the compressor
(``CDL_COMPRESSOR_SIGNING_KEY_FILE``); the gateway holds public keys only
(``CDL_GATEWAY_TRUSTED_KEYS``). Keys are raw Ed25519 keys: the private one a PEM file
(PKCS#8), the public one base64 of its 32 bytes (``ed25519:<base64>``), small enough for an
environment variable. docs/security.md has the threat model.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cdl.errors import ConfigError, UntrustedModelError

if TYPE_CHECKING:
    from cdl.store import BlobStore

__all__ = [
    "SIGNATURE_FILE",
    "Signer",
    "TrustedKeys",
    "config_matches",
    "generate_signing_key",
    "public_key_text",
    "verify_entry",
]

#: the signature's file in an entry's version directory
SIGNATURE_FILE = "cdl-signature.json"
_ALGORITHM = "ed25519"
_PREFIX = "ed25519:"


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _key_id(key: Ed25519PublicKey) -> str:
    return _sha256(_raw_public(key))[:16]


def public_key_text(key: Ed25519PublicKey) -> str:
    """``ed25519:<base64 of the 32 raw bytes>``: how a trusted key is written in settings."""
    return _PREFIX + base64.b64encode(_raw_public(key)).decode()


def generate_signing_key(path: Path) -> str:
    """Write a new private key to ``path`` (PEM, mode 0600, never overwritten: an existing key is
    read) and return its public key text (:func:`public_key_text`)."""
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    return public_key_text(Signer.from_file(path).public_key)


@dataclass(frozen=True)
class Signer:
    """The compressor's key: signs the manifest of each entry it writes."""

    key: Ed25519PrivateKey

    @classmethod
    def from_file(cls, path: Path | str) -> Signer:
        """The private key in the PEM file at ``path`` (a clear error when it is not one)."""
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read the signing key {path}: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"the signing key {path} is not an Ed25519 key")
        return cls(key)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.key.public_key()

    def sign(self, model: str, version: int, files: Mapping[str, bytes], config: bytes) -> dict[str, Any]:
        """The signature document of an entry: its manifest (the digests of ``files``, the
        version directory's, and of ``config``) and the signature over it."""
        manifest = {
            "model": model,
            "version": int(version),
            "files": {name: _sha256(blob) for name, blob in sorted(files.items())},
            "config_sha256": _sha256(config),
        }
        signature = self.key.sign(_canonical(manifest))
        return {
            "manifest": manifest,
            "algorithm": _ALGORITHM,
            "key_id": _key_id(self.public_key),
            "signature": base64.b64encode(signature).decode(),
        }


class TrustedKeys:
    """The public keys whose signatures the gateway accepts (by key id)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys: dict[str, Ed25519PublicKey] = {}
        for text in keys:
            key = self._parse(text)
            self.keys[_key_id(key)] = key

    @staticmethod
    def _parse(text: str) -> Ed25519PublicKey:
        raw = text.strip()
        if not raw.startswith(_PREFIX):
            raise ConfigError(f"a trusted key is written ed25519:<base64 of 32 bytes>, not {raw[:20]!r}")
        try:
            return Ed25519PublicKey.from_public_bytes(base64.b64decode(raw[len(_PREFIX) :], validate=True))
        except ValueError as exc:
            raise ConfigError(f"not an Ed25519 public key: {raw[:20]!r}...: {exc}") from exc

    def __bool__(self) -> bool:
        return bool(self.keys)


def _entry_files(store: BlobStore, bucket: str, model: str, version: int) -> list[str]:
    prefix = f"{model}/{version}/"
    return sorted(o.key[len(prefix) :] for o in store.list(bucket, prefix, recursive=True))


def verify_entry(store: BlobStore, bucket: str, model: str, version: int, trusted: TrustedKeys) -> dict[str, Any]:
    """Check the signed entry ``model``/``version`` in ``bucket`` against ``trusted``; returns
    its signature document, or raises :class:`UntrustedModelError` saying why it is refused."""
    where = f"{model} v{version}"
    names = _entry_files(store, bucket, model, version)
    if SIGNATURE_FILE not in names:
        raise UntrustedModelError(f"{where} is not signed (no {SIGNATURE_FILE})", model=model, version=version)
    try:
        doc = json.loads(store.get_bytes(bucket, f"{model}/{version}/{SIGNATURE_FILE}"))
        manifest, key_id = doc["manifest"], str(doc["key_id"])
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise UntrustedModelError(f"{where}: unreadable signature: {exc}", model=model, version=version) from exc
    key = trusted.keys.get(key_id)
    if key is None or doc.get("algorithm") != _ALGORITHM:
        raise UntrustedModelError(f"{where} is signed by an untrusted key ({key_id})", model=model, version=version)
    try:
        key.verify(signature, _canonical(manifest))
    except InvalidSignature as exc:
        raise UntrustedModelError(f"{where}: the signature does not match its manifest", model=model) from exc
    if manifest.get("model") != model or manifest.get("version") != version:
        raise UntrustedModelError(f"{where}: the signature is of {manifest.get('model')} v{manifest.get('version')}")
    files: dict[str, str] = manifest.get("files", {})
    present = set(names) - {SIGNATURE_FILE}
    if present != set(files):
        extra, missing = sorted(present - set(files)), sorted(set(files) - present)
        raise UntrustedModelError(f"{where}: files differ from the signed ones (added {extra}, missing {missing})")
    for name, digest in sorted(files.items()):
        if _sha256(store.get_bytes(bucket, f"{model}/{version}/{name}")) != digest:
            raise UntrustedModelError(f"{where}: {name} differs from its signed digest (tampered)")
    return dict(doc)


def config_matches(doc: Mapping[str, Any], config: bytes) -> bool:
    """Whether ``config`` (the model's ``config.pbtxt``) is the one the entry was signed with."""
    return bool(doc["manifest"].get("config_sha256") == _sha256(config))
