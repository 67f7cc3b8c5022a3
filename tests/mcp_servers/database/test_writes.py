"""insert_row and delete_row: only on the tables named writable, only parameterised single-row
writes built by the server, on a connection of their own; query stays read-only."""

from __future__ import annotations

import argparse
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mcp import Client

from mcp_servers.database.backends import (
    MAX_VALUE_CHARS,
    DatabaseError,
    PostgresBackend,
    SQLiteBackend,
    WritableTable,
)
from mcp_servers.database.server import add_arguments, build_server, create_server
from tests.mcp_servers.database.test_server import count_rows, serve, text_of

INVOICES = WritableTable(name="invoice_records", key="id",
                         columns=frozenset({"order_id", "total_cents", "invoice_file", "run_id"}))
ROW = {"order_id": 7, "total_cents": 1999, "invoice_file": "projects/invoices/order-7.json", "run_id": "r1"}


def invoice_rows(path: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT id, order_id, total_cents, invoice_file, run_id FROM invoice_records "
                            "ORDER BY id").fetchall()


@pytest.fixture
async def url(sqlite_path: str) -> AsyncIterator[str]:
    backend = SQLiteBackend(sqlite_path, writable=["invoice_records"])
    server = create_server(backend, max_rows=5, query_timeout=2.0, writable_tables=["invoice_records"])
    async with serve(server) as endpoint:
        yield endpoint


async def test_read_only_by_default(sqlite_path: str) -> None:
    """Without writable tables the server has no write tool."""
    async with serve(create_server(SQLiteBackend(sqlite_path))) as endpoint, \
            Client(endpoint, mode="legacy") as client:
        tools = {t.name for t in (await client.list_tools()).tools}
    assert tools == {"list_tables", "describe_table", "query"}


async def test_insert_then_delete_a_row(url: str, sqlite_path: str) -> None:
    """insert_row adds the row and answers its new id; delete_row removes it, and says so only once."""
    async with Client(url, mode="legacy") as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert tools["insert_row"].annotations is not None
        assert tools["insert_row"].annotations.read_only_hint is False
        assert tools["delete_row"].annotations is not None
        assert tools["delete_row"].annotations.destructive_hint is True
        inserted = await client.call_tool("insert_row", {"table": "invoice_records", "values": ROW})
        assert not inserted.is_error, text_of(inserted)
        row_id = (inserted.structured_content or {})["id"]
        assert isinstance(row_id, int)
        assert invoice_rows(sqlite_path) == [(row_id, 7, 1999, "projects/invoices/order-7.json", "r1")]
        deleted = await client.call_tool("delete_row", {"table": "invoice_records", "id": row_id})
        assert deleted.structured_content == {"table": "invoice_records", "id": row_id, "deleted": True}
        again = await client.call_tool("delete_row", {"table": "invoice_records", "id": row_id})
        assert not again.is_error and (again.structured_content or {})["deleted"] is False
    assert invoice_rows(sqlite_path) == []


@pytest.mark.parametrize(("tool", "args", "code"), [
    ("insert_row", {"table": "orders", "values": {"status": "x"}}, "not_writable"),
    ("insert_row", {"table": "invoice_records", "values": {**ROW, "no_such": 1}}, "unknown_column"),
    ("insert_row", {"table": "invoice_records", "values": {**ROW, "id": 99}}, "bad_values"),
    ("insert_row", {"table": "invoice_records", "values": {"order_id": 1, "total_cents": 1}}, "constraint"),
    ("insert_row", {"table": 'invoice_records"; DROP TABLE orders; --', "values": ROW}, "not_writable"),
    ("delete_row", {"table": "orders", "id": 1}, "not_writable"),
    ("delete_row", {"table": "customers", "id": 1}, "not_writable"),
])
async def test_refused_writes_change_nothing(url: str, sqlite_path: str, tool: str, args: dict[str, Any],
                                             code: str) -> None:
    """Another table, an unknown column, the key, a missing NOT NULL value: an isError result with
    the code, and no table changes."""
    before = count_rows(sqlite_path)
    async with Client(url, mode="legacy") as client:
        result = await client.call_tool(tool, args)
    assert result.is_error is True and text_of(result).endswith(f"[{code}]"), text_of(result)
    assert count_rows(sqlite_path) == before


