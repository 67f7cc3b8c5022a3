"""Tamper evidence for the audit trail: the hash chain's checkpoints and their signatures.

Each audit entry starts with ``"seq"`` (its place in its writer's chain, from 0, carried across
rotations and restarts) and ``"prev"`` (hex SHA-256 of the previous line, without its newline).
Editing, inserting, removing or reordering a line therefore breaks the chain at that place, and
removing a whole rotated file breaks it at the first line of the next one.

A chain alone cannot show that its newest entries were cut off. So the writer appends a
checkpoint, ``{"file", "seq", "hash", "ts", "kid", "sig"}``, to ``<audit file>.checkpoints``
every ``checkpoint_seconds`` or ``checkpoint_entries`` and when it closes; with a signing key
(Ed25519, ``audit.signing_key``) ``sig`` is its signature, so a checkpoint cannot be forged by
someone who can edit the files but does not hold the key. ``mcp-gateway audit verify`` checks
that every checkpoint's entry is present with that hash.
"""

from __future__ import annotations

import base64
import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

CHECKPOINT_SUFFIX = ".checkpoints"
_DOMAIN = b"mcp-gateway audit checkpoint v1\n"


def key_id(public: Ed25519PublicKey) -> str:
    """A short name for a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _message(file: str, seq: int, digest: str, ts: str) -> bytes:
    return _DOMAIN + f"{file}\n{seq}\n{digest}\n{ts}".encode()


class CheckpointSigner:
    """Signs checkpoints with the gateway's Ed25519 audit key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.kid = key_id(key.public_key())

    @classmethod
    def from_file(cls, path: str | Path) -> CheckpointSigner:
        """Load a PEM (PKCS#8) Ed25519 private key; ValueError names the file if it is not one."""
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"audit.signing_key: cannot load {path}: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"audit.signing_key: {path} is not an Ed25519 private key")
        return cls(key)

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self._key.sign(message)).decode()

    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()


def generate_signing_key(path: Path) -> None:
    """Write a new Ed25519 private key (PEM, PKCS#8, mode 0600) to ``path``."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(pem)
    tmp.chmod(0o600)
    tmp.replace(path)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The public key from a PEM Ed25519 private or public key file."""
    data = Path(path).read_bytes()
    if b"PRIVATE KEY" in data:
        private = serialization.load_pem_private_key(data, password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 key")
        return private.public_key()
    public = serialization.load_pem_public_key(data)
    if not isinstance(public, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 key")
    return public


def checkpoint_line(file: str, seq: int, digest: str, signer: CheckpointSigner | None) -> bytes:
    """One checkpoint line: entry ``seq`` of the chain of audit file ``file`` hashes to ``digest``."""
    ts = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    record: dict[str, Any] = {"file": file, "seq": seq, "hash": digest, "ts": ts, "kid": None, "sig": None}
    if signer is not None:
        record["kid"] = signer.kid
        record["sig"] = signer.sign(_message(file, seq, digest, ts))
    return orjson.dumps(record) + b"\n"


def checkpoint_signature_ok(record: dict[str, Any], public: Ed25519PublicKey) -> bool:
    """Whether a checkpoint's signature is valid under ``public``."""
    try:
        sig = base64.b64decode(str(record["sig"]), validate=True)
        public.verify(sig, _message(str(record["file"]), int(record["seq"]), str(record["hash"]),
                                    str(record["ts"])))
    except (InvalidSignature, KeyError, TypeError, ValueError):
        return False
    return True


def last_line(path: Path) -> bytes | None:
    """The last newline-terminated line of ``path``, without its newline (None: no such line)."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return None
    with f:
        end = f.seek(0, os.SEEK_END)
        size = 4096
        while True:
            start = max(0, end - size)
            f.seek(start)
            data = f.read(end - start)
            cut = data.rfind(b"\n")
            if cut >= 0:
                nl = data.rfind(b"\n", 0, cut)
                if nl >= 0 or start == 0:
                    return data[nl + 1:cut] or None
            elif start == 0:
                return None
            size *= 4


def audit_files(path: str | os.PathLike[str]) -> list[Path]:
    """The current file and its rotated predecessors, oldest first."""
    base = Path(path)
    rotated = []
    for candidate in base.parent.glob(base.name + ".*"):
        suffix = candidate.name[len(base.name) + 1:]
        if suffix.isdigit():
            rotated.append((int(suffix), candidate))
    files = [p for _, p in sorted(rotated, reverse=True)]
    if base.exists():
        files.append(base)
    return files
