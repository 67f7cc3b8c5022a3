"""SQLite storage for the demo ERP: schema, seed data and the queries the HTTP layer needs.

The queries are synchronous on purpose: they touch a few rows of a local file, so running them on
the event loop costs less than a thread hop, and a single connection keeps SQLite's locking simple.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

ORDER_STATUSES = ("open", "shipped", "invoiced", "cancelled")
INVOICE_STATUSES = ("open", "paid", "overdue")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS customers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT NOT NULL,
    phone TEXT NOT NULL,
    country TEXT NOT NULL,
    credit_limit_cents INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    notes TEXT
);
CREATE TABLE IF NOT EXISTS order_lines (
    order_id INTEGER NOT NULL REFERENCES orders(id),
    line_no INTEGER NOT NULL,
    sku TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    unit_price_cents INTEGER NOT NULL,
    PRIMARY KEY (order_id, line_no)
);
CREATE TABLE IF NOT EXISTS invoices (
    id INTEGER PRIMARY KEY,
    order_id INTEGER NOT NULL REFERENCES orders(id),
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    amount_cents INTEGER NOT NULL,
    currency TEXT NOT NULL,
    status TEXT NOT NULL,
    due_date TEXT NOT NULL,
    archived INTEGER NOT NULL DEFAULT 0
);
"""

# Emails and phone numbers are here on purpose: later issues mask PII in tool results.
_CUSTOMERS = [
    (1, "Acme Industrial GmbH", "procurement@acme-industrial.example", "+49 30 901820", "DE", 5_000_000),
    (2, "Blue Harbor Logistics", "ap@blueharbor.example", "+1 415 555 0134", "US", 2_500_000),
    (3, "Nordlicht Foods AB", "orders@nordlicht.example", "+46 8 123 456 78", "SE", 1_000_000),
    (4, "Sakura Components KK", "purchasing@sakura-comp.example", "+81 3 1234 5678", "JP", 7_500_000),
    (5, "Maple Leaf Retail Inc", "jane.doe@mapleleaf.example", "+1 604 555 0199", "CA", 500_000),
]
_ORDERS = [
    (1001, 1, "invoiced", "2025-01-14T09:30:00Z", None),
    (1002, 1, "shipped", "2025-02-02T14:05:00Z", "deliver to dock 4"),
    (1003, 2, "open", "2025-02-20T08:00:00Z", None),
    (1004, 3, "invoiced", "2025-03-01T11:45:00Z", None),
    (1005, 4, "open", "2025-03-03T16:20:00Z", "call +81 3 1234 5678 before delivery"),
    (1006, 5, "cancelled", "2025-03-05T10:10:00Z", "customer changed supplier"),
    (1007, 2, "invoiced", "2024-11-11T07:55:00Z", None),
]
_LINES = [
    (1001, 1, "BOLT-M8", 500, 12), (1001, 2, "NUT-M8", 500, 5),
    (1002, 1, "GEAR-40T", 20, 4_500),
    (1003, 1, "PALLET-EU", 40, 1_800),
    (1004, 1, "CRATE-S", 120, 950), (1004, 2, "LABEL-R", 1_000, 3),
    (1005, 1, "SENSOR-IR", 15, 12_000),
    (1006, 1, "SHELF-2M", 10, 8_900),
    (1007, 1, "PALLET-EU", 100, 1_750),
]
_INVOICES = [
    (5001, 1001, 1, 8_500, "EUR", "paid", "2025-02-13", 0),
    (5002, 1004, 3, 117_000, "SEK", "open", "2025-03-31", 0),
    (5003, 1007, 2, 175_000, "USD", "overdue", "2024-12-11", 1),
]


class NotFound(LookupError):
    """The requested row does not exist."""


class Conflict(ValueError):
    """The request is valid but the row's state forbids it."""


@dataclass(frozen=True)
class OrderLine:
    sku: str
    quantity: int
    unit_price_cents: int


