"""The engine enforces the parsed read scope: a query reads only the tables its parse found and
calls only allowlisted functions, whatever a parser would have missed (SQLite authorizer,
PostgreSQL plan check)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.policy.sql import SQL_FUNCTIONS
from mcp_servers.core import ToolError
from mcp_servers.database.backends import DatabaseError, PostgresBackend, ReadScope, SQLiteBackend
from mcp_servers.database.server import read_scope


def scope(*tables: str, functions: frozenset[str] = SQL_FUNCTIONS) -> ReadScope:
    return ReadScope(tables=frozenset(tables), functions=functions)


# (sql, the scope a wrong parse could have produced): each reads employees outside its scope.
ESCAPES = [
    ("SELECT * FROM employees", scope("orders")),
    ("SELECT * FROM orders, employees", scope("orders")),
    ('SELECT * FROM orders "o", employees', scope("orders")),
    ("SELECT * FROM orders NOT INDEXED, employees", scope("orders")),
    ("SELECT * FROM [employees]", scope("orders")),
    ("SELECT * FROM `employees`", scope("orders")),
    ("SELECT count(*) FROM employees", scope("orders")),
    ("SELECT 1 FROM orders WHERE EXISTS (SELECT 1 FROM employees)", scope("orders")),
    ("SELECT (SELECT max(salary_cents) FROM employees)", scope()),
    ("SELECT id FROM orders WHERE id IN employees", scope("orders")),
    ("SELECT * FROM main.employees", scope("orders", "main.orders")),
    ("WITH orders AS (SELECT * FROM employees) SELECT * FROM orders", scope("orders")),
    ("WITH orders AS (SELECT * FROM employees) SELECT count(*) FROM orders", scope("orders")),
    ("SELECT * FROM (SELECT * FROM employees) AS orders", scope("orders")),
    ("SELECT * FROM sqlite_master", scope("orders")),
    ("SELECT * FROM pragma_table_info('employees')", scope("orders")),
    ("SELECT * FROM json_each('[1]')", scope()),
]


@pytest.mark.parametrize(("sql", "allowed"), ESCAPES)
async def test_sqlite_refuses_reads_outside_the_scope(sqlite_path: str, sql: str, allowed: ReadScope) -> None:
    """The authorizer denies any table read the scope does not name, however it is spelled."""
    db = SQLiteBackend(sqlite_path)
    with pytest.raises(DatabaseError) as info:
        await db.query(sql, None, 10, 5.0, allowed)
    assert info.value.code == "not_authorized"


@pytest.mark.parametrize("sql", [
    "SELECT fts3_tokenizer('simple')", "SELECT load_extension('/tmp/x.so')", "SELECT sqlite_version()",
    "SELECT zeroblob(10)", "SELECT randomblob(8)", "SELECT total_changes()", "SELECT '{}' -> 'a'",
    "SELECT quote(name) FROM orders", "SELECT name FROM orders WHERE name REGEXP 'a'",
])
async def test_sqlite_refuses_functions_outside_the_allowlist(sqlite_path: str, sql: str) -> None:
    """Only allowlisted functions run; operators that are functions in SQLite (->) included."""
    db = SQLiteBackend(sqlite_path)
    with pytest.raises(DatabaseError) as info:
        await db.query(sql, None, 10, 5.0, scope("orders"))
    assert info.value.code in ("not_authorized", "sql_error")


@pytest.mark.parametrize(("sql", "allowed"), [
    ("SELECT id, total_cents FROM orders WHERE total_cents > ?", scope("orders")),
    ("SELECT count(*), sum(total_cents) FROM orders", scope("orders")),
    ("SELECT count(*) FROM main.orders", scope("main.orders")),
    ("SELECT o.id, c.name FROM orders o JOIN customers c ON o.customer_id = c.id",
     scope("orders", "customers")),
    ("SELECT name FROM products WHERE name LIKE 'a%' OR name GLOB 'B*'", scope("products")),
    ("SELECT upper(substr(name, 1, 3)), strftime('%Y', 'now'), coalesce(NULL, 1) FROM products",
     scope("products")),
    ("WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 3) SELECT * FROM c", scope()),
    ("SELECT 1", scope()),
    ("SELECT * FROM ORDERS", scope("orders")),
])
async def test_sqlite_allows_what_the_scope_names(sqlite_path: str, sql: str, allowed: ReadScope) -> None:
    """Reads of the scope's tables with allowlisted functions run normally."""
    db = SQLiteBackend(sqlite_path)
    params: list[Any] | None = [0] if "?" in sql else None
    result = await db.query(sql, params, 10, 5.0, allowed)
    assert result.columns


async def test_sqlite_catalogue_queries_keep_the_server_authorizer(sqlite_path: str) -> None:
    """Without a scope (the server's own list_tables / describe_table) the catalogue stays readable."""
    db = SQLiteBackend(sqlite_path)
    assert {t["name"] for t in await db.list_tables()} >= {"orders", "employees"}
    assert (await db.describe_table("orders"))["columns"]


