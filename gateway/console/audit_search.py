"""Bounded reads of the audit trail for the console: newest first, across every writer's chain.

A trail can hold hundreds of thousands of entries, so nothing here reads a whole file: each
chain's files are read backwards in blocks, entries are filtered as they come, and a search
stops after ``limit`` matches or ``max_scan`` entries, whichever comes first (the answer says
which). Entries whose personal fields are sealed (audit.master_key) are matched on subject by
the subject's pseudonym and opened for display with the key store; an erased subject's entries
show no subject."""

from __future__ import annotations

import base64
import binascii
import heapq
import logging
import os
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.telemetry.audit_chain import audit_files
from gateway.telemetry.audit_keys import KeyStoreError, SubjectKeyReader, SubjectKeyStore
from gateway.telemetry.audit_verify import chain_bases

logger = logging.getLogger(__name__)

BLOCK_BYTES = 64 * 1024
MAX_FIELD_CHARS = 200  # a filter value longer than this is refused
SHOWN_FIELDS = ("ts", "sub", "tenant", "client_id", "method", "server", "target", "decision", "reason",
                "status", "latency_ms", "decision_id", "request_id", "trace_id", "service")


def reverse_blocks(path: Path, block: int = BLOCK_BYTES) -> Iterator[bytes]:
    """Blocks of complete lines of ``path`` (each without its final newline), last block first;
    a torn last line, without its newline, is skipped."""
    with path.open("rb") as f:
        pos = f.seek(0, os.SEEK_END)
        tail = b""
        first = True
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step) + tail
            cut = chunk.find(b"\n")
            if cut < 0:  # one line longer than a block: read on
                tail = chunk
                continue
            tail, body = chunk[:cut], chunk[cut + 1:]
            if first:
                # After a final newline the body ends with it; otherwise with a torn line.
                body = body[:body.rfind(b"\n") + 1] if not body.endswith(b"\n") else body
                first = False
            body = body.rstrip(b"\n")
            if body:
                yield body
        if tail and not first:
            yield tail


def reverse_lines(path: Path, block: int = BLOCK_BYTES) -> Iterator[bytes]:
    """The complete lines of ``path``, last first (a torn last line is skipped)."""
    for body in reverse_blocks(path, block):
        yield from (line for line in reversed(body.split(b"\n")) if line)


@dataclass
class _Count:
    """Lines read by every chain of one search, and its bound."""

    limit: int
    lines: int = 0

    @property
    def exhausted(self) -> bool:
        return self.lines >= self.limit


def _lines_with(body: bytes, needles: tuple[tuple[bytes, ...], ...]) -> list[bytes]:
    """The lines of ``body`` holding one alternative of every group, last first. The first group
    is searched in the whole block (C speed); only the lines it hits are looked at."""
    starts: set[int] = set()
    for needle in needles[0]:
        at = body.find(needle)
        while at >= 0:
            starts.add(body.rfind(b"\n", 0, at) + 1)
            at = body.find(needle, at + len(needle))
    out = []
    for start in sorted(starts, reverse=True):
        end = body.find(b"\n", start)
        line = body[start:] if end < 0 else body[start:end]
        if all(any(n in line for n in group) for group in needles[1:]):
            out.append(line)
    return out


def chain_newest_first(base: Path, needles: tuple[tuple[bytes, ...], ...] = (),
                       count: _Count | None = None) -> Generator[dict[str, Any]]:
    """The entries of one writer's chain, newest first (unparsable lines skipped). A line that
    contains none of the alternatives of one of ``needles`` (the JSON text of a value a filter
    asks for) cannot match and is not parsed: parsing is most of a search's cost, so with
    needles whole blocks are searched at once. Stops once ``count`` is exhausted."""
    for file in reversed(audit_files(base)):
        for body in reverse_blocks(file):
            n = body.count(b"\n") + 1
            if count is not None:
                if count.exhausted:
                    return
                room = count.limit - count.lines
                if n > room:  # only the newest `room` lines are within the bound
                    body = b"\n".join(body.split(b"\n")[-room:])
                    n = room
                count.lines += n
            lines = _lines_with(body, needles) if needles else reversed(body.split(b"\n"))
            for line in lines:
                if not line:
                    continue
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


MAX_CACHED_KEYS = 10_000
MAX_WRITER_FOLDERS = 256


def trail_bases(directory: Path) -> list[Path]:
    """The chains in ``directory`` and in its folders one level down: the dev stack's writers
    share audit.dir, docker compose and Kubernetes mount each writer's volume at
    audit.dir/<writer> (at most MAX_WRITER_FOLDERS folders; an unreadable one is skipped)."""
    bases = chain_bases(directory)
    try:
        folders = sorted(p for p in directory.iterdir() if p.is_dir())[:MAX_WRITER_FOLDERS]
    except OSError:
        return bases
    for folder in folders:
        try:
            bases.extend(chain_bases(folder))
        except OSError:
            continue
    return bases


