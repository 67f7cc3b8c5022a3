"""The tool catalog: every server's tools, resources and prompts, pinned by SHA-256.

A pin is the SHA-256 of the canonical JSON (orjson, sorted keys) of the fields a model reads:
tools ``{name, description, inputSchema, annotations}``, prompts ``{name, description,
arguments}``, resources ``{uri, name, description, mimeType}``. On :meth:`Catalog.refresh`:

* first sight: ``approved`` under ``tofu`` (trust on first use, the default) or ``new`` under
  ``require_approval``; a definition with hidden characters is ``quarantined`` even under tofu;
* a changed pin: ``quarantined`` (hidden from lists, calls refused) until :meth:`Catalog.approve`;
  going back to the approved definition restores ``approved``;
* :meth:`Catalog.quarantine`: an operator withdraws an item (``quarantine_reason`` set); it stays
  quarantined whatever the server lists until approved again;
* every change is a row in the append-only ``audit_events`` table (triggers refuse UPDATE/DELETE).

Storage is SQLite in WAL mode, shared by several processes: writes run in ``BEGIN IMMEDIATE``
transactions with a busy timeout, and readers keep an in-memory snapshot that is reloaded only
when ``PRAGMA data_version`` says another connection committed, so the request path
(:meth:`is_callable`, :meth:`visible`, :meth:`validate_arguments`) does not touch the disk.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastjsonschema
import jsonschema
import orjson

from gateway.errors import FORBIDDEN, INVALID_PARAMS, GatewayError

logger = logging.getLogger(__name__)

__all__ = ["APPROVED", "MODES", "NEW", "QUARANTINED", "Catalog", "CatalogError", "Entry", "InvalidArguments",
           "RefreshReport", "ToolNotCallable", "canonical_json", "default_db_path", "definition_hash",
           "hidden_char_findings"]

APPROVED = "approved"
QUARANTINED = "quarantined"
NEW = "new"
MODES = ("tofu", "require_approval")
KINDS = ("tool", "resource", "prompt")
DEFAULT_DB_NAME = "catalog.sqlite"
BUSY_TIMEOUT_MS = 10_000

_PIN_FIELDS: Mapping[str, tuple[str, ...]] = {
    "tool": ("name", "description", "inputSchema", "annotations"),
    "prompt": ("name", "description", "arguments"),
    "resource": ("uri", "name", "description", "mimeType"),
}
_KEY_FIELD = {"tool": "name", "prompt": "name", "resource": "uri"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS servers (
    name TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_refreshed REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    server TEXT NOT NULL REFERENCES servers(name),
    kind TEXT NOT NULL CHECK (kind IN ('tool', 'resource', 'prompt')),
    name TEXT NOT NULL,
    hash TEXT NOT NULL,
    approved_hash TEXT,
    definition TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('approved', 'quarantined', 'new')),
    present INTEGER NOT NULL DEFAULT 1,
    findings TEXT NOT NULL DEFAULT '[]',
    first_seen REAL NOT NULL,
    last_changed REAL NOT NULL,
    quarantine_reason TEXT,
    approved_definition TEXT,
    PRIMARY KEY (server, kind, name)
);
CREATE TABLE IF NOT EXISTS audit_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    server TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    event TEXT NOT NULL,
    old_hash TEXT,
    new_hash TEXT,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE TRIGGER IF NOT EXISTS audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
"""


# The schema's version (PRAGMA user_version). A database an older version created gains the
# columns added since (ALTER TABLE ... ADD COLUMN, its rows kept) when this version opens it.
SCHEMA_VERSION = 3
_ADDED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("quarantine_reason", "TEXT"),  # 2: set by Catalog.quarantine, cleared by approve
    ("approved_definition", "TEXT"),  # 3: the canonical JSON approved_hash pins
)
MAX_REASON_CHARS = 500


class CatalogError(GatewayError):
    code = "catalog_error"
    http_status = 500


