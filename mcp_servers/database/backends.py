"""Read-only database access for the ``database`` MCP server.

Read-only is enforced by the database engine, never by inspecting SQL text:

* SQLite: each call opens the file with ``mode=ro`` (the library refuses every write), sets
  ``PRAGMA query_only``, and installs an authorizer that denies ATTACH/DETACH (which could read
  other database files on disk) and every PRAGMA outside a short list of schema readers. The
  ``sqlite3`` driver itself refuses more than one statement per ``execute``.
* PostgreSQL: each call runs in ``BEGIN READ ONLY``, takes a snapshot first (so ``SET TRANSACTION
  READ WRITE`` can no longer flip it), is prepared as one statement (the extended protocol rejects
  several), must describe a row-returning statement (so COMMIT/SET cannot end or change the
  transaction), and is always rolled back.

A query from the ``query`` tool also carries a :class:`ReadScope`: the tables its SQL reads and
the functions it may call, from the same parse of the same text that the gateway's policy judged
(``gateway.policy.sql.analyze``). The engine then enforces that scope itself, so a difference
between the parser and the engine refuses the query instead of widening it:

* SQLite: a per-call authorizer allows SQLITE_READ of those tables only, SQLITE_FUNCTION of those
  functions only, SELECT and recursive CTEs; every other action is denied at prepare time. A read
  through a view counts as a read of its base tables (SQLite names a view or CTE only as the
  "source" of a read, and a CTE may take any name).
* PostgreSQL: before the statement runs, ``EXPLAIN (VERBOSE, FORMAT JSON)`` of it (same text, same
  parameters, same read-only transaction) must name only those relations (schema-resolved) and
  only those functions in function scans. The planner resolves names exactly as execution will,
  which a second SQL parser could not promise; views, inheritance and partitions show their base
  tables and are therefore refused unless those are in scope. Function calls in expressions are
  not in the plan: they are held to the allowlist by the parse, and a role without EXECUTE on
  anything dangerous is the production layer under it.

Writes exist only as the ``insert_row`` and ``delete_row`` tools, only for the tables the server
is started with as writable (``--writable-table``), and never through ``query``: each runs one
statement the server builds itself (identifiers read from the schema and quoted, every value a
bound parameter) on a connection of its own, never one of the read path's:

* SQLite: a ``mode=rw`` connection per call whose authorizer admits only that INSERT or DELETE on
  that one table and reads of its columns; the read path's connections stay ``mode=ro``.
* PostgreSQL: a second pool, used only by these two calls, each one statement in a read-write
  transaction; the read path's transactions stay READ ONLY.

Use a database role with only SELECT grants in production as well (and INSERT/DELETE on the
writable tables for the writes' role); these layers protect the data
but a read-only transaction can still call functions with side effects outside the database.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import decimal
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

logger = logging.getLogger(__name__)

Params = Sequence[Any] | dict[str, Any] | None

# Schema readers that cannot change anything; all other pragmas are denied by the authorizer.
_READ_PRAGMAS = frozenset({"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo",
                           "foreign_key_list"})
_PROGRESS_OPS = 1000
_READ_ONLY_HINT = "the database is read-only; only SELECT queries are allowed"
_NOT_A_QUERY = "the statement returns no rows; only queries (SELECT, WITH, VALUES) are allowed"
_TIMEOUT_HINT = "it ran longer than the time limit; narrow it (WHERE, LIMIT) or use an index"
_PARAMS_HINT = "parameters do not match the placeholders"


class DatabaseError(Exception):
    """A failed database call; ``code`` is stable, the message tells the caller what to change."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool

    def as_dict(self) -> dict[str, Any]:
        return {"columns": self.columns, "rows": self.rows, "rowCount": len(self.rows),
                "truncated": self.truncated}


@dataclass(frozen=True)
class ReadScope:
    """What one caller's query may touch: ``tables`` as the SQL facts name them (lower-case,
    ``schema.table`` when qualified) and the ``functions`` it may call (lower-case)."""

    tables: frozenset[str]
    functions: frozenset[str]
    ctes: frozenset[str] = frozenset()

    @property
    def bare_tables(self) -> frozenset[str]:
        return frozenset(t for t in self.tables if "." not in t)

    @property
    def qualified_tables(self) -> frozenset[str]:
        return frozenset(t for t in self.tables if "." in t)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _scope_refused(what: str) -> DatabaseError:
    return DatabaseError("not_authorized", f"the query {what}, outside what was checked for this call")


