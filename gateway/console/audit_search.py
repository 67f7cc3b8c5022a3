"""Bounded reads of the audit trail for the console: newest first, across every writer's chain.

A trail can hold hundreds of thousands of entries, so nothing here reads a whole file: each
chain's files are read backwards in blocks, entries are filtered as they come, and a search
stops after ``limit`` matches or ``max_scan`` entries, whichever comes first (the answer says
which). Entries whose personal fields are sealed (audit.master_key) are matched on subject by
the subject's pseudonym and opened for display with the key store; an erased subject's entries
show no subject."""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.telemetry.audit_chain import audit_files
from gateway.telemetry.audit_keys import SubjectKeyStore
from gateway.telemetry.audit_verify import chain_bases

BLOCK_BYTES = 64 * 1024
MAX_FIELD_CHARS = 200  # a filter value longer than this is refused
SHOWN_FIELDS = ("ts", "sub", "tenant", "client_id", "method", "server", "target", "decision", "reason",
                "status", "latency_ms", "decision_id", "request_id", "trace_id", "service")


def reverse_lines(path: Path, block: int = BLOCK_BYTES) -> Iterator[bytes]:
    """The complete lines of ``path``, last first (a torn last line, without its newline, is
    skipped), read in blocks from the end."""
    with path.open("rb") as f:
        pos = f.seek(0, os.SEEK_END)
        tail = b""
        first = True
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step) + tail
            lines = chunk.split(b"\n")
            tail = lines[0]
            rest = lines[1:]
            if first:
                # After a final newline the last element is b""; otherwise a torn line.
                rest = rest[:-1]
                first = False
            yield from (line for line in reversed(rest) if line)
        if tail and not first:
            yield tail


def chain_newest_first(base: Path) -> Iterator[dict[str, Any]]:
    """The entries of one writer's chain, newest first (unparsable lines skipped)."""
    for file in reversed(audit_files(base)):
        for line in reverse_lines(file):
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "method" in entry:
                yield entry


@dataclass(frozen=True, slots=True)
class Filters:
    sub: str | None = None
    server: str | None = None
    tool: str | None = None
    outcome: str | None = None  # "allow" | "deny"
    decision_id: str | None = None
    since: str | None = None  # RFC 3339 prefix, inclusive
    until: str | None = None  # exclusive

    @classmethod
    def from_query(cls, query: Any) -> Filters:
        """From a request's query (a mapping); ValueError names a bad parameter."""
        values: dict[str, str | None] = {}
        for name in ("sub", "server", "tool", "outcome", "decision_id", "since", "until"):
            raw = query.get(name)
            value = raw.strip() if isinstance(raw, str) else None
            if value and len(value) > MAX_FIELD_CHARS:
                raise ValueError(f"{name} is longer than {MAX_FIELD_CHARS} characters")
            values[name] = value or None
        if values["outcome"] not in (None, "allow", "deny"):
            raise ValueError("outcome must be allow or deny")
        return cls(**values)

    def active(self) -> bool:
        return any(getattr(self, f) for f in self.__slots__)


@dataclass(slots=True)
class SearchResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    scanned: int = 0
    truncated: bool = False  # stopped at max_scan before the trail's start
    sealed: int = 0  # rows whose personal fields could not be opened


def _matches(entry: dict[str, Any], f: Filters, sid: str | None) -> bool:
    ts = entry.get("ts")
    if f.until and isinstance(ts, str) and ts >= f.until:
        return False
    if f.since and isinstance(ts, str) and ts < f.since:
        return False
    if f.server and entry.get("server") != f.server:
        return False
    if f.tool and entry.get("target") != f.tool:
        return False
    if f.outcome and entry.get("decision") != f.outcome:
        return False
    if f.decision_id and entry.get("decision_id") != f.decision_id:
        return False
    if f.sub:
        if entry.get("sub") == f.sub:
            return True
        return sid is not None and entry.get("sid") == sid
    return True


def _shown(entry: dict[str, Any], store: SubjectKeyStore | None) -> tuple[dict[str, Any], bool]:
    """(the row as displayed, whether its sealed personal fields stayed closed)."""
    closed = False
    if entry.get("sid") is not None and entry.get("sub") is None:
        opened = store.open(entry) if store is not None else None
        if opened is None:
            closed = True
        else:
            entry = {**entry, **opened}
    return {k: entry.get(k) for k in SHOWN_FIELDS}, closed


def search(audit_dir: str | Path, filters: Filters, *, limit: int, max_scan: int,
           store: SubjectKeyStore | None = None) -> SearchResult:
    """The newest ``limit`` entries matching ``filters``, reading at most ``max_scan`` entries."""
    result = SearchResult()
    directory = Path(audit_dir)
    if not directory.is_dir():
        return result
    sid = store.subject_id(filters.sub) if (store is not None and filters.sub) else None
    chains = [chain_newest_first(base) for base in chain_bases(directory)]
    merged = heapq.merge(*chains, key=lambda e: str(e.get("ts", "")), reverse=True)
    for entry in merged:
        if result.scanned >= max_scan:
            result.truncated = True
            break
        result.scanned += 1
        ts = entry.get("ts")
        if filters.since and isinstance(ts, str) and ts < filters.since:
            break  # newest first: everything after this is older still
        if not _matches(entry, filters, sid):
            continue
        row, closed = _shown(entry, store)
        result.sealed += closed
        result.rows.append(row)
        if len(result.rows) >= limit:
            break
    return result