class Opener:
    """Opens sealed personal fields for one search or export, unwrapping each subject key
    (folder, sid, kid) once: an export of one subject's 100,000 entries asks the key store, and
    decrypts the wrapped key, once instead of 100,000 times. An entry is opened with the key
    store of the folder its file is in (each writer of docker compose and Kubernetes keeps its
    own beside its file), read-only, under the console's master key."""

    def __init__(self, store: SubjectKeyStore) -> None:
        self.store = store
        self._home = store.path.parent.resolve()
        self._keys: dict[tuple[Path, str, int], AESGCM | None] = {}
        self._readers: dict[Path, SubjectKeyReader | None] = {}

    def _source(self, folder: Path) -> SubjectKeyStore | SubjectKeyReader | None:
        if folder == self._home:
            return self.store
        if folder not in self._readers:
            try:
                self._readers[folder] = self.store.reader(folder)
            except KeyStoreError as exc:
                logger.warning("audit key store of %s not opened: %s", folder, exc)
                self._readers[folder] = None
        return self._readers[folder]

    def close(self) -> None:
        for reader in self._readers.values():
            if reader is not None:
                reader.close()
        self._readers.clear()

    def open(self, entry: dict[str, Any], folder: Path | None = None) -> dict[str, Any] | None:
        """As SubjectKeyStore.open: the personal fields, or None (erased key, damaged entry, a
        folder without a store the console can read). ``folder``: where the entry's file is
        (default: the console's own audit folder)."""
        sid, pii = entry.get("sid"), entry.get("pii")
        if not isinstance(sid, str) or not isinstance(pii, str) or ":" not in pii:
            return None
        kid_text, blob = pii.split(":", 1)
        try:
            kid = int(kid_text)
            raw = base64.b64decode(blob, validate=True)
        except (ValueError, binascii.Error):
            return None
        where = self._home if folder is None else folder
        key = (where, sid, kid)
        if key in self._keys:
            aead = self._keys[key]
        else:
            source = self._source(where)
            try:
                aead = source.key_for_reading(sid, kid) if source is not None else None
            except KeyStoreError:
                aead = None
            if len(self._keys) >= MAX_CACHED_KEYS:
                self._keys.clear()
            self._keys[key] = aead
        if aead is None or len(raw) <= 12:
            return None
        try:
            fields = orjson.loads(aead.decrypt(raw[:12], raw[12:], sid.encode()))
        except (InvalidTag, orjson.JSONDecodeError):
            return None
        return fields if isinstance(fields, dict) else None


def _with_folder(chain: Iterator[dict[str, Any]], folder: Path
                 ) -> Generator[tuple[dict[str, Any], Path]]:
    """A chain's entries, each with the folder of its files (whose key store opens it)."""
    for entry in chain:
        yield entry, folder


def _shown(entry: dict[str, Any], opener: Opener | None,
           folder: Path | None = None) -> tuple[dict[str, Any], bool]:
    """(the row as displayed, whether its sealed personal fields stayed closed)."""
    closed = False
    if entry.get("sid") is not None and entry.get("sub") is None:
        opened = opener.open(entry, folder) if opener is not None else None
        if opened is None:
            closed = True
        else:
            entry = {**entry, **opened}
    return {k: entry.get(k) for k in SHOWN_FIELDS}, closed


@dataclass(slots=True)
class Progress:
    """What a streamed search has read so far (:func:`iter_rows`)."""

    scanned: int = 0
    rows: int = 0
    sealed: int = 0
    exhausted: bool = False  # stopped by max_scan


def iter_rows(audit_dir: str | Path, filters: Filters, *, max_scan: int,
              store: SubjectKeyStore | None = None,
              progress: Progress | None = None) -> Generator[dict[str, Any]]:
    """The entries matching ``filters``, newest first, one displayed row at a time (nothing is
    collected: an export streams them), reading at most ``max_scan`` entries; ``progress``
    follows the count."""
    progress = progress if progress is not None else Progress()
    directory = Path(audit_dir)
    if not directory.is_dir():
        return
    sid = store.subject_id(filters.sub) if (store is not None and filters.sub) else None
    opener = Opener(store) if store is not None else None
    needles = _needles(filters, sid)
    count = _Count(max_scan)
    bases = trail_bases(directory)
    chains = [chain_newest_first(base, needles, count) for base in bases]
    tagged = [_with_folder(chain, base.parent.resolve()) for chain, base in zip(chains, bases, strict=True)]
    merged = heapq.merge(*tagged, key=lambda pair: str(pair[0].get("ts", "")), reverse=True)
    try:
        for entry, folder in merged:
            progress.scanned = count.lines
            ts = entry.get("ts")
            if filters.since and isinstance(ts, str) and ts < filters.since:
                break  # newest first: everything after this is older still
            if not _matches(entry, filters, sid):
                continue
            row, closed = _shown(entry, opener, folder)
            progress.sealed += closed
            progress.rows += 1
            yield row
    finally:
        progress.scanned = count.lines
        progress.exhausted = count.exhausted
        for pairs in tagged:
            pairs.close()
        for chain in chains:
            chain.close()
        if opener is not None:
            opener.close()


def search(audit_dir: str | Path, filters: Filters, *, limit: int, max_scan: int,
           store: SubjectKeyStore | None = None) -> SearchResult:
    """The newest ``limit`` entries matching ``filters``, reading at most ``max_scan`` entries."""
    result = SearchResult()
    progress = Progress()
    rows = iter_rows(audit_dir, filters, max_scan=max_scan, store=store, progress=progress)
    try:
        for row in rows:
            result.rows.append(row)
            if len(result.rows) >= limit:
                break
    finally:
        rows.close()
    result.scanned = progress.scanned
    result.sealed = progress.sealed
    # Stopped by the bound, not by the trail's start (a search that ended exactly there says so too).
    result.truncated = progress.exhausted and len(result.rows) < limit
    return result


def _needles(f: Filters, sid: str | None) -> tuple[tuple[bytes, ...], ...]:
    """Groups of byte strings: a line matching ``f`` contains one of each group. Each asked value
    as JSON text (the writers serialise with orjson, which escapes no printable ASCII); a subject
    stands in clear or, sealed, as its pseudonym."""
    values = (f.server, f.tool, f.outcome, f.decision_id)
    out: list[tuple[bytes, ...]] = [(orjson.dumps(v),) for v in values if v]
    if f.sub:
        out.append((orjson.dumps(f.sub),) + ((orjson.dumps(sid),) if sid else ()))
    return tuple(out)