class ErpStore:
    """All database access of the demo ERP."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.executescript(_SCHEMA)
        self._seed()

    def close(self) -> None:
        self._db.close()

    def _seed(self) -> None:
        if self._db.execute("SELECT COUNT(*) FROM customers").fetchone()[0]:
            return
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO customers VALUES (?,?,?,?,?,?)", _CUSTOMERS)
            self._db.executemany("INSERT INTO orders VALUES (?,?,?,?,?)", _ORDERS)
            self._db.executemany("INSERT INTO order_lines VALUES (?,?,?,?,?)", _LINES)
            self._db.executemany("INSERT INTO invoices VALUES (?,?,?,?,?,?,?,?)", _INVOICES)

    # customers
    def list_customers(self, *, country: str | None, limit: int,
                       offset: int) -> tuple[list[dict[str, Any]], int]:
        where, args = ("WHERE country = ?", [country]) if country else ("", [])
        total = self._db.execute(f"SELECT COUNT(*) FROM customers {where}", args).fetchone()[0]  # noqa: S608
        rows = self._db.execute(
            f"SELECT * FROM customers {where} ORDER BY id LIMIT ? OFFSET ?", [*args, limit, offset]  # noqa: S608
        ).fetchall()
        return [dict(r) for r in rows], int(total)

    def get_customer(self, customer_id: int) -> dict[str, Any]:
        row = self._db.execute("SELECT * FROM customers WHERE id = ?", (customer_id,)).fetchone()
        if row is None:
            raise NotFound(f"customer {customer_id} does not exist")
        return dict(row)

    # orders
    def _order(self, row: sqlite3.Row) -> dict[str, Any]:
        lines = self._db.execute(
            "SELECT sku, quantity, unit_price_cents FROM order_lines WHERE order_id = ? ORDER BY line_no",
            (row["id"],),
        ).fetchall()
        items = [dict(x) for x in lines]
        order = dict(row)
        order["items"] = items
        order["total_cents"] = sum(x["quantity"] * x["unit_price_cents"] for x in items)
        return order

    def list_orders(self, *, customer_id: int | None, status: str | None, limit: int,
                    offset: int) -> tuple[list[dict[str, Any]], int]:
        clauses: list[str] = []
        args: list[Any] = []
        if customer_id is not None:
            clauses.append("customer_id = ?")
            args.append(customer_id)
        if status is not None:
            clauses.append("status = ?")
            args.append(status)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        total = self._db.execute(f"SELECT COUNT(*) FROM orders {where}", args).fetchone()[0]  # noqa: S608
        rows = self._db.execute(
            f"SELECT * FROM orders {where} ORDER BY id LIMIT ? OFFSET ?", [*args, limit, offset]  # noqa: S608
        ).fetchall()
        return [self._order(r) for r in rows], int(total)

    def get_order(self, order_id: int) -> dict[str, Any]:
        row = self._db.execute("SELECT * FROM orders WHERE id = ?", (order_id,)).fetchone()
        if row is None:
            raise NotFound(f"order {order_id} does not exist")
        return self._order(row)

    def create_order(self, customer_id: int, lines: list[OrderLine], notes: str | None,
                     created_at: str) -> dict[str, Any]:
        self.get_customer(customer_id)
        with self._db:
            self._db.execute("BEGIN")
            cur = self._db.execute(
                "INSERT INTO orders (customer_id, status, created_at, notes) VALUES (?, 'open', ?, ?)",
                (customer_id, created_at, notes),
            )
            order_id = cur.lastrowid
            self._db.executemany(
                "INSERT INTO order_lines VALUES (?,?,?,?,?)",
                [(order_id, i + 1, x.sku, x.quantity, x.unit_price_cents) for i, x in enumerate(lines)],
            )
        assert order_id is not None  # an INSERT always sets lastrowid
        return self.get_order(order_id)

    def update_order_notes(self, order_id: int, notes: str | None) -> dict[str, Any]:
        order = self.get_order(order_id)
        if order["status"] == "cancelled":
            raise Conflict(f"order {order_id} is cancelled and can no longer be changed")
        self._db.execute("UPDATE orders SET notes = ? WHERE id = ?", (notes, order_id))
        return self.get_order(order_id)

    def cancel_order(self, order_id: int) -> dict[str, Any]:
        order = self.get_order(order_id)
        if order["status"] != "open":
            raise Conflict(f"order {order_id} is {order['status']}; only open orders can be cancelled")
        self._db.execute("UPDATE orders SET status = 'cancelled' WHERE id = ?", (order_id,))
        return self.get_order(order_id)

    # invoices
    def list_invoices(self, *, customer_id: int | None, status: str | None,
                      archived: bool) -> list[dict[str, Any]]:
        clauses = ["archived = ?"]
        args: list[Any] = [int(archived)]
        if customer_id is not None:
            clauses.append("customer_id = ?")
            args.append(customer_id)
        if status is not None:
            clauses.append("status = ?")
            args.append(status)
        rows = self._db.execute(
            f"SELECT * FROM invoices WHERE {' AND '.join(clauses)} ORDER BY id", args  # noqa: S608
        ).fetchall()
        return [_invoice(r) for r in rows]

    def get_invoice(self, invoice_id: int) -> dict[str, Any]:
        row = self._db.execute("SELECT * FROM invoices WHERE id = ?", (invoice_id,)).fetchone()
        if row is None:
            raise NotFound(f"invoice {invoice_id} does not exist")
        return _invoice(row)

    def sales_by_country(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT c.country AS country, COUNT(DISTINCT o.id) AS orders, "
            "COALESCE(SUM(l.quantity * l.unit_price_cents), 0) AS revenue_cents "
            "FROM customers c JOIN orders o ON o.customer_id = c.id AND o.status != 'cancelled' "
            "JOIN order_lines l ON l.order_id = o.id GROUP BY c.country ORDER BY c.country"
        ).fetchall()
        return [dict(r) for r in rows]


def _invoice(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d.pop("archived")
    return d
