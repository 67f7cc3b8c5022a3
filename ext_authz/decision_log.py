"""One JSON line per decision on the ``mcp_gateway.decisions`` logger. Never the token."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

import orjson

LOGGER_NAME = "mcp_gateway.decisions"
logger = logging.getLogger(LOGGER_NAME)


@dataclass(slots=True)
class DecisionRecord:
    decision_id: str
    request_id: str | None
    sub: str | None
    method: str | None
    tool: str | None
    server: str | None
    allow: bool
    reason: str
    http_status: int
    latency_ms: float
    dry_run: bool = False
    policy_allow: bool | None = None  # what the policy said (differs from allow in dry-run)
    trace_id: str | None = None
    # The policy bundle that decided (the embedded engine's digest of its sources; None for a
    # remote OPA) and what the decision obliges (mask_pii...): never the token or arguments.
    policy_revision: str | None = None
    obligations: dict[str, Any] | None = None
    # Who acted for ``sub`` (the ``act`` claim of a delegation issuer's token: its sub, its iss
    # and what it says of itself, e.g. the workflow and run), None for the caller's own token.
    act: dict[str, Any] | None = None


def log_decision(record: DecisionRecord) -> None:
    if not logger.isEnabledFor(logging.INFO):
        return
    line = orjson.dumps({
        "decision_id": record.decision_id, "request_id": record.request_id, "sub": record.sub,
        "method": record.method, "tool": record.tool, "server": record.server,
        "allow": record.allow, "reason": record.reason, "http_status": record.http_status,
        "latency_ms": round(record.latency_ms, 3), "dry_run": record.dry_run,
        "policy_allow": record.policy_allow, "trace_id": record.trace_id,
        "policy_revision": record.policy_revision, "obligations": record.obligations,
        "act": record.act,
    }).decode()
    # logger.info() would walk the stack for the caller's file and line (findCaller) on every
    # request; the record's origin is always this function.
    logger.handle(logger.makeRecord(LOGGER_NAME, logging.INFO, __file__, _LINE, line, (), None,
                                    "log_decision"))


_LINE = log_decision.__code__.co_firstlineno


def configure_stdout() -> None:
    """Send decision lines to stdout as bare JSON (one per line), apart from service logs."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