class ToolNotCallable(GatewayError):
    """The tool is quarantined, awaiting approval, or unknown to the catalog."""

    code = "tool_not_callable"
    rpc_code = FORBIDDEN
    http_status = 403


class InvalidArguments(GatewayError):
    """``tools/call`` arguments do not match the tool's pinned inputSchema."""

    code = "invalid_arguments"
    rpc_code = INVALID_PARAMS
    http_status = 400


# Zero-width, bidi embedding/override/isolate marks, BOM, and Unicode tag characters: invisible to
# a human reviewer, readable by a model (tool poisoning, "ASCII smuggling").
_HIDDEN_RANGES = ((0x200B, 0x200F), (0x202A, 0x202E), (0x2066, 0x2069), (0xFEFF, 0xFEFF),
                  (0xE0000, 0xE007F))


def _is_hidden(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _HIDDEN_RANGES)


def _hidden_in(text: str) -> list[str]:
    if text.isascii():
        return []
    return sorted({f"U+{ord(c):04X}" for c in text if _is_hidden(c)})


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            yield where, item
        elif isinstance(item, dict):
            for k, v in item.items():
                stack.append((v, f"{where}/{k}"))
                if isinstance(k, str):
                    yield f"{where}/{k}#key", k
        elif isinstance(item, list):
            stack.extend((v, f"{where}/{i}") for i, v in enumerate(item))


def hidden_char_findings(definition: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Hidden characters in any string of a definition (name, description, schema texts...)."""
    findings = []
    for where, text in _strings(dict(definition), ""):
        chars = _hidden_in(text)
        if chars:
            findings.append({"kind": "hidden_chars", "field": where or "/", "chars": chars})
    return sorted(findings, key=lambda f: str(f["field"]))


def pinned_view(kind: str, definition: Mapping[str, Any]) -> dict[str, Any]:
    return {k: definition.get(k) for k in _PIN_FIELDS[kind]}


def canonical_json(kind: str, definition: Mapping[str, Any]) -> bytes:
    return orjson.dumps(pinned_view(kind, definition), option=orjson.OPT_SORT_KEYS)


def definition_hash(kind: str, definition: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the canonical JSON of the pinned fields of a definition."""
    return hashlib.sha256(canonical_json(kind, definition)).hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    server: str
    kind: str
    name: str
    hash: str
    approved_hash: str | None
    state: str
    present: bool
    findings: tuple[dict[str, Any], ...]
    first_seen: float
    last_changed: float
    definition: dict[str, Any] = field(compare=False, repr=False)
    # Set while an operator's quarantine (Catalog.quarantine) holds the item.
    quarantine_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"server": self.server, "kind": self.kind, "name": self.name, "hash": self.hash,
                "approved_hash": self.approved_hash, "state": self.state, "present": self.present,
                "findings": list(self.findings), "first_seen": self.first_seen,
                "last_changed": self.last_changed, "quarantine_reason": self.quarantine_reason}


