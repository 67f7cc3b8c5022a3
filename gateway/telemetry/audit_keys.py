"""Crypto-shredding for the audit trail: personal fields encrypted under a per-subject key.

An entry with a subject stores ``sub``, ``client_id``, ``tenant`` and ``args_digest`` only inside
``"pii"`` (AES-256-GCM under that subject's key) and names the subject by ``"sid"``, an HMAC of
the subject under a key derived from the master key: entries of one subject can be found without
decrypting anything, and ``sid`` says nothing about the subject to someone without the master key.

The per-subject keys live in a SQLite file beside the trail (``subject-keys.sqlite``), each
wrapped (AES-GCM) under a key derived from the master key (``audit.master_key``, a secret).
Erasing a subject deletes its key row (``secure_delete`` overwrites the freed page): the subject's
entries stay in the hash chain, which still verifies, but can never be read again. A subject seen
again after erasure gets a new key (a new ``kid``).

Writers cache keys in memory (bounded, ``cache_ttl`` seconds): after an erasure, entries written
by a running writer within that time are sealed under the erased key, so they are unreadable too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_STORE_NAME = "subject-keys.sqlite"
PERSONAL_FIELDS = ("sub", "client_id", "tenant", "args_digest")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS subject_keys (sid TEXT PRIMARY KEY, kid INTEGER NOT NULL,
                                         wrapped BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS erasures (sid TEXT NOT NULL, kid INTEGER NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class KeyStoreError(ValueError):
    """The key store or the master key is unusable."""


def parse_master_key(value: str, where: str = "audit.master_key") -> bytes:
    """A base64url (padding optional) 32-byte key; KeyStoreError naming ``where`` otherwise."""
    try:
        key = base64.urlsafe_b64decode(value.strip() + "=" * (-len(value.strip()) % 4))
    except ValueError as exc:
        raise KeyStoreError(f"{where}: not base64url: {exc}") from None
    if len(key) != 32:
        raise KeyStoreError(f"{where}: must decode to 32 bytes, got {len(key)}")
    return key


def new_master_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


class SubjectKeyStore:
    """Per-subject AES-256-GCM keys in SQLite, wrapped by the master key; safe across processes."""

    def __init__(self, directory: str | Path, master_key: bytes, *, cache_size: int = 4096,
                 cache_ttl: float = 60.0) -> None:
        if len(master_key) != 32:
            raise KeyStoreError("audit.master_key must be 32 bytes")
        self.path = Path(directory) / KEY_STORE_NAME
        self._index_key = hmac.new(master_key, b"mcp-gateway audit subject index", hashlib.sha256).digest()
        self._wrap = AESGCM(hmac.new(master_key, b"mcp-gateway audit key wrap", hashlib.sha256).digest())
        # subject -> (expiry, sid, kid, key): a hit costs neither the HMAC nor the database.
        self._cache: OrderedDict[str, tuple[float, str, int, AESGCM]] = OrderedDict()
        self._cache_size = cache_size
        self._cache_ttl = cache_ttl
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("PRAGMA journal_mode=DELETE")
        self._db.executescript(_SCHEMA)
        # A store made under another master key must not silently start over with new keys.
        check = hmac.new(master_key, b"mcp-gateway audit master check", hashlib.sha256).hexdigest()
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('master_check', ?)", (check,))
        (stored,) = self._db.execute("SELECT value FROM meta WHERE name='master_check'").fetchone()
        if not hmac.compare_digest(str(stored), check):
            self._db.close()
            raise KeyStoreError(f"{self.path} was made under another audit.master_key")

    def close(self) -> None:
        self._db.close()

    def subject_id(self, sub: str) -> str:
        """The pseudonymous index of ``sub`` (hex HMAC-SHA256, 32 digits)."""
        return hmac.new(self._index_key, sub.encode(), hashlib.sha256).hexdigest()[:32]

    def _unwrap(self, sid: str, kid: int, wrapped: bytes) -> AESGCM:
        try:
            raw = self._wrap.decrypt(wrapped[:12], wrapped[12:], f"{sid}:{kid}".encode())
        except InvalidTag:
            raise KeyStoreError(f"{self.path}: the key of {sid} does not unwrap: wrong audit.master_key?") \
                from None
        return AESGCM(raw)

    def key_for(self, sub: str) -> tuple[str, int, AESGCM]:
        """(sid, kid, key) for sealing ``sub``'s fields; creates the key on first use."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(sub)
            if hit is not None and hit[0] > now:
                self._cache.move_to_end(sub)
                return hit[1], hit[2], hit[3]
        sid = self.subject_id(sub)
        with self._lock:
            row = self._db.execute("SELECT kid, wrapped FROM subject_keys WHERE sid=?", (sid,)).fetchone()
            if row is None:
                (last,) = self._db.execute("SELECT MAX(kid) FROM erasures WHERE sid=?", (sid,)).fetchone()
                kid = (last or 0) + 1
                raw = AESGCM.generate_key(256)
                nonce = os.urandom(12)
                wrapped = nonce + self._wrap.encrypt(nonce, raw, f"{sid}:{kid}".encode())
                # Another process may have created it meanwhile: theirs wins, read it back.
                self._db.execute("INSERT OR IGNORE INTO subject_keys VALUES (?, ?, ?, ?)",
                                 (sid, kid, wrapped, time.time()))
                row = self._db.execute("SELECT kid, wrapped FROM subject_keys WHERE sid=?", (sid,)).fetchone()
            kid, aead = int(row[0]), self._unwrap(sid, int(row[0]), bytes(row[1]))
            self._cache[sub] = (now + self._cache_ttl, sid, kid, aead)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return sid, kid, aead

    def key_for_reading(self, sid: str, kid: int) -> AESGCM | None:
        """The key ``sid``'s entries of generation ``kid`` were sealed under; None once erased."""
        with self._lock:
            row = self._db.execute("SELECT kid, wrapped FROM subject_keys WHERE sid=?", (sid,)).fetchone()
        if row is None or int(row[0]) != kid:
            return None
        return self._unwrap(sid, kid, bytes(row[1]))

    def erase(self, sub: str) -> tuple[str, int | None]:
        """Destroy ``sub``'s key: (sid, the erased kid or None when there was none)."""
        sid = self.subject_id(sub)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT kid FROM subject_keys WHERE sid=?", (sid,)).fetchone()
                if row is not None:
                    self._db.execute("DELETE FROM subject_keys WHERE sid=?", (sid,))
                    self._db.execute("INSERT INTO erasures VALUES (?, ?, ?)", (sid, int(row[0]), time.time()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._cache.pop(sub, None)
        return sid, (int(row[0]) if row is not None else None)

    # -- sealing ----------------------------------------------------------------------------------

    def seal(self, fields: dict[str, Any], sub: str) -> tuple[bytes, bytes]:
        """(sid, "pii" value), ASCII, for the personal ``fields`` of ``sub``."""
        sid, kid, aead = self.key_for(sub)
        nonce = os.urandom(12)  # random per entry: a nonce must never repeat under one key
        sealed = aead.encrypt(nonce, orjson.dumps(fields), sid.encode())
        return sid.encode(), b"%d:%s" % (kid, base64.b64encode(nonce + sealed))

    def open(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        """The personal fields of a sealed entry; None when its subject's key was erased."""
        sid, pii = entry.get("sid"), entry.get("pii")
        if not isinstance(sid, str) or not isinstance(pii, str) or ":" not in pii:
            return None
        kid_text, blob = pii.split(":", 1)
        aead = self.key_for_reading(sid, int(kid_text))
        if aead is None:
            return None
        raw = base64.b64decode(blob)
        try:
            fields: dict[str, Any] = orjson.loads(aead.decrypt(raw[:12], raw[12:], sid.encode()))
        except InvalidTag:
            return None
        return fields
