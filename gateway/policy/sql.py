"""SQL facts for the policy: which tables and functions a query reads, from a real SQL parser.

Placeholder: filled in by the SQL work of the security findings (issue on SQL table bypass).
"""

from __future__ import annotations

from typing import Any


def sql_facts(sql: Any) -> dict[str, Any]:
    """The facts of one SQL text (``input.mcp.facts.sql``)."""
    return {}