class Backend(Protocol):
    kind: str

    async def list_tables(self) -> list[dict[str, Any]]: ...

    async def describe_table(self, table: str) -> dict[str, Any]: ...

    async def query(self, sql: str, params: Params, max_rows: int, time_limit: float,
                    scope: ReadScope | None = None) -> QueryResult:
        """Run one query; ``scope`` (a caller's SQL) limits what the engine may read and call,
        None is for the server's own catalogue queries."""

    async def insert_row(self, target: WritableTable, values: dict[str, Any]) -> Any:
        """Insert one row of checked ``values`` into ``target`` on the write connection; the new
        row's key. Refused unless the backend was built with ``target`` writable."""

    async def delete_row(self, target: WritableTable, row_id: int | str) -> bool:
        """Delete the row of ``target`` whose key is ``row_id``; False if there was none."""

    async def start(self) -> None:
        """Acquire what needs the event loop (pools); called once when the server starts."""

    async def close(self) -> None:
        """Release everything; later calls fail with DatabaseError("unavailable")."""


def jsonable(value: Any) -> Any:
    """Map driver values onto JSON: bytes as base64, exact numbers and times as strings."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# The server's own catalogue queries (tables, row counts, columns): generous bounds, no scope.
_CATALOGUE_ROWS = 10_000
_CATALOGUE_SECONDS = 10.0


async def _tables_with_counts(backend: Backend, listing_sql: str) -> list[dict[str, Any]]:
    """The tables and views ``listing_sql`` lists (rows of name and kind), each with its row count."""
    listed = await backend.query(listing_sql, None, _CATALOGUE_ROWS, _CATALOGUE_SECONDS)
    tables = []
    for name, kind in listed.rows:
        count = await backend.query(f"SELECT count(*) FROM {quote_identifier(name)}",  # noqa: S608
                                    None, 1, _CATALOGUE_SECONDS)
        tables.append({"name": name, "type": kind, "rows": count.rows[0][0]})
    return tables


async def _require_table(backend: Backend, table: str) -> None:
    """Refuse a name that is not one of the tables and views ``list_tables`` shows."""
    known = {t["name"] for t in await backend.list_tables()}
    if table not in known:
        raise DatabaseError("unknown_table",
                            f"no table named {table!r}; available tables: {', '.join(sorted(known))}")


# -- Writes: insert_row / delete_row only -----------------------------------------------------------

# Bounds of one written row (the tools' input schemas say the same; the backend checks again).
MAX_WRITE_COLUMNS = 64
MAX_IDENTIFIER_CHARS = 128
MAX_VALUE_CHARS = 4096
_INT64 = (-(1 << 63), (1 << 63) - 1)
_WRITE_SECONDS = 10.0


@dataclass(frozen=True)
class WritableTable:
    """A table the server may write, as its schema was read at start-up: the single-column
    primary key that names a row, and the other columns a caller may set."""

    name: str
    key: str
    columns: frozenset[str]


def writable_table(described: dict[str, Any]) -> WritableTable:
    """The write target of a ``describe_table`` answer; refuses a table without a single-column
    primary key (no row id to return and delete by)."""
    name = str(described["table"])
    keys = [str(c["name"]) for c in described["columns"] if c["primaryKey"]]
    if len(keys) != 1:
        raise DatabaseError("not_writable",
                            f"table {name!r} has no single-column primary key to name rows by")
    return WritableTable(name=name, key=keys[0],
                         columns=frozenset(str(c["name"]) for c in described["columns"]) - {keys[0]})


def check_row(target: WritableTable, values: dict[str, Any]) -> list[tuple[str, Any]]:
    """``values`` as (column, value) pairs in a stable order, or DatabaseError naming what is wrong:
    a column the table does not have (or its key, which the database assigns), a value that is
    not a JSON scalar, or one over the bounds."""
    if not isinstance(values, dict):
        raise DatabaseError("bad_values", "values must be an object of column -> value")
    if len(values) > MAX_WRITE_COLUMNS:
        raise DatabaseError("too_large", f"at most {MAX_WRITE_COLUMNS} columns per row")
    pairs: list[tuple[str, Any]] = []
    for column in sorted(values):
        value = values[column]
        if column == target.key:
            raise DatabaseError("bad_values", f"column {column!r} is the key; the database assigns it")
        if column not in target.columns:
            raise DatabaseError("unknown_column", f"table {target.name!r} has no column {column[:128]!r}; "
                                                  f"columns: {', '.join(sorted(target.columns))}")
        if isinstance(value, str):
            if len(value) > MAX_VALUE_CHARS:
                raise DatabaseError("too_large",
                                    f"value of {column!r} has more than {MAX_VALUE_CHARS} characters")
        elif isinstance(value, int) and not isinstance(value, bool):
            if not _INT64[0] <= value <= _INT64[1]:
                raise DatabaseError("too_large", f"value of {column!r} is outside the 64-bit integer range")
        elif isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise DatabaseError("bad_values", f"value of {column!r} is not a finite number")
        elif value is not None and not isinstance(value, bool):
            raise DatabaseError("bad_values", f"value of {column!r} is not a JSON scalar "
                                              "(string, number, boolean or null)")
        pairs.append((column, value))
    return pairs


def check_row_id(row_id: Any) -> int | str:
    if isinstance(row_id, bool) or not isinstance(row_id, int | str):
        raise DatabaseError("bad_values", "id must be an integer or a string")
    if isinstance(row_id, int) and not _INT64[0] <= row_id <= _INT64[1]:
        raise DatabaseError("too_large", "id is outside the 64-bit integer range")
    if isinstance(row_id, str) and len(row_id) > MAX_IDENTIFIER_CHARS * 2:
        raise DatabaseError("too_large", f"id has more than {MAX_IDENTIFIER_CHARS * 2} characters")
    return row_id


def _insert_sql(target: WritableTable, columns: Sequence[str], marks: Sequence[str]) -> str:
    if not columns:
        return f"INSERT INTO {quote_identifier(target.name)} DEFAULT VALUES " \
               f"RETURNING {quote_identifier(target.key)}"  # noqa: S608 - identifiers from the schema
    return (f"INSERT INTO {quote_identifier(target.name)} "  # noqa: S608 - identifiers from the schema
            f"({', '.join(quote_identifier(c) for c in columns)}) VALUES ({', '.join(marks)}) "
            f"RETURNING {quote_identifier(target.key)}")


def _delete_sql(target: WritableTable, mark: str) -> str:
    return (f"DELETE FROM {quote_identifier(target.name)} "  # noqa: S608 - identifiers from the schema
            f"WHERE {quote_identifier(target.key)} = {mark} RETURNING {quote_identifier(target.key)}")


# -- SQLite ---------------------------------------------------------------------------------------


def _authorize(action: int, arg1: str | None, arg2: str | None, _db: str | None, _src: str | None) -> int:
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() not in _READ_PRAGMAS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


# Every table and view of the database (main and temp; ATTACH is never authorized).
_STORED_NAMES = ("SELECT name FROM main.sqlite_schema WHERE type IN ('table', 'view') "
                 "UNION ALL SELECT name FROM temp.sqlite_schema WHERE type IN ('table', 'view')")


def _scoped_authorizer(scope: ReadScope, denied: list[str], stored: frozenset[str] = frozenset()) -> Any:
    """An authorizer for one caller query: reads of ``scope.tables``, calls of
    ``scope.functions``, SELECT and recursive CTEs; every other action is denied (and noted).
    ``stored``: the lower-cased names of the database's tables and views, which the allowance
    for a materialized CTE never covers."""
    bare = scope.bare_tables
    qualified = scope.qualified_tables
    # A read of no column ("count(*)") comes without a database name.
    qualified_names = frozenset(t.rsplit(".", 1)[1] for t in qualified)

    def authorize(action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None) -> int:
        if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_RECURSIVE):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_READ:
            table = (arg1 or "").translate(_ASCII_LOWER)
            # The source (a view or CTE name) is never trusted: a CTE can take the name of an
            # allowed table. A view is readable only when its base tables are in scope too.
            if table in bare:
                return sqlite3.SQLITE_OK
            if db is not None and f"{db.translate(_ASCII_LOWER)}.{table}" in qualified:
                return sqlite3.SQLITE_OK
            if db is None and table in qualified_names:
                return sqlite3.SQLITE_OK
            # SQLite reports a materialized CTE as a read of no column without a database. A
            # real table of that name read that way would yield a row count only, and any real
            # table the text reads is in scope.tables already (the policy judged those).
            if db is None and not arg2 and table in scope.ctes and table not in stored:
                return sqlite3.SQLITE_OK
            denied.append(f"reads table {arg1!r}")
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_FUNCTION:
            if (arg2 or "").translate(_ASCII_LOWER) in scope.functions:
                return sqlite3.SQLITE_OK
            denied.append(f"calls function {arg2!r}")
            return sqlite3.SQLITE_DENY
        denied.append(f"needs action {action} ({arg1!r})")
        return sqlite3.SQLITE_DENY

    return authorize


def _sqlite_error(err: sqlite3.Error, stopped: str | None) -> DatabaseError:
    text = str(err)
    if stopped is not None:
        return DatabaseError(stopped, "the query was stopped: " + (
            _TIMEOUT_HINT
            if stopped == "timeout" else "the request was cancelled"))
    if isinstance(err, sqlite3.ProgrammingError) and "one statement" in text:
        return DatabaseError("multiple_statements", "only one SQL statement per call is allowed")
    if "readonly" in text.replace("-", "").replace(" ", "") or "query_only" in text:
        return DatabaseError("read_only", f"{_READ_ONLY_HINT} ({text})")
    if "not authorized" in text:
        return DatabaseError(
            "not_authorized",
            f"statement not allowed ({text}): ATTACH, DETACH and PRAGMAs other than "
            f"{', '.join(sorted(_READ_PRAGMAS))} are disabled")
    if isinstance(err, sqlite3.ProgrammingError | sqlite3.InterfaceError) and "binding" in text.lower():
        return DatabaseError("bad_parameters", f"{_PARAMS_HINT}: {text}")
    return DatabaseError("sql_error", f"SQL error: {text}")


class SQLiteBackend:
    """Per-call read-only connections to one SQLite file, run in worker threads."""

    kind = "sqlite"

    def __init__(self, path: str | Path, *, writable: Iterable[str] = ()) -> None:
        self.path = str(Path(path).resolve())
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"SQLite database {self.path} does not exist")
        self._uri = f"file:{quote(self.path)}?mode=ro"
        # Only insert_row / delete_row open the file read-write, each call on its own connection
        # whose authorizer admits that one statement on that one table.
        self._write_uri = f"file:{quote(self.path)}?mode=rw"
        self.writable = frozenset(writable)
        # Stop flags of queries running in worker threads, so close() can end them.
        self._running: set[threading.Event] = set()
        self._closed = False

    def _connect(self, scope: ReadScope | None = None, denied: list[str] | None = None
                 ) -> sqlite3.Connection:
        # A fresh connection per call: a statement is authorized when prepared, so no prepared
        # statement (sqlite3's cache) may outlive the authorizer it was checked against.
        conn = sqlite3.connect(self._uri, uri=True, timeout=5, check_same_thread=False, isolation_level=None,
                               cached_statements=0)
        conn.execute("PRAGMA query_only = ON")
        if scope is None:
            conn.set_authorizer(_authorize)
        else:
            # Read before the authorizer is set: the names no CTE allowance may ever cover.
            stored = frozenset(str(name).translate(_ASCII_LOWER) for (name,) in conn.execute(_STORED_NAMES))
            conn.set_authorizer(_scoped_authorizer(scope, denied if denied is not None else [], stored))
        return conn

    def _run(self, sql: str, params: Params, max_rows: int, time_limit: float,
             stop: threading.Event, scope: ReadScope | None = None) -> QueryResult:
        deadline = time.monotonic() + time_limit
        stopped: list[str] = []

        def progress() -> int:
            if stop.is_set():
                stopped.append("cancelled")
                return 1
            if time.monotonic() > deadline:
                stopped.append("timeout")
                return 1
            return 0

        denied: list[str] = []
        conn = self._connect(scope, denied)
        try:
            conn.set_progress_handler(progress, _PROGRESS_OPS)
            try:
                cur = conn.execute(sql, params if params is not None else ())
                if cur.description is None:
                    raise DatabaseError("not_a_query", _NOT_A_QUERY)
                columns = [d[0] for d in cur.description]
                fetched = cur.fetchmany(max_rows + 1)
            except sqlite3.Error as err:
                if denied:
                    raise _scope_refused(denied[0]) from None
                raise _sqlite_error(err, stopped[0] if stopped else None) from None
        finally:
            conn.close()
        rows = [[jsonable(v) for v in row] for row in fetched[:max_rows]]
        return QueryResult(columns=columns, rows=rows, truncated=len(fetched) > max_rows)

    async def query(self, sql: str, params: Params, max_rows: int, time_limit: float,
                    scope: ReadScope | None = None) -> QueryResult:
        if self._closed:
            raise DatabaseError("unavailable", "the database is closed (the server is shutting down)")
        stop = threading.Event()
        self._running.add(stop)
        try:
            return await asyncio.to_thread(self._run, sql, params, max_rows, time_limit, stop, scope)
        except asyncio.CancelledError:
            stop.set()  # the worker thread keeps running until the progress handler sees this
            raise
        finally:
            self._running.discard(stop)

    def _write(self, target: WritableTable, action: int, sql: str, params: Sequence[Any]) -> list[Any]:
        if target.name not in self.writable:
            raise DatabaseError("not_writable", f"table {target.name!r} is not writable")
        denied: list[str] = []

        def authorize(code: int, arg1: str | None, arg2: str | None, db: str | None, _src: str | None) -> int:
            # The one write on the one table, and reads of its own columns (WHERE, RETURNING).
            if code in (action, sqlite3.SQLITE_READ) and arg1 == target.name and db in (None, "main"):
                return sqlite3.SQLITE_OK
            denied.append(f"needs action {code} ({arg1!r})")
            return sqlite3.SQLITE_DENY

        conn = sqlite3.connect(self._write_uri, uri=True, timeout=_WRITE_SECONDS, check_same_thread=False,
                               isolation_level=None, cached_statements=0)
        try:
            conn.set_authorizer(authorize)
            try:
                return [r[0] for r in conn.execute(sql, params).fetchall()]
            except sqlite3.IntegrityError as err:
                raise DatabaseError("constraint", f"the row breaks a constraint: {err}") from None
            except sqlite3.Error as err:
                if denied:
                    raise DatabaseError("not_authorized", f"the write {denied[0]}") from None
                raise _sqlite_error(err, None) from None
        finally:
            conn.close()

    async def insert_row(self, target: WritableTable, values: dict[str, Any]) -> Any:
        pairs = check_row(target, values)
        if self._closed:
            raise DatabaseError("unavailable", "the database is closed (the server is shutting down)")
        sql = _insert_sql(target, [c for c, _ in pairs], ["?"] * len(pairs))
        keys = await asyncio.to_thread(self._write, target, sqlite3.SQLITE_INSERT, sql, [v for _, v in pairs])
        return jsonable(keys[0])

    async def delete_row(self, target: WritableTable, row_id: int | str) -> bool:
        key = check_row_id(row_id)
        if self._closed:
            raise DatabaseError("unavailable", "the database is closed (the server is shutting down)")
        deleted = await asyncio.to_thread(self._write, target, sqlite3.SQLITE_DELETE,
                                          _delete_sql(target, "?"), [key])
        return bool(deleted)

    async def list_tables(self) -> list[dict[str, Any]]:
        return await _tables_with_counts(
            self, "SELECT name, type FROM sqlite_schema WHERE type IN ('table', 'view') "
                  "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name")

    async def describe_table(self, table: str) -> dict[str, Any]:
        await _require_table(self, table)
        cols = await self.query("SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info(?)",
                                [table], _CATALOGUE_ROWS, _CATALOGUE_SECONDS)
        fks = await self.query('SELECT "from", "table", "to" FROM pragma_foreign_key_list(?)',
                               [table], _CATALOGUE_ROWS, _CATALOGUE_SECONDS)
        ref = {r[0]: f"{r[1]}({r[2]})" for r in fks.rows}
        columns = [{"name": n, "type": t or "", "nullable": not nn, "default": d, "primaryKey": bool(pk),
                    "references": ref.get(n)} for n, t, nn, d, pk in cols.rows]
        return {"table": table, "columns": columns}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        """Refuse new queries and stop the ones still running in worker threads."""
        self._closed = True
        for stop in list(self._running):
            stop.set()


# -- PostgreSQL -----------------------------------------------------------------------------------


class PostgresBackend:
    """asyncpg pool; every call is one statement in a READ ONLY transaction that is rolled back."""

    kind = "postgresql"

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 4,
                 writable: Iterable[str] = ()) -> None:
        self.dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._pool: Any = None
        self.writable = frozenset(writable)
        # insert_row / delete_row only, on connections of their own (never the read pool's):
        # a read-write transaction holding the one parameterised statement, then COMMIT.
        self._write_pool: Any = None

    @property
    def started(self) -> bool:
        return self._pool is not None

    async def start(self) -> None:
        import asyncpg  # imported lazily: SQLite-only deployments never load it

        if self._pool is None:
            self._pool = await asyncpg.create_pool(self.dsn, min_size=self._min_size,
                                                   max_size=self._max_size)
        if self.writable and self._write_pool is None:
            self._write_pool = await asyncpg.create_pool(self.dsn, min_size=0, max_size=2)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
        if self._write_pool is not None:
            pool, self._write_pool = self._write_pool, None
            await pool.close()

    async def _write(self, target: WritableTable, sql: str, args: Sequence[Any]) -> list[Any]:
        import asyncpg

        if target.name not in self.writable:
            raise DatabaseError("not_writable", f"table {target.name!r} is not writable")
        if self._write_pool is None:
            raise DatabaseError("unavailable", "the database connection pool is not started")
        async with self._write_pool.acquire() as conn:
            try:
                async with conn.transaction():
                    await conn.fetchval("SELECT set_config('statement_timeout', $1, true)",
                                        str(int(_WRITE_SECONDS * 1000)))
                    return [r[0] for r in await conn.fetch(sql, *args)]
            except asyncpg.exceptions.IntegrityConstraintViolationError as err:
                raise DatabaseError("constraint", f"the row breaks a constraint: {err}") from None
            except asyncpg.exceptions.QueryCanceledError:
                raise DatabaseError("timeout",
                                    "the write was stopped: it ran longer than the time limit") from None
            except (asyncpg.exceptions.InterfaceError, asyncpg.exceptions.DataError) as err:
                raise DatabaseError("bad_values", f"a value does not fit its column: {err}") from None
            except asyncpg.exceptions.PostgresError as err:
                raise DatabaseError("sql_error", f"SQL error: {err}") from None

    async def insert_row(self, target: WritableTable, values: dict[str, Any]) -> Any:
        pairs = check_row(target, values)
        sql = _insert_sql(target, [c for c, _ in pairs], [f"${n}" for n in range(1, len(pairs) + 1)])
        keys = await self._write(target, sql, [v for _, v in pairs])
        return jsonable(keys[0])

    async def delete_row(self, target: WritableTable, row_id: int | str) -> bool:
        return bool(await self._write(target, _delete_sql(target, "$1"), [check_row_id(row_id)]))

    async def query(self, sql: str, params: Params, max_rows: int, time_limit: float,
                    scope: ReadScope | None = None) -> QueryResult:
        import asyncpg  # lazily, like start(): loaded by PostgreSQL deployments only

        if isinstance(params, dict):
            raise DatabaseError("bad_parameters",
                                "PostgreSQL takes positional parameters: use $1, $2, ... and pass a list")
        if self._pool is None:
            raise DatabaseError("unavailable", "the database connection pool is not started")
        args = list(params or ())
        async with self._pool.acquire() as conn:
            tr = conn.transaction(readonly=True)
            await tr.start()
            try:
                # A query before the user's statement takes the snapshot, after which the
                # transaction can no longer be switched to READ WRITE.
                await conn.fetchval("SELECT set_config('statement_timeout', $1, true)",
                                    str(int(time_limit * 1000)))
                stmt = await conn.prepare(sql)
                attributes = stmt.get_attributes()
                if not attributes:
                    raise DatabaseError("not_a_query", _NOT_A_QUERY)
                if scope is not None:
                    await _check_plan(conn, sql, args, scope)
                cursor = await stmt.cursor(*args)
                fetched = await cursor.fetch(max_rows + 1)
            except asyncpg.exceptions.ReadOnlySQLTransactionError as err:
                raise DatabaseError("read_only", f"{_READ_ONLY_HINT} ({err})") from None
            except asyncpg.exceptions.QueryCanceledError:
                raise DatabaseError("timeout", "the query was stopped: " + _TIMEOUT_HINT) from None
            except asyncpg.exceptions.PostgresSyntaxError as err:
                if "multiple commands" in str(err):
                    raise DatabaseError("multiple_statements",
                                        "only one SQL statement per call is allowed") from None
                raise DatabaseError("sql_error", f"SQL syntax error: {err}") from None
            except (asyncpg.exceptions.InterfaceError, asyncpg.exceptions.DataError) as err:
                # DataError is asyncpg's client-side check of argument values against the types.
                raise DatabaseError("bad_parameters", f"{_PARAMS_HINT}: {err}") from None
            except asyncpg.exceptions.PostgresError as err:
                raise DatabaseError("sql_error", f"SQL error: {err}") from None
            finally:
                if not conn.is_closed():
                    await tr.rollback()
        columns = [a.name for a in attributes]
        rows = [[jsonable(v) for v in row.values()] for row in fetched[:max_rows]]
        return QueryResult(columns=columns, rows=rows, truncated=len(fetched) > max_rows)

    async def list_tables(self) -> list[dict[str, Any]]:
        return await _tables_with_counts(
            self, "SELECT table_name, CASE table_type WHEN 'VIEW' THEN 'view' ELSE 'table' END "
                  "FROM information_schema.tables WHERE table_schema = current_schema() "
                  "ORDER BY table_name")

    async def describe_table(self, table: str) -> dict[str, Any]:
        await _require_table(self, table)
        cols = await self.query(
            "SELECT c.column_name, c.data_type, c.is_nullable = 'YES', c.column_default, "
            "EXISTS (SELECT 1 FROM information_schema.table_constraints tc "
            "  JOIN information_schema.key_column_usage k USING (constraint_schema, constraint_name) "
            "  WHERE tc.constraint_type = 'PRIMARY KEY' AND tc.table_schema = c.table_schema "
            "  AND tc.table_name = c.table_name AND k.column_name = c.column_name), "
            "(SELECT ccu.table_name || '(' || ccu.column_name || ')' "
            "  FROM information_schema.table_constraints tc "
            "  JOIN information_schema.key_column_usage k USING (constraint_schema, constraint_name) "
            "  JOIN information_schema.constraint_column_usage ccu "
            "    USING (constraint_schema, constraint_name) "
            "  WHERE tc.constraint_type = 'FOREIGN KEY' AND tc.table_schema = c.table_schema "
            "  AND tc.table_name = c.table_name AND k.column_name = c.column_name LIMIT 1) "
            "FROM information_schema.columns c WHERE c.table_schema = current_schema() AND c.table_name = $1 "
            "ORDER BY c.ordinal_position", [table], _CATALOGUE_ROWS, _CATALOGUE_SECONDS)
        columns = [{"name": n, "type": t, "nullable": bool(nullable), "default": d, "primaryKey": bool(pk),
                    "references": ref} for n, t, nullable, d, pk, ref in cols.rows]
        return {"table": table, "columns": columns}


async def _check_plan(conn: Any, sql: str, args: list[Any], scope: ReadScope) -> None:
    """Refuse the statement unless its plan reads only ``scope``'s relations and function scans.

    Runs inside the caller's read-only transaction; EXPLAIN without ANALYZE plans the statement
    and executes nothing (the functions it could fold at plan time already passed the allowlist).
    """
    schema = await conn.fetchval("SELECT current_schema()")
    raw = await conn.fetchval("EXPLAIN (VERBOSE, FORMAT JSON) " + sql, *args)  # noqa: S608
    plan = json.loads(raw) if isinstance(raw, str) else raw
    bare = scope.bare_tables
    qualified = scope.qualified_tables
    for node in _plan_nodes(plan):
        relation = node.get("Relation Name")
        if relation is not None:
            where = node.get("Schema")
            if not ((where == schema and relation in bare) or f"{where}.{relation}" in qualified):
                raise _scope_refused(f"reads relation {where}.{relation}")
        function = node.get("Function Name")
        if function is not None and function not in scope.functions:
            raise _scope_refused(f"calls function {function}")


def _plan_nodes(plan: Any) -> Iterator[dict[str, Any]]:
    """Every plan node of an EXPLAIN (FORMAT JSON) document (init plans and subplans included)."""
    pending: list[Any] = [plan]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            if "Node Type" in item:
                yield item
            pending.extend(v for v in item.values() if isinstance(v, list | dict))
