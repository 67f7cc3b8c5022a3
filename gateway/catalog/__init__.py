"""The tool catalog: pinned definitions of every server's tools, resources and prompts.

``store`` keeps the catalog (SQLite, shared by processes); ``client`` fetches listings from the
MCP servers themselves with the gateway's own identity.
"""

from gateway.catalog.store import (
    APPROVED,
    MODES,
    NEW,
    QUARANTINED,
    Catalog,
    CatalogError,
    Entry,
    InvalidArguments,
    RefreshReport,
    ToolNotCallable,
    canonical_json,
    default_db_path,
    definition_hash,
    hidden_char_findings,
)

__all__ = ["APPROVED", "MODES", "NEW", "QUARANTINED", "Catalog", "CatalogError", "Entry",
           "InvalidArguments", "RefreshReport", "ToolNotCallable", "canonical_json", "default_db_path",
           "definition_hash", "hidden_char_findings"]
