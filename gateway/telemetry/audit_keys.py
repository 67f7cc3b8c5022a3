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

Writers seal a batch of entries at a time (:meth:`SubjectKeyStore.sealing`) and cache the
unwrapped keys in memory (a bounded LRU, ``cache_size`` subjects), so an entry costs one AES-GCM
call and no database round trip. An erasure reaches every writer, whatever its process, before its
next batch: each batch first reads the store file's change counter (one ``pread`` of its header,
which every commit of any connection bumps in rollback-journal mode; ``PRAGMA data_version`` if
the file is in WAL mode) and, only when it moved, whether an erasure was recorded since (the
``erasures`` table's last row), in which case the whole cache is dropped. So an entry whose
write starts after ``audit erase`` returned is sealed under the subject's new key, never the
erased one, and no writer holds the erased key past its next batch (an idle writer holds it until
then).

Nonces: each batch starts from 96 random bits and counts up (at most ``max_batch`` entries), so
nonces of one key never repeat within a batch and collide across batches and processes no more
often than random 96-bit nonces.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_STORE_NAME = "subject-keys.sqlite"
_NONCE_MASK = (1 << 96) - 1
_SELECT_CHUNK = 500  # sids per "IN (...)" (older SQLite allows 999 parameters)
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


def master_key_from_env(name: str, where: str = "audit.master_key") -> bytes | None:
    """The master key held by the environment variable ``name``, else by the file the variable
    ``<name>_FILE`` names (how docker compose's pki-init hands it over: deploy/compose); None when
    neither is set. KeyStoreError naming ``where`` and the variable for a malformed key or an
    unreadable file."""
    value = os.environ.get(name, "")
    if not value and os.environ.get(f"{name}_FILE"):
        path = os.environ[f"{name}_FILE"]
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise KeyStoreError(f"{where}: cannot read {path} ({name}_FILE): {exc.strerror}") from None
        if not value:
            raise KeyStoreError(f"{where}: {path} ({name}_FILE) is empty")
    if not value:
        return None
    return parse_master_key(value, f"{where} ({name})")


def new_master_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


class SubjectKeyStore:
    """Per-subject AES-256-GCM keys in SQLite, wrapped by the master key; safe across processes."""

    def __init__(self, directory: str | Path, master_key: bytes, *, cache_size: int = 4096) -> None:
        if len(master_key) != 32:
            raise KeyStoreError("audit.master_key must be 32 bytes")
        if cache_size <= 0:
            raise ValueError("cache_size must be > 0")
        self.path = Path(directory) / KEY_STORE_NAME
        self._index_key = hmac.new(master_key, b"mcp-gateway audit subject index", hashlib.sha256).digest()
        self._wrap = AESGCM(hmac.new(master_key, b"mcp-gateway audit key wrap", hashlib.sha256).digest())
        # subject -> (sid, "<kid>:", key), least recently used first: a hit costs neither the HMAC
        # nor the database. Dropped whole when any connection records an erasure (_forget_erased).
        self._cache: OrderedDict[str, tuple[bytes, bytes, AESGCM]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA secure_delete=ON")
        mode = self._db.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
        self._db.executescript(_SCHEMA)
        # A store made under another master key must not silently start over with new keys.
        check = hmac.new(master_key, b"mcp-gateway audit master check", hashlib.sha256).hexdigest()
        self._check = check
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('master_check', ?)", (check,))
        (stored,) = self._db.execute("SELECT value FROM meta WHERE name='master_check'").fetchone()
        if not hmac.compare_digest(str(stored), check):
            self._db.close()
            raise KeyStoreError(f"{self.path} was made under another audit.master_key")
        # In rollback-journal mode every commit, of any connection, bumps the file change counter
        # (4 bytes at offset 24 of the file's header): one pread tells whether anything changed. A
        # store another process put in WAL mode does not bump it: then ask SQLite (data_version).
        rollback = str(mode).lower() == "delete"
        self._header_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC) if rollback else -1
        # What this store last saw of the file's commits and of the erasures.
        self._version = self._change_version()
        self._erasure_mark = self._last_erasure()

    def close(self) -> None:
        self._db.close()
        if self._header_fd >= 0:
            os.close(self._header_fd)
            self._header_fd = -1

    def _change_version(self) -> object:
        """A value that differs once any connection (any process) committed a change to the store."""
        if self._header_fd >= 0:
            return os.pread(self._header_fd, 4, 24)
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    def reader(self, directory: str | Path) -> SubjectKeyReader | None:
        """A read-only view of the key store in ``directory`` (another writer's folder) under
        this store's master key; None when that folder has no store. Raises KeyStoreError for a
        store that does not open or was made under another master key."""
        path = Path(directory) / KEY_STORE_NAME
        if not path.is_file():
            return None
        return SubjectKeyReader(path, wrap=self._wrap, check=self._check)

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

    def _last_erasure(self) -> int:
        return int(self._db.execute("SELECT IFNULL(MAX(rowid), 0) FROM erasures").fetchone()[0])

    def _forget_erased(self) -> None:
        """Drop every cached key if any connection (any process) recorded an erasure since the last call.

        One read of the file's change counter, and only when it moved the erasures table's last
        row: cheap enough to run before every batch. Under ``_lock``.
        """
        version = self._change_version()
        if version == self._version:
            return
        self._version = version
        mark = self._last_erasure()
        if mark != self._erasure_mark:
            self._erasure_mark = mark
            self._cache.clear()

    def _load(self, subs: set[str]) -> None:
        """Put the keys of ``subs`` (not cached) in the cache, creating the missing ones: one
        transaction (one journal fsync) for all of them, not one per subject. Under ``_lock``."""
        by_sid = {self.subject_id(sub): sub for sub in subs}
        rows = self._select(list(by_sid))
        missing = [sid for sid in by_sid if sid not in rows]
        if missing:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sid in missing:
                    (last,) = self._db.execute("SELECT MAX(kid) FROM erasures WHERE sid=?", (sid,)).fetchone()
                    kid = (last or 0) + 1
                    nonce, raw = os.urandom(12), AESGCM.generate_key(256)
                    wrapped = nonce + self._wrap.encrypt(nonce, raw, f"{sid}:{kid}".encode())
                    # Another process may have created it since the select: theirs wins, read back below.
                    self._db.execute("INSERT OR IGNORE INTO subject_keys VALUES (?, ?, ?, ?)",
                                     (sid, kid, wrapped, time.time()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            rows.update(self._select(missing))
        for sid, sub in by_sid.items():
            kid, wrapped = rows[sid]
            self._cache[sub] = (sid.encode(), b"%d:" % kid, self._unwrap(sid, kid, wrapped))
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _select(self, sids: list[str]) -> dict[str, tuple[int, bytes]]:
        """sid -> (kid, wrapped key) of those of ``sids`` that have a key."""
        rows: dict[str, tuple[int, bytes]] = {}
        for i in range(0, len(sids), _SELECT_CHUNK):
            chunk = sids[i:i + _SELECT_CHUNK]
            marks = ",".join("?" * len(chunk))  # placeholders only: the sids are parameters
            query = f"SELECT sid, kid, wrapped FROM subject_keys WHERE sid IN ({marks})"  # noqa: S608
            for sid, kid, wrapped in self._db.execute(query, chunk):
                rows[str(sid)] = (int(kid), bytes(wrapped))
        return rows

    def key_for(self, sub: str) -> tuple[str, int, AESGCM]:
        """(sid, kid, key) for sealing ``sub``'s fields; creates the key on first use."""
        with self._lock:
            self._forget_erased()
            if sub not in self._cache:
                self._load({sub})
            sid, prefix, aead = self._cache[sub]
        return sid.decode(), int(prefix[:-1]), aead

    def cached_subjects(self) -> int:
        """How many subjects' keys are in memory."""
        return len(self._cache)

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

    @contextmanager
    def sealing(self, subjects: Iterable[str]) -> Iterator[Callable[[str, bytes], tuple[bytes, bytes]]]:
        """Seal one batch: ``with store.sealing(subs) as seal: sid, pii = seal(sub, fields_json)``
        for each ``sub`` of ``subjects``.

        Holds the store's lock for the batch; first drops the keys erased since the last batch
        (by any process), then loads or creates the keys of the batch's subjects not in memory,
        all at once. ``seal`` returns ASCII (sid, "pii" value): ``<kid>:`` and base64 of the
        nonce and the AES-GCM ciphertext of ``fields_json``, with ``sid`` as associated data.
        """
        with self._lock:
            self._forget_erased()
            cache, load = self._cache, self._load
            missing = {sub for sub in subjects if sub not in cache}
            if missing:
                load(missing)
            counter = int.from_bytes(os.urandom(12), "big")

            def seal(sub: str, fields_json: bytes) -> tuple[bytes, bytes]:
                nonlocal counter
                hit = cache.get(sub)
                if hit is None:  # evicted while this batch's other subjects were loaded (a full cache)
                    load({sub})
                    hit = cache[sub]
                else:
                    cache.move_to_end(sub)
                sid, prefix, aead = hit
                counter = (counter + 1) & _NONCE_MASK
                nonce = counter.to_bytes(12, "big")
                return sid, prefix + binascii.b2a_base64(nonce + aead.encrypt(nonce, fields_json, sid),
                                                         newline=False)

            yield seal

    def seal(self, fields: dict[str, Any], sub: str) -> tuple[bytes, bytes]:
        """(sid, "pii" value), ASCII, for the personal ``fields`` of ``sub`` (one entry; batches:
        :meth:`sealing`)."""
        with self.sealing((sub,)) as seal:
            return seal(sub, orjson.dumps(fields))

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


class SubjectKeyReader:
    """A read-only view of a key store another writer owns: the keys to open its sealed entries
    with, never a write (no schema, no meta row, no chmod; the file is opened ``mode=ro``, so a
    read-only mount works). The web console uses one per writer folder of the trail."""

    def __init__(self, path: str | Path, *, wrap: AESGCM, check: str) -> None:
        """Prefer :meth:`SubjectKeyStore.reader` (the same master key, derived once)."""
        self.path = Path(path)
        self._wrap = wrap
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0,
                                       check_same_thread=False)
            row = self._db.execute("SELECT value FROM meta WHERE name='master_check'").fetchone()
        except sqlite3.Error as exc:
            raise KeyStoreError(f"{self.path}: not a readable audit key store ({exc})") from None
        if row is None or not hmac.compare_digest(str(row[0]), check):
            self._db.close()
            raise KeyStoreError(f"{self.path} was made under another audit.master_key")

    def key_for_reading(self, sid: str, kid: int) -> AESGCM | None:
        """As :meth:`SubjectKeyStore.key_for_reading`: None once erased (or never made here)."""
        with self._lock:
            row = self._db.execute("SELECT kid, wrapped FROM subject_keys WHERE sid=?", (sid,)).fetchone()
        if row is None or int(row[0]) != kid:
            return None
        wrapped = bytes(row[1])
        try:
            return AESGCM(self._wrap.decrypt(wrapped[:12], wrapped[12:], f"{sid}:{kid}".encode()))
        except InvalidTag:
            raise KeyStoreError(f"{self.path}: the key of {sid} does not unwrap: wrong audit.master_key?") \
                from None

    def close(self) -> None:
        self._db.close()