@pytest.mark.parametrize("values", [
    {**ROW, "run_id": {"nested": 1}},
    {**ROW, "run_id": [1, 2]},
    {**ROW, "invoice_file": "x" * (MAX_VALUE_CHARS + 1)},
    {f"c{i}": 1 for i in range(65)},
])
async def test_non_scalar_or_oversized_values_are_refused(url: str, sqlite_path: str,
                                                          values: dict[str, Any]) -> None:
    """A nested value, a too long string or too many columns is refused before any write."""
    async with Client(url, mode="legacy") as client:
        result = await client.call_tool("insert_row", {"table": "invoice_records", "values": values})
    assert result.is_error is True
    assert invoice_rows(sqlite_path) == []


@pytest.mark.parametrize(("values", "code"), [
    ({**ROW, "run_id": {"nested": 1}}, "bad_values"),
    ({**ROW, "invoice_file": "x" * (MAX_VALUE_CHARS + 1)}, "too_large"),
    ({**ROW, "order_id": 1 << 70}, "too_large"),
    ({**ROW, "total_cents": float("nan")}, "bad_values"),
    ({f"c{i}": 1 for i in range(65)}, "too_large"),
    ({**ROW, 'x" TEXT); --': 1}, "unknown_column"),
])
async def test_backend_checks_values_itself(sqlite_path: str, values: dict[str, Any], code: str) -> None:
    """The backend refuses what the tool's schema would, for callers that skip the schema."""
    db = SQLiteBackend(sqlite_path, writable=["invoice_records"])
    with pytest.raises(DatabaseError) as ei:
        await db.insert_row(INVOICES, values)
    assert ei.value.code == code


async def test_backend_refuses_a_table_it_was_not_given(sqlite_path: str) -> None:
    """A backend built without the table as writable refuses the write, whatever the target says."""
    db = SQLiteBackend(sqlite_path)
    with pytest.raises(DatabaseError) as ei:
        await db.insert_row(INVOICES, ROW)
    assert ei.value.code == "not_writable"
    orders = WritableTable(name="orders", key="id", columns=frozenset({"status"}))
    writable = SQLiteBackend(sqlite_path, writable=["invoice_records"])
    with pytest.raises(DatabaseError) as ei:
        await writable.delete_row(orders, 1)
    assert ei.value.code == "not_writable"
    assert count_rows(sqlite_path)["orders"] == 30


async def test_write_connection_admits_only_the_one_table(sqlite_path: str) -> None:
    """The write connection's authorizer refuses a statement touching another table (a trigger
    here), so the row is not written either."""
    with sqlite3.connect(sqlite_path) as conn:
        conn.execute("CREATE TRIGGER spill AFTER INSERT ON invoice_records "
                     "BEGIN DELETE FROM orders; END")
    db = SQLiteBackend(sqlite_path, writable=["invoice_records"])
    with pytest.raises(DatabaseError) as ei:
        await db.insert_row(INVOICES, ROW)
    assert ei.value.code == "not_authorized"
    assert count_rows(sqlite_path)["orders"] == 30 and invoice_rows(sqlite_path) == []


