"""The demo dataset: a small multi-tenant shop with personal data for masking tests.

The same DDL runs on SQLite and PostgreSQL. Values are fictional: emails use example.com /
example.org, phone numbers the +1-555-01xx and +44 20 7946 0xxx ranges reserved for fiction, and
national IDs come from documented specimen ranges.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

TENANTS = ("acme", "globex")

SCHEMA: tuple[tuple[str, str], ...] = (
    ("products", """CREATE TABLE products (
        id INTEGER PRIMARY KEY,
        sku TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        category TEXT NOT NULL,
        price_cents INTEGER NOT NULL,
        stock INTEGER NOT NULL DEFAULT 0)"""),
    ("customers", """CREATE TABLE customers (
        id INTEGER PRIMARY KEY,
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        email TEXT NOT NULL,
        phone TEXT,
        country TEXT NOT NULL,
        created_at TEXT NOT NULL)"""),
    ("orders", """CREATE TABLE orders (
        id INTEGER PRIMARY KEY,
        tenant TEXT NOT NULL,
        customer_id INTEGER NOT NULL REFERENCES customers(id),
        product_id INTEGER NOT NULL REFERENCES products(id),
        quantity INTEGER NOT NULL,
        total_cents INTEGER NOT NULL,
        status TEXT NOT NULL,
        ordered_at TEXT NOT NULL)"""),
    ("employees", """CREATE TABLE employees (
        id INTEGER PRIMARY KEY,
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        email TEXT NOT NULL,
        phone TEXT,
        department TEXT NOT NULL,
        title TEXT NOT NULL,
        salary_cents INTEGER NOT NULL,
        national_id TEXT)"""),
)

_PRODUCTS = [
    ("WID-001", "Widget", "hardware", 1999, 120), ("WID-002", "Widget Pro", "hardware", 4999, 40),
    ("GAD-001", "Gadget", "hardware", 2999, 75), ("CAB-001", "USB-C cable", "accessories", 999, 500),
    ("SUP-001", "Support plan (1y)", "services", 19900, 0),
    ("LIC-001", "Analytics licence", "software", 49900, 0),
    ("DOC-001", "Docking station", "hardware", 12900, 15), ("KEY-001", "Keyboard", "accessories", 5900, 60),
]

_FIRST = ["Ada", "Alan", "Grace", "Linus", "Margaret", "Dennis", "Barbara", "Ken", "Frances", "Edsger",
          "Radia", "Tim"]
_LAST = ["Lovelace", "Turing", "Hopper", "Torvalds", "Hamilton", "Ritchie", "Liskov", "Thompson", "Allen",
         "Dijkstra", "Perlman", "Berners-Lee"]
_COUNTRIES = ["US", "GB", "DE", "FR", "NL", "US"]
_STATUSES = ["pending", "paid", "shipped", "delivered", "refunded"]
_DEPARTMENTS = [("Engineering", "Engineer"), ("Sales", "Account Executive"), ("Finance", "Analyst"),
                ("Support", "Support Specialist")]


def rows() -> dict[str, list[tuple[Any, ...]]]:
    """Deterministic demo rows for each table, in insertion order."""
    products = [(i, *p) for i, p in enumerate(_PRODUCTS, start=1)]
    customers = []
    for i in range(1, 13):
        first, last = _FIRST[i - 1], _LAST[i - 1]
        tenant = TENANTS[i % 2]
        phone = f"+1-555-01{i:02d}" if i % 3 else f"+44 20 7946 0{i:03d}"
        customers.append((i, tenant, f"{first} {last}", f"{first.lower()}.{last.lower()}@example.com", phone,
                          _COUNTRIES[i % len(_COUNTRIES)], f"2025-0{1 + i % 9}-{10 + i:02d}T09:00:00Z"))
    orders = []
    for i in range(1, 31):
        customer = customers[(i * 7) % len(customers)]
        product = products[(i * 5) % len(products)]
        qty = 1 + i % 4
        ordered_at = f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T12:{i:02d}:00Z"
        orders.append((i, customer[1], customer[0], product[0], qty, qty * product[4],
                       _STATUSES[i % len(_STATUSES)], ordered_at))
    employees = []
    for i in range(1, 9):
        first, last = _FIRST[-i], _LAST[i - 1]
        dept, title = _DEPARTMENTS[i % len(_DEPARTMENTS)]
        employees.append((i, TENANTS[i % 2], f"{first} {last}", f"{first.lower()}.{last.lower()}@example.org",
                          f"+1-555-01{50 + i:02d}", dept, title, 6_000_000 + i * 450_000,
                          f"078-05-{1120 + i:04d}"))
    return {"products": products, "customers": customers, "orders": orders, "employees": employees}


def _insert_sql(table: str, width: int, placeholder: str) -> str:
    marks = ", ".join(placeholder.format(n=n) for n in range(1, width + 1))
    return f"INSERT INTO {table} VALUES ({marks})"  # noqa: S608 - table names come from SCHEMA, not input


def seed_sqlite(path: str) -> bool:
    """Create and fill the demo tables unless they exist; True if this call seeded them.

    Several server instances may start on the same file at once: BEGIN IMMEDIATE takes the write
    lock before the existence check, so exactly one of them seeds.
    """
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            existing = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
            if "customers" in existing:
                conn.execute("ROLLBACK")
                return False
            data = rows()
            for table, ddl in SCHEMA:
                conn.execute(ddl)
                table_rows: Sequence[tuple[Any, ...]] = data[table]
                conn.executemany(_insert_sql(table, len(table_rows[0]), "?"), table_rows)
            conn.execute("COMMIT")
        except sqlite3.Error:
            conn.execute("ROLLBACK")
            raise
        return True
    finally:
        conn.close()


async def seed_postgres(conn: Any) -> bool:
    """Same as :func:`seed_sqlite` on an asyncpg connection (used by ``--seed-demo`` and tests)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(7243001)")
        exists = await conn.fetchval("SELECT to_regclass('customers') IS NOT NULL")
        if exists:
            return False
        data = rows()
        for table, ddl in SCHEMA:
            await conn.execute(ddl)
            await conn.executemany(_insert_sql(table, len(data[table][0]), "${n}"), data[table])
    return True