@pytest.mark.parametrize(("sql", "code"), [
    ("SELECT * FROM orders; SELECT * FROM employees", "sql_not_understood"),
    ("SELECT fts3_tokenizer('simple')", "function_not_allowed"),
    ("SELECT * FROM [orders]", "sql_not_understood"),
    ("SELECT " + "1 + " * 3000 + "1", "input_limit_exceeded"),
])
def test_server_refuses_what_the_policy_would(sql: str, code: str) -> None:
    """The server computes the same facts and refuses the same way without the gateway."""
    with pytest.raises(ToolError) as info:
        read_scope(sql)
    assert f"[{code}]" in str(info.value)


@pytest.mark.parametrize("sql", [
    "WITH big AS (SELECT * FROM orders) SELECT (SELECT count(*) FROM big), (SELECT max(id) FROM big)",
    "WITH big AS (SELECT * FROM orders) SELECT 1 FROM big, (SELECT 1 FROM (SELECT 1 FROM big))",
    "WITH s AS (SELECT customer_id, sum(total_cents) t FROM orders GROUP BY 1) "
    "SELECT * FROM s WHERE t > (SELECT avg(t) FROM s)",
])
async def test_sqlite_reuses_of_a_cte_run(sqlite_path: str, sql: str) -> None:
    """A CTE used more than once (which SQLite reports as a read of the CTE) still runs."""
    db = SQLiteBackend(sqlite_path)
    result = await db.query(sql, None, 10, 5.0, read_scope(sql))
    assert result.columns


async def test_sqlite_cte_names_admit_no_column_reads(sqlite_path: str) -> None:
    """Naming a CTE after a table does not open that table's columns."""
    sql = "WITH employees AS (SELECT 1) SELECT name FROM main.employees"
    db = SQLiteBackend(sqlite_path)
    with pytest.raises(DatabaseError) as info:
        await db.query(sql, None, 10, 5.0, ReadScope(frozenset({"orders"}), SQL_FUNCTIONS,
                                                      ctes=frozenset({"employees"})))
    assert info.value.code == "not_authorized"


@pytest.mark.parametrize("sql", ["SELECT count(*) FROM employees", "SELECT 1 FROM employees"])
async def test_sqlite_cte_names_never_cover_a_stored_table(sqlite_path: str, sql: str) -> None:
    """Were the parse ever to take a real table for a CTE, the engine still refuses even the
    column-less read (a row count) of that table: the CTE allowance never covers stored names."""
    db = SQLiteBackend(sqlite_path)
    with pytest.raises(DatabaseError) as info:
        await db.query(sql, None, 10, 5.0, ReadScope(frozenset({"orders"}), SQL_FUNCTIONS,
                                                      ctes=frozenset({"employees"})))
    assert info.value.code == "not_authorized"


def test_server_scope_is_the_parsed_tables() -> None:
    """The scope the engine enforces is exactly the parse's tables plus the shared allowlist."""
    got = read_scope('select * from orders "o", customers where o.id in (select id from products)')
    assert got.tables == {"orders", "customers", "products"}
    assert got.functions == SQL_FUNCTIONS


# -- PostgreSQL: the plan check ------------------------------------------------------------------




@pytest.mark.parametrize(("sql", "allowed"), [
    ("SELECT * FROM employees", scope("orders")),
    ("SELECT * FROM orders, employees", scope("orders")),
    ("SELECT count(*) FROM employees", scope("orders")),
    ("SELECT (SELECT max(salary_cents) FROM employees)", scope()),
    ("SELECT * FROM orders WHERE id IN (SELECT id FROM employees)", scope("orders")),
    ("WITH orders AS (SELECT * FROM employees) SELECT * FROM orders", scope("orders")),
    ("SELECT * FROM public.employees", scope("orders", "public.orders")),
    ("SELECT * FROM pg_catalog.pg_class", scope("pg_class")),
    ("SELECT * FROM pg_class", scope("pg_class")),
    ("SELECT * FROM generate_series(1, 3)", scope()),
])
async def test_postgres_refuses_relations_outside_the_scope(pg: PostgresBackend, sql: str,
                                                           allowed: ReadScope) -> None:
    """The plan of the statement must read only the scope's relations, schema-resolved."""
    with pytest.raises(DatabaseError) as info:
        await pg.query(sql, None, 10, 5.0, allowed)
    assert info.value.code == "not_authorized"


@pytest.mark.parametrize(("sql", "params", "allowed"), [
    ("SELECT id FROM orders WHERE id > $1", [0], scope("orders")),
    ("SELECT count(*) FROM orders o JOIN customers c ON o.customer_id = c.id", None,
     scope("orders", "customers")),
    ("SELECT * FROM public.orders", None, scope("public.orders")),
    ("SELECT 1", None, scope()),
])
async def test_postgres_allows_what_the_scope_names(pg: PostgresBackend, sql: str, params: list[Any] | None,
                                                   allowed: ReadScope) -> None:
    """Statements reading only the scope's relations run (parameters reach EXPLAIN too)."""
    result = await pg.query(sql, params, 10, 5.0, allowed)
    assert result.columns
