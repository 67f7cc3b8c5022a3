"""Durable audit trail: who called what, decided how, with what result.

One entry per ``tools/call``, ``resources/read`` and ``prompts/get``. Entries are JSON lines
appended to a file and committed by group commit: :meth:`AuditWriter.write` returns only once the
batch holding the entry has been written and fsync'ed. A service that awaits it before releasing
its answer therefore never lets a client see a result whose audit entry could still be lost, even
if the process is killed with SIGKILL the next instant. With ``sync="interval"`` a batch counts as
committed once written to the kernel, which keeps it through a SIGKILL of the process, and the
writer fsyncs within ``sync_interval`` seconds (before any checkpoint or rotation too): a power
loss or kernel crash may lose that window's entries, nothing else (docs/compliance.md).

Disk trouble fails closed. The queue is bounded; a full queue first applies backpressure (the
caller waits), and if the entry is not committed within ``timeout`` seconds, ``write`` raises
:class:`AuditUnavailable` so the caller answers with an error instead of the result. After a failed
write or fsync the writer refuses every later entry: the kernel may have dropped the dirty pages,
so retrying could report success for data that is gone (the "fsyncgate" lesson).

The file is the source of truth. OTLP log export to a SIEM (:class:`OtlpAuditExporter`) is
optional, runs after the fsync and is best effort.

One writer per file: a lock file next to the audit file stops a second process from appending to
(and rotating) the same file. Give each process its own path, e.g. ``audit-ext_authz-1.jsonl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import hmac
import logging
import os
import re
import sqlite3
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import orjson

from gateway.errors import GatewayError
from gateway.telemetry import metrics
from gateway.telemetry.audit_chain import (
    CHECKPOINT_SUFFIX,
    CheckpointSigner,
    checkpoint_line,
    last_line,
)
from gateway.telemetry.audit_chain import (
    audit_files as audit_files,  # re-exported: the trail's readers import it from here
)
from gateway.telemetry.audit_keys import KeyStoreError, SubjectKeyStore
from gateway.telemetry.audit_retention import prune_chain, read_anchor, write_anchor

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# Every entry of a writer's chain starts with this head: its place in the chain and the hash of the
# entry before it (hex SHA-256 of that line without its newline). See gateway/telemetry/audit_chain.py.
_CHAIN_HEAD = b'{"v":%d,"seq":%d,"prev":"%s",'
GENESIS = "0" * 64
# Files one retention pass of a writer removes at most: commits wait while it runs.
PRUNE_MAX_FILES = 16
# When a batch counts as committed (AuditWriter(sync=...), audit.sync / audit.result_sync):
# "batch": written and fsync'ed (survives a power loss); "interval": written to the kernel
# (survives SIGKILL of the process, the kernel holds the bytes), fsync'ed by the writer within
# sync_interval seconds (a power loss or kernel crash may lose the entries of that window).
SYNC_BATCH = "batch"
SYNC_INTERVAL = "interval"
SYNC_MODES = (SYNC_BATCH, SYNC_INTERVAL)
AUDITED_METHODS = frozenset({"tools/call", "resources/read", "prompts/get"})
REDACTED = "[REDACTED]"

# Argument keys whose values never reach the digest. Matched after lower-casing and dropping "-"
# and "_", as substrings, so "X-Api-Key", "db_password" and "refreshToken" are all caught.
DEFAULT_SECRET_KEY_PARTS = (
    "password", "passwd", "passphrase", "secret", "token", "apikey", "authorization", "credential",
    "privatekey", "accesskey", "cookie", "sessionid", "bearer", "signature", "otp",
)
# Values that are credentials whatever key they sit under.
_SECRET_VALUE = re.compile(
    r"""^(?:bearer\s+\S+
        |eyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]*        # JWT / JWS compact form
        |(?:ghp|gho|ghu|ghs|ghr|github_pat)_\w{20,}
        |xox[abposr]-[\w-]{10,}
        |sk-[\w-]{20,}
        |(?:AKIA|ASIA)[0-9A-Z]{16}
        |-----BEGIN[ A-Z]*PRIVATE\ KEY-----.*)$""",
    re.IGNORECASE | re.VERBOSE | re.DOTALL,
)


class AuditUnavailable(GatewayError):
    """The audit trail cannot take the entry: answer with an error, never with the result."""

    code = "audit_unavailable"
    http_status = 503


class AuditCorrupt(ValueError):
    """An audit file has an unparseable line before its last one."""


# --------------------------------------------------------------------------------------------
# Argument digest


class _Lit(bytes):
    """Already-encoded canonical JSON text (distinguishes encoder output from user values)."""


def _is_secret_key(key: str, parts: tuple[str, ...]) -> bool:
    norm = key.lower().replace("-", "").replace("_", "")
    return any(p in norm for p in parts)


def _canonical_chunks(value: Any, secret_key_parts: tuple[str, ...]) -> Iterator[bytes]:
    """Canonical JSON of ``value`` (sorted keys, no whitespace) with secrets replaced by REDACTED.

    Iterative, so arguments nested a thousand levels deep (orjson parses up to 1024) neither hit
    the recursion limit nor escape redaction.
    """
    redacted = _Lit(orjson.dumps(REDACTED))
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Lit):
            yield item
        elif isinstance(item, dict):
            seq: list[Any] = [_Lit(b"{")]
            for i, key in enumerate(sorted(item, key=str)):
                if i:
                    seq.append(_Lit(b","))
                seq.append(_Lit(orjson.dumps(str(key)) + b":"))
                seq.append(redacted if _is_secret_key(str(key), secret_key_parts) else item[key])
            seq.append(_Lit(b"}"))
            stack.extend(reversed(seq))
        elif isinstance(item, list | tuple):
            seq = [_Lit(b"[")]
            for i, element in enumerate(item):
                if i:
                    seq.append(_Lit(b","))
                seq.append(element)
            seq.append(_Lit(b"]"))
            stack.extend(reversed(seq))
        elif isinstance(item, str):
            yield redacted if _SECRET_VALUE.match(item) else orjson.dumps(item)
        elif item is None or isinstance(item, bool):
            yield orjson.dumps(item)
        elif isinstance(item, int):
            yield str(item).encode()  # orjson refuses integers beyond 64 bits
        elif isinstance(item, float):
            yield orjson.dumps(item)
        else:
            raise TypeError(f"arguments must be JSON values, got {type(item).__name__}")


def args_digest(arguments: Any, *, key: bytes | None = None,
                secret_key_parts: tuple[str, ...] = DEFAULT_SECRET_KEY_PARTS) -> str:
    """Digest of the canonical form of ``arguments`` with secret values redacted first.

    Equal arguments give equal digests whatever their key order, so a SIEM can correlate calls
    without the audit trail holding the arguments. Secrets are removed before hashing because a
    plain hash of a short password or PIN is reversible by brute force. With ``key`` the digest is
    an HMAC, which also stops dictionary attacks on low-entropy non-secret arguments.
    """
    prefix = "hmac-sha256:" if key is not None else "sha256:"
    text = _plain_canonical(arguments, secret_key_parts)
    if text is not None:  # one-shot digests: hmac.new costs ~10 us more in Python
        return prefix + (hmac.digest(key, text, "sha256") if key is not None
                         else hashlib.sha256(text).digest()).hex()
    h = hmac.new(key, digestmod=hashlib.sha256) if key is not None else hashlib.sha256()
    for chunk in _canonical_chunks(arguments, secret_key_parts):
        h.update(chunk)
    return prefix + h.hexdigest()


# A string literal of JSON text without escapes (the only kind _plain_canonical reads): its
# content is the string itself.
_PLAIN_JSON_STRING = re.compile(rb'"([^"]*)"')


@functools.lru_cache(maxsize=8)
def _encoded(parts: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(part.encode() for part in parts)


def _plain_canonical(arguments: Any, secret_key_parts: tuple[str, ...]) -> bytes | None:
    """The canonical text of ``arguments`` in one orjson call when nothing in it can need
    redaction, else None (the caller walks the value with :func:`_canonical_chunks`).

    The same bytes as the walk: sorted keys, no whitespace, orjson's strings and floats. Taken
    only for ASCII text (Unicode case folding lets e.g. U+017F match ``s`` under IGNORECASE)
    without escapes (so each string literal's content is the string), in which no secret key
    part appears anywhere (keys normalised as :func:`_is_secret_key` does) and no string, key
    or value, is one ``_SECRET_VALUE`` matches (the same pattern the walk applies). Anything else,
    an integer beyond 64 bits included, takes the walk; a false alarm costs only the walk.
    """
    try:
        text = orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return None
    if not text.isascii() or b"\\" in text:
        return None
    folded = text.lower().replace(b"-", b"").replace(b"_", b"")
    if any(part in folded for part in _encoded(secret_key_parts)):
        return None
    if any(_SECRET_VALUE.match(m.group(1).decode("ascii"))
           for m in _PLAIN_JSON_STRING.finditer(text)):
        return None
    return text


# --------------------------------------------------------------------------------------------
# Entries


# (second, "YYYY-MM-DDTHH:MM:SS.") of the last timestamp: formatting the date once a second is a
# quarter of datetime.isoformat's cost per entry. One tuple, replaced whole: safe across threads.
_ts_second: tuple[int, str] = (-1, "")


def _now_rfc3339() -> str:
    """The current UTC time as ``2026-01-31T12:00:00.123456Z`` (what datetime.isoformat gives)."""
    global _ts_second
    second, ns = divmod(time.time_ns(), 1_000_000_000)
    cached = _ts_second
    if cached[0] != second:
        cached = _ts_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second)))
    return f"{cached[1]}{ns // 1000:06d}Z"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audited request. ``target`` is the tool name, resource URI or prompt name.

    Never put arguments, results or tokens here: ``args_digest`` (see :func:`args_digest`) stands
    in for the arguments.
    """

    method: str
    server: str
    target: str | None
    sub: str | None
    client_id: str | None
    tenant: str | None
    decision: str
    reason: str | None
    status: str
    latency_ms: float | None
    request_id: str | None
    decision_id: str | None
    args_digest: str | None = None
    trace_id: str | None = None
    service: str | None = None
    ts: str = field(default_factory=_now_rfc3339)

    def to_line(self) -> bytes:
        """The entry as one JSON line (newline included) outside any chain (seq 0, genesis prev)."""
        return chain_line(self.body(), 0, GENESIS.encode())

    def sealed_body(self, sid: bytes, pii: bytes) -> bytes:
        """:meth:`body` with the personal fields null, followed by the subject's pseudonym and the
        sealed personal fields (see audit_keys.py)."""
        # The same keys in the same order as body() (a test holds them equal), written out: a
        # dataclasses.replace or a comprehension over the fields costs more than the encryption.
        return orjson.dumps({
            "method": self.method, "server": self.server, "target": self.target, "sub": None,
            "client_id": None, "tenant": None, "decision": self.decision, "reason": self.reason,
            "status": self.status, "latency_ms": self.latency_ms, "request_id": self.request_id,
            "decision_id": self.decision_id, "args_digest": None, "trace_id": self.trace_id,
            "service": self.service, "ts": self.ts,
        })[1:-1] + b',"sid":"%s","pii":"%s"}\n' % (sid, pii)

    def personal_json(self) -> bytes:
        """The personal fields (audit_keys.PERSONAL_FIELDS) as the JSON object sealing encrypts."""
        return orjson.dumps({"sub": self.sub, "client_id": self.client_id, "tenant": self.tenant,
                             "args_digest": self.args_digest})

    def body(self) -> bytes:
        """The entry's fields as the tail of a JSON object (without its ``{``, newline included)."""
        # Written out: half the cost of orjson's native dataclass serialization, whose output a
        # test holds it equal to (so a new field cannot be left out here).
        return orjson.dumps({
            "method": self.method, "server": self.server, "target": self.target, "sub": self.sub,
            "client_id": self.client_id, "tenant": self.tenant, "decision": self.decision,
            "reason": self.reason, "status": self.status, "latency_ms": self.latency_ms,
            "request_id": self.request_id, "decision_id": self.decision_id,
            "args_digest": self.args_digest, "trace_id": self.trace_id, "service": self.service,
            "ts": self.ts,
        })[1:] + b"\n"


def chain_line(body: bytes, seq: int, prev: bytes) -> bytes:
    """The line of entry ``body`` at place ``seq`` of a chain whose previous line hashes to ``prev``."""
    return _CHAIN_HEAD % (SCHEMA_VERSION, seq, prev) + body


def line_hash(line: bytes) -> bytes:
    """The chain hash of one line (``line`` without its newline): hex SHA-256, as bytes."""
    return hashlib.sha256(line).hexdigest().encode()


# --------------------------------------------------------------------------------------------
# Reading


@dataclass
class AuditFileReport:
    entries: int = 0
    torn_tail: bool = False


def iter_audit(path: str | os.PathLike[str],
               report: AuditFileReport | None = None) -> Iterator[dict[str, Any]]:
    """Yield the entries of one audit file, skipping a torn last line.

    A last line without its newline, or one that does not parse, is what a crash mid-write leaves
    and is skipped (``report.torn_tail`` says so). A bad line anywhere else raises AuditCorrupt.
    """
    report = report if report is not None else AuditFileReport()
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    # After a final newline split() leaves b""; otherwise the last element is an unterminated line.
    last_terminated = lines[-1] == b""
    body = lines[:-1] if last_terminated else lines
    for i, line in enumerate(body):
        is_last = i == len(body) - 1
        if is_last and not last_terminated:
            report.torn_tail = True
            return
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            if is_last:
                report.torn_tail = True
                return
            raise AuditCorrupt(f"{path}: line {i + 1} is not JSON: {exc}") from exc
        if not isinstance(entry, dict):
            raise AuditCorrupt(f"{path}: line {i + 1} is not a JSON object")
        report.entries += 1
        yield entry


def iter_audit_all(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Entries of the current file and its rotated predecessors, oldest first."""
    for file in audit_files(path):
        yield from iter_audit(file)


# --------------------------------------------------------------------------------------------
# Export


class AuditExporter(Protocol):
    def export(self, entries: list[dict[str, Any]]) -> None: ...
    def shutdown(self) -> None: ...


class OtlpAuditExporter:
    """Ships committed audit entries as OTLP log records (one record per entry) to a collector."""

    def __init__(self, endpoint: str, service: str, *, insecure: bool = True) -> None:
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
        from opentelemetry.sdk.resources import Resource

        self._provider = LoggerProvider(resource=Resource.create({"service.name": service}),
                                        shutdown_on_exit=False)
        self._provider.add_log_record_processor(
            BatchLogRecordProcessor(OTLPLogExporter(endpoint=endpoint, insecure=insecure)))
        self._logger = self._provider.get_logger("gateway.audit")

    def export(self, entries: list[dict[str, Any]]) -> None:
        from opentelemetry._logs import SeverityNumber

        for entry in entries:
            attributes = {f"audit.{k}": v for k, v in entry.items() if v is not None}
            self._logger.emit(body=f"{entry.get('method')} {entry.get('decision')}", event_name="mcp.audit",
                              severity_number=SeverityNumber.INFO, severity_text="INFO",
                              attributes=attributes)

    def flush(self) -> None:
        self._provider.force_flush()

    def shutdown(self) -> None:
        self._provider.shutdown()


# --------------------------------------------------------------------------------------------
# Writing


class _Closed:
    """Queue sentinel: stop after the batches before it are committed."""


_CLOSED = _Closed()
# An entry's JSON tail, or the entry itself when its personal fields are to be sealed (on the
# audit-io thread: the key store may have to read its database).
_Pending = bytes | AuditEntry
_QueueItem = tuple[_Pending, "asyncio.Future[None]"] | _Closed


class AuditWriter:
    """Append-only, group-committed, size-rotated JSON lines audit file.

    Use as ``async with AuditWriter(path) as writer: await writer.write(entry)``.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 64 * 1024 * 1024, keep: int = 10,
                 max_batch: int = 1024, max_queue: int = 10_000, timeout: float = 5.0,
                 exporter: AuditExporter | None = None, signer: CheckpointSigner | None = None,
                 checkpoint_seconds: float = 60.0, checkpoint_entries: int = 10_000,
                 keys: SubjectKeyStore | None = None, retention_days: float | None = None,
                 prune_interval: float = 3600.0, sync: str = SYNC_BATCH,
                 sync_interval: float = 0.1) -> None:
        if max_bytes <= 0 or keep < 0 or max_batch <= 0 or max_queue <= 0 or timeout <= 0:
            raise ValueError("max_bytes, max_batch, max_queue and timeout must be > 0 and keep >= 0")
        if sync not in SYNC_MODES or not 0 < sync_interval <= 60:
            raise ValueError(f"sync must be one of {SYNC_MODES} and sync_interval in (0, 60] s")
        self.sync = sync
        self.sync_interval = sync_interval
        self._dirty = False  # interval mode: bytes written since the last fsync (io thread only)
        self._flush_timer: asyncio.TimerHandle | None = None
        if checkpoint_seconds <= 0 or checkpoint_entries <= 0:
            raise ValueError("checkpoint_seconds and checkpoint_entries must be > 0")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.max_batch = max_batch
        self.timeout = timeout
        self._exporter = exporter
        # The chain: the next entry's place and the hash of the last line written (audit_chain.py).
        self._signer = signer
        self._keys = keys  # None: personal fields in clear; else sealed per subject (audit_keys.py)
        # Retention (audit_retention.py): expired rotated files go at most every prune_interval.
        self.retention_days = retention_days
        self.prune_interval = prune_interval
        self._pruned_at = -float("inf")
        self._notes: list[_Pending] = []  # entries the writer adds itself (removals), next batch
        self.checkpoint_seconds = checkpoint_seconds
        self.checkpoint_entries = checkpoint_entries
        self.checkpoint_path = self.path.with_name(self.path.name + CHECKPOINT_SUFFIX)
        self._seq = 0
        self._prev = GENESIS.encode()
        self._cp_fd = -1
        self._cp_seq = -1  # the seq the last checkpoint covers
        self._cp_time = 0.0
        self._queue: asyncio.Queue[_QueueItem] = asyncio.Queue(maxsize=max_queue)
        # (deadline, future) of each queued or committing entry, oldest first, and the one timer
        # that fails those past their deadline (one timer per writer, not one per entry).
        self._deadlines: deque[tuple[float, asyncio.Future[None]]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        # One thread owns the file descriptor: writes, fsyncs and renames never run concurrently.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-io")
        self._fd = -1
        self._lock_fd = -1
        self._size = 0
        self._task: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self._closing = False

    async def __aenter__(self) -> AuditWriter:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (or create) the file, drop a torn tail left by a crash, start committing."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._io, self._open)
        self._task = asyncio.create_task(self._run(), name=f"audit-writer:{self.path}")

    async def close(self) -> None:
        """Commit everything queued, then close the file. Later writes raise AuditUnavailable."""
        if self._closing:
            return
        self._closing = True
        if self._task is not None:
            await self._queue.put(_CLOSED)
            await self._task
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._flush_timer is not None:
            self._flush_timer.cancel()  # _close_files fsyncs what is left
            self._flush_timer = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._io, self._close_files)
        self._io.shutdown(wait=True)
        if self._exporter is not None:
            # Shutdown flushes synchronously over the network; keep the event loop free meanwhile.
            await asyncio.to_thread(self._exporter.shutdown)

    # -- the API services call ---------------------------------------------------------------

    async def write(self, entry: AuditEntry) -> None:
        """Return once ``entry`` is on disk; raise AuditUnavailable if it cannot be within timeout."""
        # A dead committer (an unexpected bug) must fail fast, not make every caller wait out the timeout.
        if self._failed is not None or self._closing or self._task is None or self._task.done():
            metrics.AUDIT_ENTRIES.labels("rejected").inc()
            raise AuditUnavailable("audit trail unavailable")
        line: _Pending = entry.body() if self._keys is None or entry.sub is None else entry
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        try:
            self._queue.put_nowait((line, done))
        except asyncio.QueueFull:
            await self._write_with_backpressure(line, done)
            return
        # The usual case, once per audited request: no timer of its own (arming and cancelling one
        # per entry cost more than the hash chain); the writer's watchdog fails the future once its
        # deadline passes, and the committer skips futures that are already done.
        deadline = loop.time() + self.timeout
        self._deadlines.append((deadline, done))
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._expire_late)
        await done

    def _expire_late(self) -> None:
        """Fail the entries past their deadline (oldest first); re-arm for the next one."""
        self._watchdog = None
        deadlines = self._deadlines
        now = asyncio.get_running_loop().time()
        while deadlines:
            deadline, done = deadlines[0]
            if not done.done():
                if deadline > now:
                    self._watchdog = asyncio.get_running_loop().call_at(deadline, self._expire_late)
                    return
                self._reject_late()
                done.set_exception(AuditUnavailable("audit trail did not commit in time"))
            deadlines.popleft()

    def _forget_settled(self) -> None:
        """Drop settled entries from the front of the deadlines (they settle oldest first)."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].done():
            deadlines.popleft()

    def _reject_late(self) -> None:
        metrics.AUDIT_ENTRIES.labels("rejected").inc()
        logger.error("audit entry not committed within %.1fs", self.timeout)

    async def _write_with_backpressure(self, line: _Pending, done: asyncio.Future[None]) -> None:
        """A full queue: wait for room and the commit, both within the timeout."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._queue.put((line, done))
                # shield: a caller timing out must not cancel the future the committer resolves.
                await asyncio.shield(done)
        except TimeoutError:
            self._reject_late()
            raise AuditUnavailable("audit trail did not commit in time") from None

    # -- committer ---------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            batch: list[tuple[_Pending, asyncio.Future[None]]] = []
            item = await self._queue.get()
            # Whatever queued up while the previous fsync ran goes into this one: group commit.
            while True:
                if isinstance(item, _Closed):
                    stop = True
                    break
                batch.append(item)
                if len(batch) >= self.max_batch or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if not batch:
                continue
            if self._failed is not None:
                self._settle(batch, self._failed)
                self._forget_settled()
                continue
            started = time.perf_counter()
            try:
                lines = await loop.run_in_executor(self._io, self._append, [e for e, _ in batch])
            except (KeyStoreError, sqlite3.Error) as exc:
                # Nothing of the batch was written (sealing precedes the write): the chain is intact.
                metrics.AUDIT_ENTRIES.labels("failed").inc(len(batch))
                logger.error("audit key store failed: %s", exc)
                self._settle(batch, exc)
                self._forget_settled()
                continue
            except OSError as exc:
                self._failed = exc
                metrics.AUDIT_ENTRIES.labels("failed").inc(len(batch))
                logger.error("audit write failed, refusing further entries: %s", exc)
                self._settle(batch, exc)
                self._forget_settled()
                continue
            metrics.AUDIT_COMMIT_LATENCY.observe(time.perf_counter() - started)
            metrics.AUDIT_ENTRIES.labels("written").inc(len(batch))
            self._settle(batch, None)
            self._forget_settled()
            if self.sync == SYNC_INTERVAL and self._flush_timer is None:
                self._flush_timer = loop.call_later(self.sync_interval, self._flush_soon)
            if self._exporter is not None:
                self._export(lines)

    def _flush_soon(self) -> None:
        """Interval mode: fsync what the batches since the last one wrote, on the io thread (after
        any batch already running there). A failed fsync fails the writer closed, as a failed
        write does: the kernel may have dropped those pages."""
        self._flush_timer = None
        if self._failed is not None or self._closing:
            return
        future = asyncio.get_running_loop().run_in_executor(self._io, self._flush)

        def done(fut: asyncio.Future[None]) -> None:
            if fut.cancelled():
                return
            exc = fut.exception()
            if exc is not None and self._failed is None:
                self._failed = exc
                logger.error("audit fsync failed, refusing further entries: %s", exc)

        future.add_done_callback(done)

    def _flush(self) -> None:
        if self._dirty and self._fd >= 0:
            self._sync(self._fd)
            self._dirty = False

    @staticmethod
    def _settle(batch: list[tuple[_Pending, asyncio.Future[None]]], exc: BaseException | None) -> None:
        for _, fut in batch:
            if fut.done():
                continue
            if exc is None:
                fut.set_result(None)
            else:
                error = AuditUnavailable("audit write failed")
                error.__cause__ = exc
                fut.set_exception(error)
                # The caller may have timed out already; don't let asyncio warn about an unseen error.
                fut.exception()

    def _export(self, lines: list[bytes]) -> None:
        assert self._exporter is not None
        try:
            self._exporter.export([orjson.loads(line) for line in lines])
        except (OSError, RuntimeError, ValueError) as exc:
            # The file already holds the entries; a SIEM outage must not stop the gateway.
            logger.warning("audit export failed: %s", exc)

    # -- file operations (audit-io thread only) ------------------------------------------------

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise AuditUnavailable(f"audit file {self.path} is in use by another writer") from None
        self._open_current()
        self._size = _drop_torn_tail(self.path, self._fd, self._size)
        self._cp_fd = os.open(self.checkpoint_path,
                              os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _drop_torn_tail(self.checkpoint_path, self._cp_fd, os.fstat(self._cp_fd).st_size)
        self._resume_chain()
        self._cp_time = time.monotonic()

    def _resume_chain(self) -> None:
        """Continue the chain from the last line of the current file, else of the newest rotated one."""
        for candidate in (self.path, Path(f"{self.path}.1")):
            last = last_line(candidate)
            if last is None:
                continue
            self._prev = line_hash(last)
            try:
                self._seq = int(orjson.loads(last).get("seq", -1)) + 1
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                self._seq = 0
            self._cp_seq = self._seq - 1
            return
        anchor = read_anchor(self.path)  # every file removed: continue after the last one removed
        if anchor is not None and isinstance(anchor.get("seq"), int) and isinstance(anchor.get("hash"), str):
            self._seq, self._prev = anchor["seq"] + 1, anchor["hash"].encode()
            self._cp_seq = self._seq - 1

    def _open_current(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size
        self._fsync_dir()

    def _bodies(self, entries: list[_Pending]) -> list[bytes]:
        """The entries' JSON tails, personal fields sealed under their subjects' keys."""
        # write() queued bytes, or an AuditEntry with a subject when there are keys to seal it with.
        if self._keys is None:
            return entries  # type: ignore[return-value]  # nothing to seal: all bytes
        subjects = {e.sub for e in entries if isinstance(e, AuditEntry) and e.sub is not None}
        if not subjects:
            return entries  # type: ignore[return-value]
        # One key store round per batch (erasures seen, new subjects' keys, nonces), none per entry.
        with self._keys.sealing(subjects) as seal:
            return [entry if isinstance(entry, bytes)
                    else entry.sealed_body(*seal(entry.sub, entry.personal_json()))  # type: ignore[arg-type]
                    for entry in entries]

    def _append(self, entries: list[_Pending]) -> list[bytes]:
        """Seal, chain, write and fsync one batch; return its lines."""
        lines = []
        seq, prev = self._seq, self._prev
        if self._notes:
            entries, self._notes = self._notes + entries, []
        for body in self._bodies(entries):
            line = _CHAIN_HEAD % (SCHEMA_VERSION, seq, prev) + body
            prev = hashlib.sha256(line[:-1]).hexdigest().encode()
            seq += 1
            lines.append(line)
        data = b"".join(lines)
        if self._size > 0 and self._size + len(data) > self.max_bytes:
            self._rotate()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self.sync == SYNC_BATCH:
            self._sync(self._fd)
        else:
            self._dirty = True  # fsync'ed by _flush within sync_interval (or before a checkpoint)
        self._size += len(data)
        # Only a committed batch advances the chain: after a failed write nothing is appended again.
        self._seq, self._prev = seq, prev
        if (self._seq - 1 - self._cp_seq >= self.checkpoint_entries
                or time.monotonic() - self._cp_time >= self.checkpoint_seconds):
            self._checkpoint()
        if self.retention_days is not None and time.monotonic() - self._pruned_at >= self.prune_interval:
            self._prune()
        return lines

    def _prune(self) -> None:
        """Remove expired rotated files; the removal is the first entry of the next batch."""
        self._pruned_at = time.monotonic()
        assert self.retention_days is not None
        try:
            removed = prune_chain(self.path, self.retention_days, self._signer, max_files=PRUNE_MAX_FILES)
        except (OSError, ValueError) as exc:  # e.g. an unreadable holds file: keep all, retry later
            logger.error("audit retention: pruning %s failed: %s", self.path, exc)
            return
        if removed:
            names = ",".join(p.name for p, _ in removed)
            logger.info("audit retention: removed %s", names)
            note = retention_entry(self.path.name, names, removed[-1][1], self.retention_days)
            self._notes.append(note.body())

    def _checkpoint(self) -> None:
        """Append a (signed) checkpoint naming the last committed entry's place and hash."""
        if self._seq == 0 or self._seq - 1 == self._cp_seq or self._cp_fd < 0:
            return
        # A checkpoint never names an entry that is not durable yet (interval mode).
        self._flush()
        line = checkpoint_line(self.path.name, self._seq - 1, self._prev.decode(), self._signer)
        os.write(self._cp_fd, line)
        self._sync(self._cp_fd)
        self._cp_seq = self._seq - 1
        self._cp_time = time.monotonic()

    def _sync(self, fd: int) -> None:
        """fsync ``fd``; a seam for fault-injection tests (stuck or failing disks)."""
        os.fsync(fd)

    def _rotate(self) -> None:
        self._flush()  # the file leaving the chain's head is durable before it is renamed
        os.close(self._fd)
        self._fd = -1
        base = str(self.path)
        if self.keep == 0:
            last = last_line(self.path)
            if last is not None:
                write_anchor(self.path, last, self._signer)
            os.unlink(base)
        else:
            oldest = Path(f"{base}.{self.keep}")
            last = last_line(oldest)
            if last is not None:
                # The chain now starts after the oldest file's last entry: say so, signed, first.
                write_anchor(self.path, last, self._signer)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(oldest)
            for n in range(self.keep - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(f"{base}.{n}", f"{base}.{n + 1}")
            os.rename(base, f"{base}.1")
        # _open_current fsyncs the directory, making the renames and the new file durable together.
        self._open_current()

    def _fsync_dir(self) -> None:
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        except OSError as exc:
            # Some filesystems cannot fsync a directory; the data fsync still holds.
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
                raise
        finally:
            os.close(dir_fd)

    def _close_files(self) -> None:
        if self._fd >= 0:
            if self._failed is None:
                os.fsync(self._fd)
                self._checkpoint()
            os.close(self._fd)
            self._fd = -1
        if self._cp_fd >= 0:
            os.close(self._cp_fd)
            self._cp_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


# Fields of an entry a policy may have left out of the trail (obligation ``audit_redact``).
REDACTABLE_FIELDS = ("sub", "client_id", "tenant", "target", "args_digest")


def redact_entry(entry: AuditEntry, fields: Any) -> AuditEntry:
    """``entry`` with the fields the policy named (``audit_redact``: a list of
    REDACTABLE_FIELDS) set to REDACTED (``args_digest``, ``sub``...: null). Anything else than
    such a list redacts them all: a policy's mistake must not put more in the trail."""
    if isinstance(fields, list | tuple) and all(f in REDACTABLE_FIELDS for f in fields):
        names = tuple(fields)
    else:
        logger.warning("obligation audit_redact must be a list of %s; redacting all of them",
                       ", ".join(REDACTABLE_FIELDS))
        names = REDACTABLE_FIELDS
    if not names:
        return entry
    # sub/client_id/tenant/args_digest become null (nothing to seal or index); target a marker.
    changes: dict[str, Any] = {name: (REDACTED if name == "target" else None) for name in names}
    return replace(entry, **changes)


def retention_entry(chain: str, names: str, last_seq: int, days: float) -> AuditEntry:
    """The audit entry recording that retention removed files ``names`` of ``chain``."""
    return AuditEntry(method="audit/prune", server="audit", target=chain, sub=None, client_id=None,
                      tenant=None, decision="allow", reason=f"retention {days:g} days: removed {names} "
                      f"(entries up to seq {last_seq})", status="ok", latency_ms=None, request_id=None,
                      decision_id=None)


def _drop_torn_tail(path: Path, fd: int, size: int) -> int:
    """Truncate an unterminated last line of ``path`` (open as ``fd``); return the new size.

    A line without its newline was never acknowledged (its fsync did not finish), so it can go;
    appending after it would glue the next entry onto it and corrupt both.
    """
    if size == 0:
        return 0
    with open(path, "rb") as f:
        pos = size
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        else:
            keep = 0
    if keep != size:
        logger.warning("audit file %s: dropping %d bytes of torn tail", path, size - keep)
        os.ftruncate(fd, keep)
        os.fsync(fd)
    return keep


def entries_by_request_id(entries: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Index entries by request id (handy for verification and tests)."""
    return {e["request_id"]: e for e in entries if e.get("request_id")}
