"""Database backends: read-only enforced by the engine, parameters, row limits, clear errors."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from mcp_servers.database.backends import DatabaseError, PostgresBackend, SQLiteBackend, jsonable
from mcp_servers.database.seed import rows, seed_sqlite

# Statements that must never change anything, whatever trick they use.
SQLITE_WRITES = [
    "INSERT INTO products (id, sku, name, category, price_cents) VALUES (99, 'X', 'x', 'x', 1)",
    "UPDATE customers SET email = 'pwned@example.com'",
    "DELETE FROM orders",
    "DROP TABLE customers",
    "CREATE TABLE evil (x)",
    "CREATE TEMP TABLE evil (x)",
    "ALTER TABLE customers ADD COLUMN x",
    "REPLACE INTO products (id, sku, name, category, price_cents) VALUES (1, 'X', 'x', 'x', 1)",
    "ATTACH DATABASE ':memory:' AS other",
    "ATTACH DATABASE 'file:/tmp/evil.db?mode=rwc' AS other",
    "PRAGMA query_only = OFF",
    "PRAGMA user_version = 7",
    "PRAGMA journal_mode = DELETE",
    "PRAGMA writable_schema = ON",
    "VACUUM",
    "VACUUM INTO '/tmp/copy.db'",
    "REINDEX",
    "BEGIN IMMEDIATE",
    "SELECT 1; DELETE FROM orders",
    "SELECT 1; DROP TABLE customers",
    "DELETE FROM orders; SELECT 1",
    "WITH x AS (SELECT 1) DELETE FROM orders",
    "INSERT INTO orders SELECT * FROM orders RETURNING id",
    "SELECT load_extension('/tmp/evil.so')",
]


def snapshot(path: str) -> dict[str, list[tuple[object, ...]]]:
    conn = sqlite3.connect(path)
    try:
        listed = conn.execute("SELECT name FROM sqlite_schema WHERE type='table' ORDER BY name")
        tables = [r[0] for r in listed]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}  # noqa: S608
    finally:
        conn.close()


async def test_sqlite_lists_and_describes_tables(sqlite_path: str) -> None:
    """The seeded tables are listed with row counts and described with keys and references."""
    db = SQLiteBackend(sqlite_path)
    tables = await db.list_tables()
    assert [(t["name"], t["rows"]) for t in tables] == [
        (name, len(data)) for name, data in sorted(rows().items())]
    orders = await db.describe_table("orders")
    cols = {c["name"]: c for c in orders["columns"]}
    assert cols["id"]["primaryKey"] is True
    assert cols["customer_id"]["references"] == "customers(id)"
    assert cols["tenant"]["nullable"] is False
    with pytest.raises(DatabaseError) as ei:
        await db.describe_table("nope\"; DROP TABLE customers; --")
    assert ei.value.code == "unknown_table" and "customers" in ei.value.message


async def test_sqlite_query_with_parameters_and_row_limit(sqlite_path: str) -> None:
    """Positional and named parameters bind; results stop at max_rows and say so."""
    db = SQLiteBackend(sqlite_path)
    res = await db.query("SELECT id, email FROM customers WHERE tenant = ? ORDER BY id", ["acme"], 3, 5.0)
    assert res.columns == ["id", "email"] and len(res.rows) == 3 and res.truncated is True
    named = await db.query("SELECT count(*) AS n FROM orders WHERE tenant = :t", {"t": "globex"}, 10, 5.0)
    assert named.rows[0][0] == sum(1 for o in rows()["orders"] if o[1] == "globex") and not named.truncated
    with pytest.raises(DatabaseError) as ei:
        await db.query("SELECT * FROM customers WHERE id = ?", [], 10, 5.0)
    assert ei.value.code == "bad_parameters"


@pytest.mark.parametrize("sql", SQLITE_WRITES)
async def test_sqlite_write_attempts_fail_and_change_nothing(sqlite_path: str, sql: str) -> None:
    """Every write, DDL, ATTACH, PRAGMA write or multi-statement trick fails; the data is unchanged."""
    before = snapshot(sqlite_path)
    db = SQLiteBackend(sqlite_path)
    with pytest.raises(DatabaseError) as ei:
        await db.query(sql, None, 10, 5.0)
    assert ei.value.code in {"read_only", "not_authorized", "multiple_statements", "sql_error", "not_a_query"}
    assert snapshot(sqlite_path) == before


async def test_sqlite_bad_sql_is_actionable(sqlite_path: str) -> None:
    """Syntax errors and unknown tables come back with the engine's explanation."""
    db = SQLiteBackend(sqlite_path)
    with pytest.raises(DatabaseError) as ei:
        await db.query("SELEC 1", None, 10, 5.0)
    assert ei.value.code == "sql_error" and "syntax error" in ei.value.message
    with pytest.raises(DatabaseError) as ei:
        await db.query("SELECT * FROM nope", None, 10, 5.0)
    assert "no such table" in ei.value.message


async def test_sqlite_slow_query_is_stopped(sqlite_path: str) -> None:
    """A runaway query is interrupted at the time limit instead of running forever."""
    db = SQLiteBackend(sqlite_path)
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c"
    with pytest.raises(DatabaseError) as ei:
        await db.query(endless, None, 10, 0.2)
    assert ei.value.code == "timeout"


