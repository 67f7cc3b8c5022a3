"""The database server over real HTTP with the official SDK client: tools, errors, schema resources."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from mcp import Client
from mcp.shared.exceptions import MCPError

from mcp_servers.core import MCPServer, ServerSettings, make_app
from mcp_servers.database.backends import SQLiteBackend
from mcp_servers.database.seed import rows
from mcp_servers.database.server import create_server


@asynccontextmanager
async def serve(server: MCPServer) -> AsyncIterator[str]:
    """Run ``server`` on 127.0.0.1 with an ephemeral port; yield its MCP endpoint URL."""
    runner = web.AppRunner(make_app(server, ServerSettings()))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/mcp"
    finally:
        await runner.cleanup()


# The SDK client lives in anyio cancel scopes that must be left in the task that entered them,
# so the fixture yields the server URL and each test opens its own client.
@pytest.fixture
async def url(sqlite_path: str) -> AsyncIterator[str]:
    server = create_server(SQLiteBackend(sqlite_path), max_rows=5, query_timeout=2.0)
    async with serve(server) as endpoint:
        yield endpoint


def text_of(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


def count_rows(path: str) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in rows()}  # noqa: S608
    finally:
        conn.close()


async def test_tools_are_read_only_with_output_schemas(url: str) -> None:
    """All three tools are annotated read-only and declare an output schema."""
    async with Client(url, mode="legacy") as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {"list_tables", "describe_table", "query"}
        for tool in tools.values():
            assert tool.annotations is not None and tool.annotations.read_only_hint is True
            assert tool.output_schema is not None


async def test_list_describe_query(url: str) -> None:
    """Tables, columns and parameterised query results come back as schema-valid structured content."""
    async with Client(url, mode="legacy") as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        listed = await client.call_tool("list_tables", {})
        jsonschema.validate(listed.structured_content, tools["list_tables"].output_schema or {})
        assert [t["name"] for t in (listed.structured_content or {})["tables"]] == sorted(rows())
        described = await client.call_tool("describe_table", {"table": "customers"})
        jsonschema.validate(described.structured_content, tools["describe_table"].output_schema or {})
        assert "email" in [c["name"] for c in (described.structured_content or {})["columns"]]
        sql = "SELECT id, email FROM customers WHERE tenant = ? ORDER BY id"
        result = await client.call_tool("query", {"sql": sql, "params": ["acme"]})
        assert not result.is_error
        jsonschema.validate(result.structured_content, tools["query"].output_schema or {})
        data = result.structured_content or {}
        assert data["columns"] == ["id", "email"] and data["rowCount"] == 5 and data["truncated"] is True
        assert json.loads(text_of(result)) == data
        small = await client.call_tool("query", {"sql": "SELECT :n AS n", "params": {"n": 3}, "max_rows": 1})
        assert (small.structured_content or {})["rows"] == [[3]]


@pytest.mark.parametrize("sql", [
    "DELETE FROM orders",
    "UPDATE customers SET email = 'x'",
    "INSERT INTO products (id, sku, name, category, price_cents) VALUES (99, 'X', 'x', 'x', 1)",
    "DROP TABLE customers",
    "ATTACH DATABASE ':memory:' AS m",
    "PRAGMA query_only = OFF",
    "SELECT 1; DELETE FROM orders",
])
async def test_write_through_query_fails(url: str, sqlite_path: str, sql: str) -> None:
    """A write attempt through query is an isError result and leaves the data unchanged."""
    async with Client(url, mode="legacy") as client:
        before = count_rows(sqlite_path)
        result = await client.call_tool("query", {"sql": sql})
        assert result.is_error is True
        assert text_of(result)
        assert count_rows(sqlite_path) == before


async def test_errors_are_actionable(url: str) -> None:
    """Bad SQL, unknown tables and bad arguments come back as isError results that say what to fix."""
    async with Client(url, mode="legacy") as client:
        bad = await client.call_tool("query", {"sql": "SELEC 1"})
        assert bad.is_error is True and "syntax error" in text_of(bad)
        unknown = await client.call_tool("describe_table", {"table": "nope"})
        assert unknown.is_error is True and "customers" in text_of(unknown)
        too_many = await client.call_tool("query", {"sql": "SELECT 1", "max_rows": 10_000})
        assert too_many.is_error is True
        readonly = await client.call_tool("query", {"sql": "DELETE FROM orders"})
        assert "read-only" in text_of(readonly)


async def test_schema_resources(url: str) -> None:
    """Each table's schema is a db://schema/<table> resource; unknown tables are not found."""
    async with Client(url, mode="legacy") as client:
        listed = sorted(str(r.uri) for r in (await client.list_resources()).resources)
        assert listed == [f"db://schema/{t}" for t in sorted(rows())]
        got = await client.read_resource("db://schema/orders")
        schema = json.loads(got.contents[0].text)  # type: ignore[union-attr]
        assert schema["table"] == "orders"
        with pytest.raises(MCPError):
            await client.read_resource("db://schema/nope")


async def test_postgres_backend_through_the_server(postgres_dsn: str) -> None:
    """With a DSN the tools run on PostgreSQL: pool opened (demo seeded) at start-up, closed at stop."""
    from mcp_servers.database.backends import PostgresBackend

    backend = PostgresBackend(postgres_dsn)
    try:
        async with serve(create_server(backend, max_rows=3, seed_demo=True)) as url, \
                Client(url, mode="legacy") as c:
            assert backend.started
            listed = await c.call_tool("list_tables", {})
            assert (listed.structured_content or {})["backend"] == "postgresql"
            res = await c.call_tool("query", {"sql": "SELECT email FROM customers WHERE tenant = $1",
                                              "params": ["globex"]})
            assert not res.is_error and (res.structured_content or {})["rowCount"] == 3
            write = await c.call_tool("query", {"sql": "DELETE FROM orders RETURNING id"})
            assert write.is_error is True and "read-only" in text_of(write)
            count = await c.call_tool("query", {"sql": "SELECT count(*) FROM orders"})
            assert (count.structured_content or {})["rows"] == [[30]]
        assert not backend.started
    finally:
        await backend.close()


def test_build_server_seeds_default_sqlite(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without flags the server seeds a SQLite file under $MCP_STATE_DIR; a non-Postgres DSN is refused."""
    import argparse

    from mcp_servers.database.server import add_arguments, build_server

    monkeypatch.setenv("MCP_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_DSN", raising=False)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert build_server(parser.parse_args([])).name == "database"
    assert count_rows(str(tmp_path / "database" / "demo.sqlite3"))["orders"] == 30
    with pytest.raises(SystemExit):
        build_server(parser.parse_args(["--dsn", "mysql://x"]))