@pytest.mark.parametrize("sql", [
    "INSERT INTO invoice_records (order_id, total_cents, invoice_file) VALUES (1, 1, 'x')",
    "DELETE FROM invoice_records",
    "UPDATE invoice_records SET run_id = 'x'",
    "INSERT INTO invoice_records (order_id, total_cents, invoice_file) VALUES (1, 1, 'x') RETURNING id",
])
async def test_query_stays_read_only_on_writable_tables(url: str, sqlite_path: str, sql: str) -> None:
    """With writable tables configured, query still refuses every write, to them as to the rest."""
    async with Client(url, mode="legacy") as client:
        inserted = await client.call_tool("insert_row", {"table": "invoice_records", "values": ROW})
        assert not inserted.is_error
        before = invoice_rows(sqlite_path)
        result = await client.call_tool("query", {"sql": sql})
    assert result.is_error is True
    assert invoice_rows(sqlite_path) == before


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("argv", [
    ["--writable-table", 'orders"'], ["--writable-table", "a b"],
    ["--writable-table", "x", "--writable-table", "x"],
])
def test_bad_writable_table_flags_are_refused(tmp_path: Any, argv: list[str]) -> None:
    """A name that is not a plain identifier, or one given twice, stops the server naming the flag."""
    with pytest.raises(SystemExit) as ei:
        build_server(parse("--sqlite-path", str(tmp_path / "db.sqlite3"), *argv))
    assert "--writable-table" in str(ei.value)


@pytest.mark.parametrize("table", ["no_such_table", "v_orders"])
async def test_server_does_not_start_with_a_table_it_cannot_write(sqlite_path: str, table: str) -> None:
    """A writable table that does not exist, or is a view, stops the server at start-up."""
    with sqlite3.connect(sqlite_path) as conn:
        conn.execute("CREATE VIEW v_orders AS SELECT * FROM orders")
    server = create_server(SQLiteBackend(sqlite_path, writable=[table]), writable_tables=[table])
    with pytest.raises(SystemExit) as ei:
        async with serve(server):
            pass
    assert f"--writable-table {table}" in str(ei.value)


def test_seeding_adds_the_invoice_table_to_an_older_file(tmp_path: Any) -> None:
    """A demo file seeded before invoice_records existed gets the table (and keeps its data)."""
    from mcp_servers.database.seed import seed_sqlite

    path = str(tmp_path / "old.sqlite3")
    assert seed_sqlite(path) is True
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE invoice_records")
    assert seed_sqlite(path) is True and seed_sqlite(path) is False
    assert invoice_rows(path) == [] and count_rows(path)["orders"] == 30


async def test_postgres_insert_and_delete(pg: PostgresBackend, postgres_dsn: str) -> None:
    """On PostgreSQL the writes run on their own pool: the row is added with a new id, deleted
    once; another table is refused; query still refuses writes to the writable table."""
    db = PostgresBackend(postgres_dsn, writable=["invoice_records"])
    server = create_server(db, writable_tables=["invoice_records"])
    async with serve(server) as endpoint, Client(endpoint, mode="legacy") as client:
        inserted = await client.call_tool("insert_row", {"table": "invoice_records", "values": ROW})
        assert not inserted.is_error, text_of(inserted)
        row_id = (inserted.structured_content or {})["id"]
        found = await pg.query("SELECT order_id, invoice_file FROM invoice_records WHERE id = $1",
                               [row_id], 5, 5.0)
        assert found.rows == [[7, "projects/invoices/order-7.json"]]
        wrong_type = await client.call_tool("insert_row", {"table": "invoice_records",
                                                           "values": {**ROW, "order_id": "seven"}})
        assert wrong_type.is_error and text_of(wrong_type).endswith("[bad_values]")
        other = await client.call_tool("delete_row", {"table": "orders", "id": 1})
        assert other.is_error and text_of(other).endswith("[not_writable]")
        via_query = await client.call_tool("query", {"sql": "DELETE FROM invoice_records RETURNING id"})
        assert via_query.is_error
        deleted = await client.call_tool("delete_row", {"table": "invoice_records", "id": row_id})
        assert (deleted.structured_content or {})["deleted"] is True
    remaining = await pg.query("SELECT count(*) FROM invoice_records", None, 1, 5.0)
    orders = await pg.query("SELECT count(*) FROM orders", None, 1, 5.0)
    assert remaining.rows == [[0]] and orders.rows == [[30]]
