"""Security findings 1, 2 (SQL half) and 5 (database resources) through the real stack (Envoy +
ext_authz + ext_proc + the database server on SQLite, TLS on loopback).

An analyst may read orders, products and customers, never employees: no spelling of a query
reads employees (403 with the reason the policy gives), oversized SQL is refused before any
parsing with 400 naming the bound, ordinary reports still work, and the schema resource of a
table is refused and unlisted wherever describe_table of it is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.policy.sql import MAX_SQL_LENGTH, MAX_SQL_TOKENS
from tests.reliability.stack import META, Gateway, call_body, call_headers, gateway

pytestmark = pytest.mark.timeout(180)

FORBIDDEN, INVALID_PARAMS = -32003, -32602


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("findings-sql")
    servers = {"database": {"module": "mcp_servers.database",
                            "args": ["--sqlite-path", str(tmp / "demo.sqlite3"), "--seed-demo"]}}
    with gateway(tmp, servers) as running:
        yield running


def post(gw: Gateway, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode()
    conn = gw.connection(timeout=60)
    try:
        conn.request("POST", "/mcp/database", body=data, headers=headers)
        reply = conn.getresponse()
        raw = reply.read()
    finally:
        conn.close()
    text = raw.decode("utf-8", "replace")
    if text.startswith(("event:", "data:", ":")):  # an SSE answer: its one message
        text = next(line[5:] for line in text.splitlines() if line.startswith("data:"))
    doc = json.loads(text) if text.strip() else {}
    return reply.status, doc if isinstance(doc, dict) else {}


def query(gw: Gateway, sql: str, role: str = "analyst", **extra: Any) -> tuple[int, dict[str, Any]]:
    return post(gw, call_body("query", {"sql": sql, **extra}, 1), call_headers(gw.token(role), "query"))


def describe(gw: Gateway, table: str, role: str = "analyst") -> tuple[int, dict[str, Any]]:
    return post(gw, call_body("describe_table", {"table": table}, 1),
                call_headers(gw.token(role), "describe_table"))


def read_resource(gw: Gateway, uri: str, role: str = "analyst") -> tuple[int, dict[str, Any]]:
    body = {"jsonrpc": "2.0", "id": 1, "method": "resources/read",
            "params": {"uri": uri, "_meta": dict(META)}}
    headers = call_headers(gw.token(role), None, "resources/read")
    headers["mcp-name"] = uri
    return post(gw, body, headers)


def list_resources(gw: Gateway, role: str) -> tuple[int, dict[str, Any]]:
    body = {"jsonrpc": "2.0", "id": 1, "method": "resources/list", "params": {"_meta": dict(META)}}
    return post(gw, body, call_headers(gw.token(role), None, "resources/list"))


def refused(status: int, doc: dict[str, Any]) -> tuple[int, int | None, str | None]:
    error = doc.get("error") or {}
    data = error.get("data") or {}
    return status, error.get("code"), data.get("reason")


def rows_of(doc: dict[str, Any]) -> list[list[Any]]:
    result = doc["result"]
    assert result.get("isError") is not True, result
    return list(result["structuredContent"]["rows"])


# Each reads employees (salaries, national ids) for an analyst.
EMPLOYEE_READS = [
    "SELECT * FROM employees",
    'SELECT * FROM orders "o", employees',
    "SELECT * FROM orders AS \"o\" , employees e",
    "SELECT * FROM orders NOT INDEXED, employees",
    "SELECT name, substr(national_id, 1, 3) || substr(national_id, 4) FROM products p, employees",
    "SELECT * FROM orders o NATURAL JOIN employees",
    "SELECT * FROM orders CROSS JOIN employees",
    'SELECT * FROM "employees"',
    "SELECT * FROM 'employees'",
    "SELECT * FROM EMPLOYEES",
    "SELECT (SELECT group_concat(salary_cents) FROM employees)",
    "SELECT * FROM orders WHERE id IN (SELECT id FROM employees)",
    "SELECT id FROM orders WHERE EXISTS (SELECT 1 FROM employees WHERE salary_cents > 0)",
    "SELECT count(*) FROM orders GROUP BY id HAVING max((SELECT max(salary_cents) FROM employees)) > 0",
    "SELECT 1 WHERE 1 IN employees",
    "WITH e AS (SELECT * FROM employees) SELECT * FROM e",
    "WITH orders AS (SELECT * FROM employees) SELECT * FROM orders",
    "SELECT id FROM orders UNION SELECT salary_cents FROM employees",
    "SELECT * FROM orders /* , */ , employees",
    "SELECT * FROM orders -- x\n, employees",
    "SELECT * FROM\torders,\nemployees",
]


@pytest.mark.parametrize("sql", EMPLOYEE_READS)
def test_analyst_cannot_read_employees(gw: Gateway, sql: str) -> None:
    """No spelling of a query that reads employees gets past the policy for an analyst."""
    assert refused(*query(gw, sql)) == (403, FORBIDDEN, "table_not_allowed")


@pytest.mark.parametrize("sql", [
    "SELECT * FROM [employees]",
    "SELECT * FROM `employees`",
    'SELECT * FROM "EMPLOYEES"',
    "SELECT * FROM orders INDEXED BY sqlite_autoindex_orders_1, employees",
    "SELECT * FROM orders; SELECT * FROM employees",
    "SELECT * FROM orders\u00a0, employees",
    "SELECT * FROM orders\u200b, employees",
    "ATTACH DATABASE '/tmp/x.sqlite3' AS x",
    "PRAGMA table_info(employees)",
    "TABLE employees",
])
def test_what_the_parser_cannot_read_is_refused(gw: Gateway, sql: str) -> None:
    """Text either dialect cannot parse as one read-only query is refused as not understood."""
    assert refused(*query(gw, sql)) == (403, FORBIDDEN, "sql_not_understood")


@pytest.mark.parametrize("sql", [
    "SELECT fts3_tokenizer('simple')",
    "SELECT load_extension('/tmp/x.so')",
    "SELECT sqlite_version()",
    "SELECT * FROM pragma_table_info('employees')",
    "SELECT * FROM json_each('[1]')",
    'SELECT "load_extension"(1)',
])
@pytest.mark.parametrize("role", ["analyst", "admin"])
def test_functions_outside_the_allowlist_are_refused(gw: Gateway, sql: str, role: str) -> None:
    """Functions are an allowlist: native pointers, extensions and engine internals are refused
    to every role, admins included."""
    assert refused(*query(gw, sql, role)) == (403, FORBIDDEN, "function_not_allowed")


@pytest.mark.parametrize("sql", ["SELECT * FROM main.employees", "SELECT * FROM temp.orders"])
def test_schema_qualified_names_are_refused(gw: Gateway, sql: str) -> None:
    """main.x / temp.x are never taken for the bare name."""
    assert refused(*query(gw, sql)) == (403, FORBIDDEN, "table_not_allowed")


@pytest.mark.parametrize("size", [MAX_SQL_LENGTH + 1, 64 * 1024, 1024 * 1024 - 4096])
def test_oversized_sql_is_refused_naming_the_bound(gw: Gateway, size: int) -> None:
    """SQL over the length cap is refused with 400 before any parsing, also for roles that may
    not call query at all (finding 2)."""
    sql = "SELECT * FROM orders o" + ", orders" * ((size - 22) // 8)
    sql += " " * (size - len(sql))
    for role in ("analyst", "viewer"):
        status, doc = query(gw, sql, role)
        assert refused(status, doc) == (400, INVALID_PARAMS, "input_limit_exceeded")
        assert doc["error"]["data"]["limit"] == "sql_length"
        assert doc["error"]["data"]["max"] == MAX_SQL_LENGTH


def test_too_many_tokens_is_refused_naming_the_bound(gw: Gateway) -> None:
    """Within the length cap, a text of more tokens than the cap is refused with 400."""
    sql = "SELECT 1" + "+1" * MAX_SQL_TOKENS
    assert len(sql) <= MAX_SQL_LENGTH
    status, doc = query(gw, sql)
    assert refused(status, doc) == (400, INVALID_PARAMS, "input_limit_exceeded")
    assert doc["error"]["data"]["limit"] == "sql_tokens"


def test_allowed_queries_still_work(gw: Gateway) -> None:
    """Ordinary reports over the analyst's tables, with joins, CTEs, aggregates and parameters,
    run and return rows."""
    status, doc = query(gw, "SELECT count(*) FROM orders")
    assert status == 200 and rows_of(doc)[0][0] > 0
    status, doc = query(gw, "WITH big AS (SELECT * FROM orders WHERE total_cents > ?) "
                            "SELECT c.name, count(*), sum(b.total_cents) FROM big b "
                            "JOIN customers c ON b.customer_id = c.id GROUP BY c.name ORDER BY 2 DESC",
                        params=[0])
    assert status == 200 and rows_of(doc)
    status, doc = query(gw, "SELECT upper(substr(name, 1, 3)), round(price_cents / 100.0, 2) FROM products "
                            "WHERE name LIKE '%' LIMIT 3")
    assert status == 200 and len(rows_of(doc)) == 3
    status, doc = query(gw, "SELECT count(*) FROM employees", "admin")
    assert status == 200 and rows_of(doc)[0][0] > 0


def test_schema_resource_follows_the_table_rule(gw: Gateway) -> None:
    """db://schema/employees is refused to an analyst, as describe_table employees is; the
    analyst's own tables stay readable both ways (finding 5)."""
    assert refused(*describe(gw, "employees")) == (403, FORBIDDEN, "table_not_allowed")
    assert refused(*read_resource(gw, "db://schema/employees")) == (403, FORBIDDEN, "table_not_allowed")
    for spelling in ("db://schema/EMPLOYEES", "db://schema/main.employees", "db://schema/%65mployees",
                     "db://schema/orders/../employees", "db://schema/employees?x=1"):
        status, code, _ = refused(*read_resource(gw, spelling))
        assert (status, code) == (403, FORBIDDEN), spelling
    status, doc = read_resource(gw, "db://schema/orders")
    assert status == 200 and json.loads(doc["result"]["contents"][0]["text"])["table"] == "orders"
    status, doc = describe(gw, "orders")
    assert status == 200 and doc["result"].get("isError") is not True
    status, doc = read_resource(gw, "db://schema/employees", "admin")
    assert status == 200


def test_resource_list_hides_tables_the_caller_may_not_read(gw: Gateway) -> None:
    """resources/list shows an analyst only the schemas of tables the analyst may read."""
    status, doc = list_resources(gw, "analyst")
    assert status == 200, doc
    uris = {r["uri"] for r in doc["result"]["resources"]}
    assert "db://schema/orders" in uris and "db://schema/customers" in uris
    assert "db://schema/employees" not in uris and "db://schema/inventory" not in uris
    status, doc = list_resources(gw, "admin")
    assert status == 200 and "db://schema/employees" in {r["uri"] for r in doc["result"]["resources"]}

