"""The ``database`` MCP server: read-only SQL over SQLite (default, seeded) or PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from gateway.errors import InputLimitExceeded
from gateway.policy.sql import MAX_SQL_LENGTH, SQL_FUNCTIONS, analyze
from mcp_servers.core import MCPServer, ResourceNotFound, ToolContext, ToolError
from mcp_servers.database.backends import Backend, DatabaseError, PostgresBackend, ReadScope, SQLiteBackend
from mcp_servers.database.seed import seed_postgres, seed_sqlite

logger = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 500
DEFAULT_QUERY_TIMEOUT = 10.0

READ_ONLY = {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True, "openWorldHint": False}

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
                  query_timeout: float = DEFAULT_QUERY_TIMEOUT, seed_demo: bool = False) -> MCPServer:
    """The server over ``backend``, whose pool opens when the app starts and closes when it stops.

    ``seed_demo`` creates the demo tables in PostgreSQL at start-up (SQLite files are seeded by
    :func:`build_server` before the read-only backend opens them).
    """
    placeholders = "$1, $2" if backend.kind == "postgresql" else "? or :name"
    server = MCPServer(
        "database", version="0.1.0",
        instructions=(
            f"Read-only SQL over a {backend.kind} database. Start with list_tables and describe_table; "
            f"query runs one SELECT with parameters ({placeholders}) "
            f"and returns at most {max_rows} rows. Table schemas are resources at db://schema/<table>."),
    )

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
        logger.info("database: %s backend ready", backend.kind)

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


def build_server(ns: argparse.Namespace) -> MCPServer:
    if ns.max_rows <= 0 or ns.query_timeout <= 0:
        raise SystemExit("database: --max-rows and --query-timeout must be positive")
    dsn = ns.dsn or os.environ.get("DATABASE_DSN")
    if dsn:
        if not dsn.startswith(("postgresql://", "postgres://")):
            raise SystemExit("database: --dsn must be a postgresql:// URL")
        logger.info("database: PostgreSQL backend")
        return create_server(PostgresBackend(dsn), max_rows=ns.max_rows, query_timeout=ns.query_timeout,
                             seed_demo=ns.seed_demo)
    path: Path = ns.sqlite_path or default_sqlite_path()
    if ns.seed_demo or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        if seed_sqlite(str(path)):
            logger.info("database: seeded demo data into %s", path)
    logger.info("database: SQLite backend on %s (read-only)", path)
    return create_server(SQLiteBackend(path), max_rows=ns.max_rows, query_timeout=ns.query_timeout)
