"""The per-user credential store: credentials users registered for an upstream, encrypted at
rest, looked up by (issuer, sub, server).

One SQLite file (``servers.<name>.credentials.path``), shared by every ext_authz process of a
host and by ``mcp-gateway credentials``. Each value is sealed with AES-256-GCM under a key
derived (HKDF-SHA256) from the secret ``credentials.key`` names; the row's issuer, subject and
server are the associated data, so a value copied to another row does not open. The secret may
hold several comma-separated keys, newest first: values are sealed with the first and opened
with whichever sealed them (rotation: put the new key first and keep the old one listed until
every value was registered again). A value that does not open under any key fails closed.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_INFO = b"mcp-gateway upstream credential store v1"
MIN_KEY_CHARS = 16
MAX_VALUE_CHARS = 16 * 1024
_SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    issuer TEXT NOT NULL, sub TEXT NOT NULL, server TEXT NOT NULL,
    key_id TEXT NOT NULL, nonce BLOB NOT NULL, sealed BLOB NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (issuer, sub, server)
)
"""


class StoreError(Exception):
    """The store cannot answer: unreadable file, or a value no configured key opens."""


@dataclass(frozen=True, slots=True)
class StoredCredential:
    """One registration, without its value."""

    issuer: str
    sub: str
    server: str
    created: float
    updated: float


@dataclass(frozen=True, slots=True)
class _Key:
    id: str
    aead: AESGCM


def derive_keys(secret: str) -> tuple[_Key, ...]:
    """The AES-256 keys of a secret's value: comma-separated entries, newest first."""
    entries = [e.strip() for e in secret.split(",") if e.strip()]
    if not entries or any(len(e) < MIN_KEY_CHARS for e in entries):
        raise ValueError(f"the store key secret must hold one or more comma-separated keys of at "
                         f"least {MIN_KEY_CHARS} characters")
    keys = []
    for entry in entries:
        raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(entry.encode())
        keys.append(_Key(hashlib.sha256(raw).hexdigest()[:16], AESGCM(raw)))
    return tuple(keys)


class CredentialStore:
    """Synchronous and thread-safe (one connection behind a lock): call it from a thread in
    async code. ``keys`` from :func:`derive_keys`."""

    def __init__(self, path: str | os.PathLike[str], keys: Sequence[_Key], *,
                 create: bool = True) -> None:
        if not keys:
            raise ValueError("a credential store needs at least one key")
        self._keys = {k.id: k for k in keys}
        self._seal = keys[0]
        self._lock = threading.Lock()
        file = Path(path)
        if create:
            file.parent.mkdir(parents=True, exist_ok=True)
            # The file holds sealed values only; still nobody else's business.
            fd = os.open(file, os.O_CREAT | os.O_RDWR, 0o600)
            os.close(fd)
        try:
            self._db = sqlite3.connect(file, timeout=0.2, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"the credential store {file} cannot be opened: {exc}") from None

    @staticmethod
    def _aad(issuer: str, sub: str, server: str) -> bytes:
        return "\0".join((issuer, sub, server)).encode()

    def set(self, issuer: str, sub: str, server: str, value: str) -> None:
        """Register (or replace) the caller's credential for ``server``."""
        if not value or len(value) > MAX_VALUE_CHARS:
            raise ValueError(f"a credential is 1 to {MAX_VALUE_CHARS} characters")
        nonce = os.urandom(12)
        sealed = self._seal.aead.encrypt(nonce, value.encode(), self._aad(issuer, sub, server))
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO credentials VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (issuer, sub, "
                "server) DO UPDATE SET key_id = excluded.key_id, nonce = excluded.nonce, "
                "sealed = excluded.sealed, updated = excluded.updated",
                (issuer, sub, server, self._seal.id, nonce, sealed, now, now))

    def get(self, issuer: str, sub: str, server: str) -> str | None:
        """The caller's credential for ``server``; None when none is registered. Raises
        StoreError when the store cannot be read or the value does not open."""
        try:
            with self._lock:
                row = self._db.execute(
                    "SELECT key_id, nonce, sealed FROM credentials WHERE issuer = ? AND sub = ? "
                    "AND server = ?", (issuer, sub, server)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"the credential store cannot be read: {exc}") from None
        if row is None:
            return None
        key = self._keys.get(row[0])
        if key is None:
            raise StoreError("a stored credential is sealed with a key that is not configured")
        try:
            return key.aead.decrypt(row[1], row[2], self._aad(issuer, sub, server)).decode()
        except (InvalidTag, UnicodeDecodeError):
            raise StoreError("a stored credential does not open with the configured key") from None

    def list(self, *, server: str | None = None, sub: str | None = None) -> list[StoredCredential]:
        """Registrations (never their values), optionally of one server or subject."""
        sql = "SELECT issuer, sub, server, created, updated FROM credentials WHERE 1 = 1"
        args: list[str] = []
        if server is not None:
            sql, args = sql + " AND server = ?", [*args, server]
        if sub is not None:
            sql, args = sql + " AND sub = ?", [*args, sub]
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY server, issuer, sub", args).fetchall()
        return [StoredCredential(*row) for row in rows]

    def revoke(self, issuer: str, sub: str, server: str) -> bool:
        """Forget the caller's credential for ``server``; False when there was none."""
        with self._lock:
            cur = self._db.execute("DELETE FROM credentials WHERE issuer = ? AND sub = ? AND "
                                   "server = ?", (issuer, sub, server))
        return cur.rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