@dataclass(slots=True)
class RefreshReport:
    server: str
    kind: str
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # now quarantined
    restored: list[str] = field(default_factory=list)  # back to the approved definition
    removed: list[str] = field(default_factory=list)
    findings: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class _NoRemoteRefs(Mapping[str, Any]):
    """fastjsonschema handler table that claims every URI scheme and refuses to fetch.

    Without it a ``$ref`` to an http(s)/file URI in a server-supplied schema would make the
    gateway fetch that URI (SSRF).
    """

    def __getitem__(self, scheme: str) -> Any:
        def refuse(uri: str) -> Any:
            raise fastjsonschema.JsonSchemaDefinitionException(f"remote $ref {uri!r} is not allowed")
        return refuse

    def __contains__(self, scheme: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


_NO_REMOTE = _NoRemoteRefs()


def _compile_schema(schema: Any) -> Any:
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise CatalogError("inputSchema must be an object")
    # A metaschema check first: keyword values of the wrong type never reach the code generator.
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise CatalogError(f"inputSchema is not a valid JSON Schema: {exc.message}") from None
    try:
        # use_default=False: validation must never rewrite the arguments it checks.
        return fastjsonschema.compile(schema, handlers=_NO_REMOTE, use_default=False)
    except (fastjsonschema.JsonSchemaDefinitionException, ValueError, TypeError) as exc:
        raise CatalogError(f"inputSchema cannot be compiled: {exc}") from None


def _field_of(exc: fastjsonschema.JsonSchemaValueException) -> str:
    path = [str(p) for p in (exc.path or [])[1:]]
    rule = exc.rule
    definition = exc.rule_definition
    # For "required", name the missing property itself, not the object that lacks it.
    if rule == "required" and isinstance(definition, list) and isinstance(exc.value, dict):
        missing = [p for p in definition if p not in exc.value]
        if missing:
            path.append(str(missing[0]))
    return "/" + "/".join(path) if path else "/"


class Catalog:
    """One process's handle on the shared catalog database."""

    def __init__(self, path: str | Path, *, mode: str = "tofu") -> None:
        if mode not in MODES:
            raise CatalogError(f"catalog mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE) so that writers
        # serialize on the database lock instead of failing on lock upgrade.
        self._db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._enable_wal()
        self._db.execute("PRAGMA synchronous = NORMAL")
        with self._write():
            for statement in _split_sql(_SCHEMA):
                self._db.execute(statement)
            self._migrate(self._db)
        self._snapshot: dict[tuple[str, str, str], Entry] = {}
        self._version: int | None = None
        self._validators: dict[str, Any] = {}  # inputSchema hash -> compiled validator
        self._validators_by_hash: dict[str, Any] = {}  # definition hash -> the same validators

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring a database an older version created to SCHEMA_VERSION (in the caller's write
        transaction, so concurrent openers migrate once)."""
        if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        columns = {r[1] for r in db.execute("PRAGMA table_info(items)")}
        for name, decl in _ADDED_COLUMNS:
            if name not in columns:
                db.execute(f"ALTER TABLE items ADD COLUMN {name} {decl}")
        # Where the approved definition is the current one it is known; an item whose definition
        # changed before this version keeps only the approved hash.
        db.execute("UPDATE items SET approved_definition = definition"
                   " WHERE approved_definition IS NULL AND approved_hash = hash")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _enable_wal(self) -> None:
        # Switching a new database to WAL takes a lock that the busy handler does not wait for,
        # so processes opening a fresh catalog together (ext_authz and ext_proc at start-up)
        # can see "database is locked": retry with a bounded back-off. WAL persists in the file.
        delay = 0.01
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions and snapshot ------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._version = None  # our own commits do not change data_version for us

    def _entries(self) -> dict[tuple[str, str, str], Entry]:
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version != self._version:
                self._snapshot = {(e.server, e.kind, e.name): e for e in self._load()}
                self._version = version
            return self._snapshot

    def _load(self) -> Iterator[Entry]:
        rows = self._db.execute(
            "SELECT server, kind, name, hash, approved_hash, state, present, findings, first_seen,"
            " last_changed, definition, quarantine_reason FROM items ORDER BY server, kind, name").fetchall()
        for r in rows:
            yield Entry(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), tuple(orjson.loads(r[7])),
                        r[8], r[9], orjson.loads(r[10]), r[11])

    def _audit(self, db: sqlite3.Connection, server: str, kind: str, name: str, event: str, *,
               old: str | None, new: str | None, actor: str, detail: Mapping[str, Any] | None = None,
               now: float) -> None:
        db.execute("INSERT INTO audit_events (ts, server, kind, name, event, old_hash, new_hash, actor,"
                   " detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (now, server, kind, name, event, old, new, actor,
                    orjson.dumps(dict(detail or {})).decode()))
        logger.info("catalog %s %s/%s (%s): %s -> %s", event, server, name, kind, old, new)

    # --- refresh / approve ---------------------------------------------------------------------
    def refresh(self, server: str, items: Iterable[Mapping[str, Any]], *, kind: str = "tool",
                complete: bool = True, actor: str = "refresh") -> RefreshReport:
        """Record what a server lists now. ``complete=False`` for one page of a paginated list:
        items missing from it are then not marked removed."""
        if kind not in KINDS:
            raise CatalogError(f"unknown catalog kind {kind!r}")
        key_field = _KEY_FIELD[kind]
        seen: dict[str, Mapping[str, Any]] = {}
        for item in items:
            key = item.get(key_field) if isinstance(item, Mapping) else None
            if not isinstance(key, str) or not key:
                raise CatalogError(f"a {kind} without a string {key_field!r} cannot be pinned")
            seen[key] = item
        report = RefreshReport(server, kind)
        now = time.time()
        with self._write() as db:
            db.execute("INSERT INTO servers (name, first_seen, last_refreshed) VALUES (?, ?, ?)"
                       " ON CONFLICT(name) DO UPDATE SET last_refreshed = excluded.last_refreshed",
                       (server, now, now))
            rows = {r[0]: r for r in db.execute(
                "SELECT name, hash, approved_hash, state, present, quarantine_reason FROM items"
                " WHERE server = ? AND kind = ?",
                (server, kind))}
            for name, item in seen.items():
                digest = definition_hash(kind, item)
                definition = canonical_json(kind, item).decode()
                findings = hidden_char_findings(pinned_view(kind, item))
                if findings:
                    report.findings[name] = findings
                findings_json = orjson.dumps(findings).decode()
                row = rows.get(name)
                if row is None:
                    state = APPROVED if self.mode == "tofu" and not findings else (
                        QUARANTINED if findings else NEW)
                    db.execute("INSERT INTO items (server, kind, name, hash, approved_hash, definition,"
                               " state, present, findings, first_seen, last_changed, approved_definition)"
                               " VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?)",
                               (server, kind, name, digest, digest if state == APPROVED else None,
                                definition, state, findings_json, now, now,
                                definition if state == APPROVED else None))
                    self._audit(db, server, kind, name, "added", old=None, new=digest, actor=actor,
                                now=now, detail={"state": state, "mode": self.mode, "findings": findings})
                    report.added.append(name)
                    continue
                _, old_hash, approved_hash, old_state, present, held = row
                if old_hash == digest and present:
                    continue
                if held is not None:  # an operator's quarantine: only an approval lifts it
                    state = QUARANTINED
                    event = "reappeared" if old_hash == digest else "changed"
                    if old_hash != digest:
                        report.changed.append(name)
                elif digest == approved_hash:
                    state = APPROVED
                    event = "restored" if old_hash != digest else "reappeared"
                    report.restored.append(name)
                elif old_hash == digest:
                    state, event = old_state, "reappeared"
                else:
                    state, event = QUARANTINED, "changed"
                    report.changed.append(name)
                db.execute("UPDATE items SET hash = ?, definition = ?, state = ?, present = 1,"
                           " findings = ?, last_changed = ?, approved_definition = CASE WHEN"
                           " approved_hash = ? THEN ? ELSE approved_definition END"
                           " WHERE server = ? AND kind = ? AND name = ?",
                           (digest, definition, state, findings_json, now, digest, definition,
                            server, kind, name))
                self._audit(db, server, kind, name, event, old=old_hash, new=digest, actor=actor,
                            now=now, detail={"state": state, "previous_state": old_state,
                                             "findings": findings})
            if complete:
                for name, row in rows.items():
                    if name not in seen and row[4]:
                        db.execute("UPDATE items SET present = 0, last_changed = ? WHERE server = ?"
                                   " AND kind = ? AND name = ?", (now, server, kind, name))
                        self._audit(db, server, kind, name, "removed", old=row[1], new=None,
                                    actor=actor, now=now)
                        report.removed.append(name)
        return report

    def approve(self, server: str, name: str, *, kind: str = "tool", actor: str = "cli",
                expected_hash: str | None = None) -> Entry:
        """Approve the current definition of one item (audited). With ``expected_hash`` (the
        hash of the definition the approver reviewed), a definition that changed since is
        refused with ``definition_changed`` (409) and nothing is approved: the check and the
        approval are one write transaction, so a server cannot swap its definition in between."""
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT hash, approved_hash, state FROM items WHERE server = ? AND kind = ?"
                             " AND name = ?", (server, kind, name)).fetchone()
            if row is None:
                raise CatalogError(f"no {kind} {server}/{name} in the catalog", code="not_found",
                                   http_status=404)
            if expected_hash is not None and row[0] != expected_hash.strip().lower():
                raise CatalogError(
                    f"the definition of {kind} {server}/{name} changed since it was reviewed "
                    f"(reviewed {expected_hash[:64]}, now {row[0]}): review it again",
                    code="definition_changed", http_status=409,
                    data={"expected_hash": expected_hash[:64], "hash": row[0]})
            db.execute("UPDATE items SET state = ?, approved_hash = hash, approved_definition = definition,"
                       " quarantine_reason = NULL, last_changed = ?"
                       " WHERE server = ? AND kind = ? AND name = ?",
                       (APPROVED, now, server, kind, name))
            self._audit(db, server, kind, name, "approved", old=row[1], new=row[0], actor=actor, now=now,
                        detail={"previous_state": row[2]})
        entry = self.get(server, name, kind=kind)
        assert entry is not None
        return entry

    def quarantine(self, server: str, name: str, *, kind: str = "tool", actor: str = "cli",
                   reason: str | None = None) -> Entry:
        """Withdraw one item (audited): hidden from lists and its calls refused, as for a changed
        pin, and held so until :meth:`approve`, whatever the server lists meanwhile."""
        reason = (reason or "").strip()[:MAX_REASON_CHARS] or "quarantined by an operator"
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT hash, approved_hash, state FROM items WHERE server = ? AND kind = ?"
                             " AND name = ?", (server, kind, name)).fetchone()
            if row is None:
                raise CatalogError(f"no {kind} {server}/{name} in the catalog", code="not_found",
                                   http_status=404)
            db.execute("UPDATE items SET state = ?, quarantine_reason = ?, last_changed = ?"
                       " WHERE server = ? AND kind = ? AND name = ?",
                       (QUARANTINED, reason, now, server, kind, name))
            self._audit(db, server, kind, name, "quarantined", old=row[1], new=row[0], actor=actor,
                        now=now, detail={"previous_state": row[2], "reason": reason})
        entry = self.get(server, name, kind=kind)
        assert entry is not None
        return entry

    # --- queries (request path: memory only) ---------------------------------------------------
    def get(self, server: str, name: str, *, kind: str = "tool") -> Entry | None:
        return self._entries().get((server, kind, name))

    def entries(self, server: str | None = None, *, kind: str | None = None) -> list[Entry]:
        return [e for e in self._entries().values()
                if (server is None or e.server == server) and (kind is None or e.kind == kind)]

    def is_callable(self, server: str, tool: str) -> bool:
        entry = self.get(server, tool)
        return entry is not None and entry.present and entry.state == APPROVED

    def check_callable(self, server: str, tool: str) -> Entry:
        """The approved entry of a tool, or :class:`ToolNotCallable` saying why not."""
        entry = self.get(server, tool)
        if entry is None or not entry.present:
            raise ToolNotCallable(f"tool {tool!r} is not in the catalog of server {server!r}",
                                  data={"tool": tool, "state": "unknown"})
        if entry.state != APPROVED:
            raise ToolNotCallable(
                f"tool {tool!r} is {entry.state}: its definition changed or awaits approval "
                f"(mcp-gateway catalog approve {server}/{tool})",
                data={"tool": tool, "state": entry.state})
        return entry

    def visible(self, server: str, items: Iterable[Mapping[str, Any]], *,
                kind: str = "tool") -> list[Mapping[str, Any]]:
        """The listed items whose exact definition is approved (anything else is hidden)."""
        key_field = _KEY_FIELD[kind]
        snapshot = self._entries()
        out = []
        for item in items:
            key = item.get(key_field)
            entry = snapshot.get((server, kind, key)) if isinstance(key, str) else None
            if entry is not None and entry.state == APPROVED and entry.approved_hash is not None \
                    and definition_hash(kind, item) == entry.approved_hash:
                out.append(item)
        return out

    def validate_arguments(self, server: str, tool: str, arguments: Any) -> InvalidArguments | None:
        """``None`` when the arguments match the tool's approved inputSchema, else the error
        (naming the field as a JSON pointer in ``data.field``). Raises :class:`ToolNotCallable`."""
        return self.validate_entry_arguments(self.check_callable(server, tool), arguments)

    def validate_entry_arguments(self, entry: Entry, arguments: Any) -> InvalidArguments | None:
        """:meth:`validate_arguments` for an entry already looked up (and found callable) by the
        caller: one snapshot lookup per call instead of two."""
        tool = entry.name
        # The definition hash pins the inputSchema, so it names the validator without hashing
        # the schema again on every call.
        validator = self._validators_by_hash.get(entry.hash)
        if validator is None:
            schema = entry.definition.get("inputSchema")
            key = hashlib.sha256(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)).hexdigest()
            validator = self._validators.get(key)
            if validator is None:
                validator = _compile_schema(schema)
                self._validators[key] = validator
            self._validators_by_hash[entry.hash] = validator
        try:
            validator(arguments)
        except fastjsonschema.JsonSchemaValueException as exc:
            where = _field_of(exc)
            message = exc.message.replace("data", "arguments", 1) if exc.message.startswith("data") \
                else exc.message
            return InvalidArguments(f"invalid arguments for tool {tool!r}: {message}",
                                    data={"field": where, "rule": exc.rule, "tool": tool})
        return None

    def approved_definition(self, server: str, name: str, *, kind: str = "tool") -> dict[str, Any] | None:
        """The pinned fields of the definition last approved (read from the database: the
        request path's snapshot does not hold it); None when never approved, or when what is
        stored is not what ``approved_hash`` pins (approved by a version that did not store it)."""
        with self._lock:
            row = self._db.execute("SELECT approved_definition, approved_hash FROM items WHERE server = ?"
                                   " AND kind = ? AND name = ?", (server, kind, name)).fetchone()
        if row is None or row[0] is None or row[1] is None:
            return None
        value: dict[str, Any] = orjson.loads(row[0])
        return value if definition_hash(kind, value) == row[1] else None

    def shadowed_names(self) -> dict[str, list[str]]:
        """Tool names offered by more than one server (a confused-deputy / shadowing risk)."""
        servers: dict[str, set[str]] = {}
        for e in self._entries().values():
            if e.kind == "tool" and e.present:
                servers.setdefault(e.name, set()).add(e.server)
        return {name: sorted(s) for name, s in sorted(servers.items()) if len(s) > 1}

    def audit_events(self, server: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT id, ts, server, kind, name, event, old_hash, new_hash, actor, detail"
               " FROM audit_events")
        where: list[str] = []
        args: list[Any] = []
        if server is not None:
            where.append("server = ?")
            args.append(server)
        if name is not None:
            where.append("name = ?")
            args.append(name)
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        keys = ("id", "ts", "server", "kind", "name", "event", "old_hash", "new_hash", "actor", "detail")
        return [{**dict(zip(keys, r, strict=True)), "detail": orjson.loads(r[9])} for r in rows]


def _split_sql(script: str) -> list[str]:
    # Triggers contain ";" inside BEGIN...END; split on the statement terminators only.
    out: list[str] = []
    buf: list[str] = []
    for line in script.strip().splitlines():
        buf.append(line)
        text = "\n".join(buf)
        if sqlite3.complete_statement(text):
            out.append(text)
            buf = []
    return out


def default_db_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / DEFAULT_DB_NAME
