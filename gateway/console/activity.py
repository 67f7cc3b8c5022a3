"""The console's own entries in the audit trail: who searched or exported the audit trail, with
which filters and how many rows. They go to the console's chain, ``console.jsonl`` in
``audit.dir``, written by the same AuditWriter as every other service's (hash-chained,
checkpoint-signed with ``audit.signing_key``, the operator's subject sealed with
``audit.master_key``), so ``mcp-gateway audit verify`` checks them and the console's own audit
search finds them."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.caller import Caller
from gateway.console.audit_search import Filters
from gateway.telemetry.audit import AuditEntry, AuditWriter
from gateway.telemetry.audit_chain import CheckpointSigner
from gateway.telemetry.audit_keys import SubjectKeyStore

CONSOLE_AUDIT_FILE = "console.jsonl"
SEARCH = "console/audit.search"
EXPORT = "console/audit.export"
# The live tail polls the same search every few seconds: it is recorded again only after this.
REPEAT_SECONDS = 600.0
MAX_REMEMBERED = 10_000


def open_writer(audit_dir: str, *, signing_key: str | None,
                keys: SubjectKeyStore | None) -> AuditWriter:
    signer = CheckpointSigner.from_file(signing_key) if signing_key else None
    Path(audit_dir).mkdir(parents=True, exist_ok=True)
    return AuditWriter(Path(audit_dir) / CONSOLE_AUDIT_FILE, signer=signer, keys=keys)


def describe(filters: Filters, keys: SubjectKeyStore | None) -> str:
    """The filters as the entry's target: ``name=value`` pairs, a searched subject as its
    pseudonym when the trail seals subjects (so an erasure also covers who was searched for)."""
    parts = []
    for name in ("sub", "server", "tool", "outcome", "decision_id", "since", "until"):
        value = getattr(filters, name)
        if not value:
            continue
        if name == "sub" and keys is not None:
            value = f"sid:{keys.subject_id(value)}"
        parts.append(f"{name}={value}")
    return " ".join(parts) or "(all)"


class ConsoleActivity:
    """Records audit searches and exports; a write that fails raises AuditUnavailable, and the
    caller refuses what it was about to show."""

    def __init__(self, writer: AuditWriter, keys: SubjectKeyStore | None) -> None:
        self.writer = writer
        self.keys = keys
        self._recorded: dict[tuple[str, str], float] = {}

    async def record(self, claims: Mapping[str, Any], method: str, filters: Filters, *,
                     rows: int | None, status: str) -> None:
        """Append one entry (returns once it is on disk; AuditUnavailable otherwise)."""
        caller = Caller.from_claims(claims)
        await self.writer.write(AuditEntry(
            method=method, server="console", target=describe(filters, self.keys), sub=caller.sub,
            client_id=caller.client_id, tenant=caller.tenant, decision="allow",
            reason=None if rows is None else f"rows={rows}", status=status, latency_ms=None,
            request_id=None, decision_id=None, service="console"))
        if method == SEARCH:
            if len(self._recorded) >= MAX_REMEMBERED:
                self._recorded.clear()
            self._recorded[(caller.sub, describe(filters, None))] = time.monotonic()

    def recently_recorded(self, sub: str, filters: Filters) -> bool:
        """Whether ``sub``'s search with ``filters`` was recorded within REPEAT_SECONDS (the live
        tail's polls of the search its page recorded)."""
        last = self._recorded.get((sub, describe(filters, None)))
        return last is not None and time.monotonic() - last < REPEAT_SECONDS
