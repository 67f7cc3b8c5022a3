"""The ``database`` MCP server: read-only SQL over SQLite (default, seeded) or PostgreSQL, plus
single-row inserts and deletes on the tables named by ``--writable-table`` (none by default)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.errors import InputLimitExceeded
from gateway.policy.sql import MAX_SQL_LENGTH, SQL_FUNCTIONS, analyze
from mcp_servers.core import MCPServer, ResourceNotFound, ToolContext, ToolError
from mcp_servers.database.backends import (
    MAX_IDENTIFIER_CHARS,
    MAX_VALUE_CHARS,
    MAX_WRITE_COLUMNS,
    Backend,
    DatabaseError,
    PostgresBackend,
    ReadScope,
    SQLiteBackend,
    WritableTable,
    writable_table,
)
from mcp_servers.database.seed import seed_postgres, seed_sqlite

logger = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 500
DEFAULT_QUERY_TIMEOUT = 10.0

READ_ONLY = {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True, "openWorldHint": False}
INSERT = {"readOnlyHint": False, "destructiveHint": False, "idempotentHint": False, "openWorldHint": False}
# Deleting a row that is already gone answers deleted: false, so a repeated call is harmless.
DELETE = {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": True, "openWorldHint": False}
MAX_WRITABLE_TABLES = 16

_SCALAR = {"type": ["string", "number", "integer", "boolean", "null"], "maxLength": MAX_VALUE_CHARS}
_ROW_ID = {"type": ["integer", "string"], "maxLength": MAX_IDENTIFIER_CHARS * 2,
           "description": "The row's primary key, as insert_row returned it"}

_COLUMN = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "type": {"type": "string"}, "nullable": {"type": "boolean"},
                   "default": {}, "primaryKey": {"type": "boolean"},
                   "references": {"type": ["string", "null"]}},
    "required": ["name", "type", "nullable", "primaryKey"],
}
LIST_TABLES_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "backend": {"type": "string"},
        "tables": {"type": "array", "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "type": {"type": "string", "enum": ["table", "view"]},
                           "rows": {"type": "integer"}},
            "required": ["name", "type", "rows"],
        }},
    },
    "required": ["backend", "tables"],
}
DESCRIBE_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {"table": {"type": "string"}, "columns": {"type": "array", "items": _COLUMN}},
    "required": ["table", "columns"],
}
QUERY_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "columns": {"type": "array", "items": {"type": "string"}},
        "rows": {"type": "array", "items": {"type": "array"}},
        "rowCount": {"type": "integer"},
        "truncated": {"type": "boolean", "description": "More rows matched than max_rows"},
    },
    "required": ["columns", "rows", "rowCount", "truncated"],
}
INSERT_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {"table": {"type": "string"}, "id": {"type": ["integer", "string"]}},
    "required": ["table", "id"],
}
DELETE_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {"table": {"type": "string"}, "id": {"type": ["integer", "string"]},
                   "deleted": {"type": "boolean", "description": "False when no such row existed"}},
    "required": ["table", "id", "deleted"],
}


def read_scope(sql: str) -> ReadScope:
    """The scope the engine enforces for one caller's SQL: the tables and functions of the same
    parse the gateway's policy judged (``gateway.policy.sql.analyze`` on the same text). What the
    policy would refuse as not understood or calling a function outside the allowlist is refused
    here too, in case a request reaches the server without the gateway."""
    try:
        facts = analyze(sql)
    except InputLimitExceeded as err:
        raise ToolError(f"{err.message} [input_limit_exceeded]") from None
    if not facts.understood:
        raise ToolError(f"the SQL cannot be checked: {facts.problem} [sql_not_understood]")
    refused = sorted(facts.functions - SQL_FUNCTIONS)
    if refused:
        raise ToolError(f"functions not allowed: {', '.join(refused)} [function_not_allowed]")
    return ReadScope(tables=facts.tables, functions=SQL_FUNCTIONS, ctes=facts.ctes)


def create_server(backend: Backend, *, max_rows: int = DEFAULT_MAX_ROWS,
                  query_timeout: float = DEFAULT_QUERY_TIMEOUT, seed_demo: bool = False,
                  writable_tables: Sequence[str] = ()) -> MCPServer:
    """The server over ``backend``, whose pool opens when the app starts and closes when it stops.

    ``seed_demo`` creates the demo tables in PostgreSQL at start-up (SQLite files are seeded by
    :func:`build_server` before the read-only backend opens them). ``writable_tables`` (which the
    backend must have been built with as writable too) adds ``insert_row`` and ``delete_row`` for
    those tables only; each must exist with a single-column primary key, or the server does not
    start.
    """
    placeholders = "$1, $2" if backend.kind == "postgresql" else "? or :name"
    writes = (f" insert_row and delete_row add and remove single rows of {', '.join(writable_tables)}."
              if writable_tables else "")
    server = MCPServer(
        "database", version="0.1.0",
        instructions=(
            f"Read-only SQL over a {backend.kind} database. Start with list_tables and describe_table; "
            f"query runs one SELECT with parameters ({placeholders}) "
            f"and returns at most {max_rows} rows. Table schemas are resources at db://schema/<table>."
            + writes),
    )
    # The writable tables' schema as read at start-up: the key and the columns a row may set.
    targets: dict[str, WritableTable] = {}

    @server.on_startup
    async def open_backend() -> None:
        await backend.start()
        if seed_demo and isinstance(backend, PostgresBackend):
            import asyncpg

            conn = await asyncpg.connect(backend.dsn)
            try:
                await seed_postgres(conn)
            finally:
                await conn.close()
        for name in writable_tables:
            try:
                described = await backend.describe_table(name)
                if not any(t["name"] == name and t["type"] == "table" for t in await backend.list_tables()):
                    raise DatabaseError("not_writable", f"{name!r} is a view")
                targets[name] = writable_table(described)
            except DatabaseError as err:
                raise SystemExit(f"database: --writable-table {name}: {err.message}") from None
        logger.info("database: %s backend ready (writable tables: %s)", backend.kind,
                    ", ".join(sorted(targets)) or "none")

    @server.on_cleanup
    async def close_backend() -> None:
        await backend.close()
        logger.info("database: %s backend closed", backend.kind)

    @server.tool(name="list_tables", title="List tables",
                 description="Tables and views of the database with their row counts.",
                 input_schema={"type": "object", "properties": {}, "additionalProperties": False},
                 output_schema=LIST_TABLES_OUTPUT, annotations=READ_ONLY)
    async def list_tables(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"backend": backend.kind, "tables": await backend.list_tables()}
        except DatabaseError as err:
            raise ToolError(f"{err.message} [{err.code}]") from None

    @server.tool(name="describe_table", title="Describe table",
                 description="Columns of one table: name, type, nullability, default, primary key, "
                             "references.",
                 input_schema={"type": "object", "properties": {"table": {"type": "string", "minLength": 1,
                                                                          "maxLength": 128}},
                               "required": ["table"], "additionalProperties": False},
                 output_schema=DESCRIBE_OUTPUT, annotations=READ_ONLY)
    async def describe_table(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return await backend.describe_table(args["table"])
        except DatabaseError as err:
            raise ToolError(f"{err.message} [{err.code}]") from None

    @server.tool(name="query", title="Run a read-only SQL query",
                 description=(f"Run one read-only SQL statement (SELECT / WITH / VALUES) with optional bound "
                              f"parameters: a list for positional placeholders, an object for named ones "
                              f"(SQLite only). Never build values into the SQL text. Returns at most "
                              f"max_rows rows (default and limit {max_rows}); the database refuses writes."),
                 input_schema={"type": "object", "properties": {
                     "sql": {"type": "string", "minLength": 1, "maxLength": MAX_SQL_LENGTH},
                     "params": {"type": ["array", "object"], "description": "Bound parameter values",
                                "items": {"type": ["string", "number", "integer", "boolean", "null"]},
                                "additionalProperties": {"type": ["string", "number", "integer", "boolean",
                                                                  "null"]}},
                     "max_rows": {"type": "integer", "minimum": 1, "maximum": max_rows},
                 }, "required": ["sql"], "additionalProperties": False},
                 output_schema=QUERY_OUTPUT, annotations=READ_ONLY)
    async def query(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
        limit = min(int(args.get("max_rows", max_rows)), max_rows)
        # The parse is pure Python and may take tens of ms within its bounds: off the loop.
        scope = await asyncio.to_thread(read_scope, args["sql"])
        try:
            result = await backend.query(args["sql"], args.get("params"), limit, query_timeout, scope)
        except DatabaseError as err:
            raise ToolError(f"{err.message} [{err.code}]") from None
        return result.as_dict()

    if writable_tables:
        def target_of(table: str) -> WritableTable:
            target = targets.get(table)
            if target is None:
                raise ToolError(f"table {table[:MAX_IDENTIFIER_CHARS]!r} is not writable; writable tables: "
                                f"{', '.join(sorted(targets))} [not_writable]")
            return target

        @server.tool(name="insert_row", title="Insert a row",
                     description=(f"Add one row to a writable table ({', '.join(writable_tables)}): "
                                  f"values maps column names to JSON scalars (at most {MAX_WRITE_COLUMNS} "
                                  f"columns, strings up to {MAX_VALUE_CHARS} characters); the database "
                                  f"assigns the key, returned as id. No SQL is taken."),
                     input_schema={"type": "object", "properties": {
                         "table": {"type": "string", "minLength": 1, "maxLength": MAX_IDENTIFIER_CHARS},
                         "values": {"type": "object", "maxProperties": MAX_WRITE_COLUMNS,
                                    "propertyNames": {"maxLength": MAX_IDENTIFIER_CHARS},
                                    "additionalProperties": _SCALAR},
                     }, "required": ["table", "values"], "additionalProperties": False},
                     output_schema=INSERT_OUTPUT, annotations=INSERT)
        async def insert_row(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
            target = target_of(args["table"])
            try:
                row_id = await backend.insert_row(target, args["values"])
            except DatabaseError as err:
                raise ToolError(f"{err.message} [{err.code}]") from None
            logger.info("database: inserted row %s into %s", row_id, target.name)
            return {"table": target.name, "id": row_id}

        @server.tool(name="delete_row", title="Delete a row",
                     description=(f"Delete one row of a writable table ({', '.join(writable_tables)}) by its "
                                  f"key (the id insert_row returned); deleted is false when no such row "
                                  f"exists, so a repeated call is harmless."),
                     input_schema={"type": "object", "properties": {
                         "table": {"type": "string", "minLength": 1, "maxLength": MAX_IDENTIFIER_CHARS},
                         "id": _ROW_ID,
                     }, "required": ["table", "id"], "additionalProperties": False},
                     output_schema=DELETE_OUTPUT, annotations=DELETE)
        async def delete_row(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
            target = target_of(args["table"])
            try:
                deleted = await backend.delete_row(target, args["id"])
            except DatabaseError as err:
                raise ToolError(f"{err.message} [{err.code}]") from None
            logger.info("database: delete of row %s from %s: %s", args["id"], target.name,
                        "deleted" if deleted else "no such row")
            return {"table": target.name, "id": args["id"], "deleted": deleted}

    @server.resource_template(uri_template="db://schema/{table}", name="table-schema",
                              description="Columns of one table as JSON.", mime_type="application/json")
    async def schema(ctx: ToolContext, uri: str, params: dict[str, str]) -> tuple[str, str]:
        import json

        try:
            described = await backend.describe_table(params.get("table", ""))
        except DatabaseError as err:
            raise ResourceNotFound(uri, f"{err.message} [{err.code}]") from None
        return json.dumps(described, indent=2), "application/json"

    @server.resource_lister
    async def list_schemas(ctx: ToolContext) -> list[dict[str, Any]]:
        tables = await backend.list_tables()
        return [{"uri": f"db://schema/{t['name']}", "name": f"{t['name']} schema",
                 "mimeType": "application/json",
                 "description": f"Columns of {t['type']} {t['name']} ({t['rows']} rows)"} for t in tables]

    return server


def default_sqlite_path() -> Path:
    state = os.environ.get("MCP_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "mcp-gateway")
    return Path(state) / "database" / "demo.sqlite3"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", default=None,
                        help="postgresql://... to use PostgreSQL instead of SQLite (or $DATABASE_DSN)")
    parser.add_argument("--sqlite-path", type=Path, default=None,
                        help="SQLite file (default: $MCP_STATE_DIR/database/demo.sqlite3); seeded if new")
    parser.add_argument("--seed-demo", action="store_true",
                        help="create the demo tables if missing (always done for a new SQLite file)")
    parser.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS)
    parser.add_argument("--query-timeout", type=float, default=DEFAULT_QUERY_TIMEOUT,
                        help="seconds per query")
    parser.add_argument("--writable-table", action="append", default=[], metavar="NAME",
                        help="expose insert_row and delete_row for this table (repeatable; off by default: "
                             "the server is read-only)")


def build_server(ns: argparse.Namespace) -> MCPServer:
    if ns.max_rows <= 0 or ns.query_timeout <= 0:
        raise SystemExit("database: --max-rows and --query-timeout must be positive")
    writable = writable_table_names(ns.writable_table)
    dsn = ns.dsn or os.environ.get("DATABASE_DSN")
    if dsn:
        if not dsn.startswith(("postgresql://", "postgres://")):
            raise SystemExit("database: --dsn must be a postgresql:// URL")
        logger.info("database: PostgreSQL backend")
        return create_server(PostgresBackend(dsn, writable=writable), max_rows=ns.max_rows,
                             query_timeout=ns.query_timeout, seed_demo=ns.seed_demo, writable_tables=writable)
    path: Path = ns.sqlite_path or default_sqlite_path()
    if ns.seed_demo or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        if seed_sqlite(str(path)):
            logger.info("database: seeded demo data into %s", path)
    logger.info("database: SQLite backend on %s (%s)", path,
                f"writable: {', '.join(writable)}" if writable else "read-only")
    return create_server(SQLiteBackend(path, writable=writable), max_rows=ns.max_rows,
                         query_timeout=ns.query_timeout, writable_tables=writable)


_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def writable_table_names(names: Sequence[str]) -> tuple[str, ...]:
    """The ``--writable-table`` names, checked: plain identifiers, no duplicates, a few at most."""
    if len(names) > MAX_WRITABLE_TABLES:
        raise SystemExit(f"database: at most {MAX_WRITABLE_TABLES} --writable-table flags")
    for name in names:
        if not _TABLE_NAME.fullmatch(name):
            raise SystemExit(f"database: --writable-table {name[:80]!r} is not a plain table name "
                             "(letters, digits, _; at most 63)")
    if len(set(names)) != len(names):
        raise SystemExit("database: --writable-table names a table twice")
    return tuple(names)
