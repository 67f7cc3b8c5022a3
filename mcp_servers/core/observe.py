"""What the core records about each executed request: tool-call metrics and the audit trail.

The gateway's ext_authz audits the decision (who, what, allowed or not) before it forwards a
request; the server that executes a ``tools/call``, ``resources/read`` or ``prompts/get`` records
the result here. The entry is committed (group commit, fsync) before the answer is released, so a
SIGKILL never loses the entry of an answer a client has seen; when the trail cannot take it, the
client gets an error instead of the result (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from gateway.telemetry.audit import (
    AUDITED_METHODS,
    AuditEntry,
    AuditUnavailable,
    AuditWriter,
    args_digest,
    redact_entry,
)
from gateway.telemetry.logs import current_trace_ids
from gateway.telemetry.metrics import record_tool_call
from mcp_servers.core.context import ToolContext

logger = logging.getLogger(__name__)

OK = "ok"
IS_ERROR = "is_error"
CANCELLED = "cancelled"
# Bounds the wait for audit entries of cancelled calls at shutdown (each write has its own timeout).
_PENDING_GRACE = 10.0


def metric_outcome(status: str) -> str:
    """The ``outcome`` label of a tools/call: ok, is_error, cancelled, or error for any error code."""
    return status if status in (OK, IS_ERROR, CANCELLED) else "error"


def _target(method: str, params: dict[str, Any]) -> str | None:
    value = params.get("uri" if method == "resources/read" else "name")
    return value if isinstance(value, str) else None


def _digest(method: str, params: dict[str, Any]) -> str | None:
    # The same input as ext_authz's digest, so a SIEM can join the decision and the result.
    arguments = params.get("arguments")
    if method == "tools/call":
        return args_digest(arguments if isinstance(arguments, dict) else {})
    if method == "prompts/get" and arguments is not None:
        return args_digest(arguments)
    return None


class CallRecorder:
    """Per-app recorder; ``audit`` is set while the app runs with an audit file."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.audit: AuditWriter | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def entry(self, method: str, params: dict[str, Any], ctx: ToolContext, status: str,
              latency_s: float) -> AuditEntry:
        entry = self._entry(method, params, ctx, status, latency_s)
        # The policy's audit_redact obligation, signed into the caller assertion by ext_authz.
        return entry if ctx.audit_redact is None else redact_entry(entry, ctx.audit_redact)

    def _entry(self, method: str, params: dict[str, Any], ctx: ToolContext, status: str,
               latency_s: float) -> AuditEntry:
        return AuditEntry(
            method=method, server=self.server, target=_target(method, params), sub=ctx.user,
            client_id=ctx.client_id, tenant=ctx.tenant,
            # Only the gateway decides; a request without its decision id did not pass through it.
            decision="allow" if ctx.decision_id else "unknown", reason=None, status=status,
            latency_ms=round(latency_s * 1000, 3), request_id=ctx.http_request_id,
            decision_id=ctx.decision_id, args_digest=_digest(method, params),
            trace_id=current_trace_ids()[0], service=self.server)

    async def finish(self, method: str, params: dict[str, Any], ctx: ToolContext, status: str,
                     latency_s: float) -> None:
        """Count and audit one answered request; return only once its audit entry is on disk.

        Raises AuditUnavailable when the entry cannot be committed: the caller must not answer
        with the result then.
        """
        if method == "tools/call":
            record_tool_call(self.server, _target(method, params) or "", metric_outcome(status))
        logger.debug("%s %s: %s in %.1f ms", method, _target(method, params), status, latency_s * 1000)
        if self.audit is None or method not in AUDITED_METHODS:
            return
        await self.audit.write(self.entry(method, params, ctx, status, latency_s))

    def cancelled(self, method: str, params: dict[str, Any], ctx: ToolContext, latency_s: float) -> None:
        """Record a call that was cancelled mid-way: no answer waits for it, so do not block."""
        if method == "tools/call":
            record_tool_call(self.server, _target(method, params) or "", CANCELLED)
        if self.audit is None or method not in AUDITED_METHODS:
            return
        task = asyncio.create_task(self._write_quietly(self.entry(method, params, ctx, CANCELLED, latency_s)))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write_quietly(self, entry: AuditEntry) -> None:
        assert self.audit is not None
        try:
            await self.audit.write(entry)
        except AuditUnavailable as exc:
            logger.error("audit entry of a cancelled %s not written: %s", entry.method, exc.message)

    async def run_audit(self, writer: AuditWriter) -> AsyncIterator[None]:
        """App lifespan: open the audit file before the first request, close it after the last."""
        await writer.start()
        self.audit = writer
        logger.info("audit trail: %s", writer.path)
        try:
            yield
        finally:
            if self._pending:
                await asyncio.wait(set(self._pending), timeout=_PENDING_GRACE)
            # self.audit stays set: a straggler's write now fails (closed), it never goes unaudited.
            await writer.close()