async def test_sqlite_query_runs_off_the_event_loop(sqlite_path: str) -> None:
    """While a query runs in its worker thread the event loop keeps serving other tasks."""
    db = SQLiteBackend(sqlite_path)
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c"
    task = asyncio.create_task(db.query(endless, None, 10, 30.0))
    ticked = asyncio.Event()
    asyncio.get_running_loop().call_soon(ticked.set)
    await asyncio.wait_for(ticked.wait(), 5)
    assert not task.done()
    task.cancel()  # cancelling sets the stop flag that the progress handler checks
    with pytest.raises(asyncio.CancelledError):
        await task


def test_seed_is_idempotent(sqlite_path: str) -> None:
    """Seeding an already seeded file does nothing."""
    before = snapshot(sqlite_path)
    assert seed_sqlite(sqlite_path) is False
    assert snapshot(sqlite_path) == before


def test_jsonable_maps_driver_types() -> None:
    """Bytes become base64, decimals and dates strings, containers recurse."""
    import datetime as dt
    import decimal

    assert jsonable(b"\x00\x01") == "AAE="
    assert jsonable(decimal.Decimal("1.10")) == "1.10"
    assert jsonable(dt.date(2025, 1, 2)) == "2025-01-02"
    assert jsonable([1, (2, b"")]) == [1, [2, ""]]


# -- PostgreSQL (a real server started by the postgres_dsn fixture) ----------------------------------

PG_WRITES = [
    "INSERT INTO products (id, sku, name, category, price_cents) VALUES (99, 'X', 'x', 'x', 1)",
    "UPDATE customers SET email = 'pwned@example.com' RETURNING id",
    "DELETE FROM orders RETURNING id",
    "WITH d AS (DELETE FROM orders RETURNING id) SELECT * FROM d",
    "DROP TABLE customers",
    "CREATE TEMP TABLE evil (x int)",
    "SET TRANSACTION READ WRITE",
    "COMMIT",
    "SELECT set_config('transaction_read_only', 'off', true)",
    "SELECT 1; DELETE FROM orders",
    "COMMIT; DELETE FROM orders",
]




async def pg_snapshot(db: PostgresBackend) -> list[list[object]]:
    res = await db.query("SELECT (SELECT count(*) FROM orders), (SELECT string_agg(email, ',' ORDER BY id) "
                         "FROM customers), (SELECT count(*) FROM pg_tables WHERE schemaname = 'public')",
                         None, 1, 5.0)
    return res.rows


async def test_postgres_tables_and_query(pg: PostgresBackend) -> None:
    """PostgreSQL lists, describes and queries the demo data with $n parameters and a row limit."""
    tables = await pg.list_tables()
    assert [t["name"] for t in tables] == ["customers", "employees", "invoice_records", "orders", "products"]
    cols = {c["name"]: c for c in (await pg.describe_table("orders"))["columns"]}
    assert cols["id"]["primaryKey"] is True and cols["customer_id"]["references"] == "customers(id)"
    res = await pg.query("SELECT id FROM customers WHERE tenant = $1 ORDER BY id", ["acme"], 2, 5.0)
    assert res.columns == ["id"] and len(res.rows) == 2 and res.truncated is True
    with pytest.raises(DatabaseError) as ei:
        await pg.query("SELECT $1::int", ["x"], 1, 5.0)
    assert ei.value.code == "bad_parameters"
    with pytest.raises(DatabaseError) as ei:
        await pg.query("SELECT 1", {"a": 1}, 1, 5.0)
    assert ei.value.code == "bad_parameters"


@pytest.mark.parametrize("sql", PG_WRITES)
async def test_postgres_write_attempts_fail_and_change_nothing(pg: PostgresBackend, sql: str) -> None:
    """Writes fail inside the READ ONLY transaction (or are refused as non-queries); data unchanged."""
    before = await pg_snapshot(pg)
    with pytest.raises(DatabaseError) as ei:
        await pg.query(sql, None, 10, 5.0)
    assert ei.value.code in {"read_only", "not_a_query", "multiple_statements", "sql_error"}
    assert await pg_snapshot(pg) == before


async def test_postgres_statement_timeout(pg: PostgresBackend) -> None:
    """A slow statement is cancelled by the server-side statement timeout."""
    with pytest.raises(DatabaseError) as ei:
        await pg.query("SELECT pg_sleep(10)", None, 1, 0.2)
    assert ei.value.code == "timeout"


async def test_sqlite_close_stops_running_queries_and_refuses_new_ones(sqlite_path: str) -> None:
    """close() ends a query still running in its worker thread; later calls fail as unavailable."""
    db = SQLiteBackend(sqlite_path)
    endless = asyncio.create_task(db.query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n",
        None, 1, 60.0))
    async with asyncio.timeout(10):
        while not db._running:  # the query has started once its stop flag is registered
            await asyncio.sleep(0.01)
    await db.close()
    with pytest.raises(DatabaseError) as stopped:
        await asyncio.wait_for(endless, 10)
    assert stopped.value.code == "cancelled"
    with pytest.raises(DatabaseError) as refused:
        await db.query("SELECT 1", None, 1, 1.0)
    assert refused.value.code == "unavailable"
