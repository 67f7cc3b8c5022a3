"""Structured JSON logging: one orjson object per line, with request/trace/decision ids.

Services call :func:`configure_logging` once at start-up and wrap each request in
:func:`bind_request`; every log line emitted while handling that request then carries its ids,
whichever module logs it. Trace and span ids come from the current OpenTelemetry span, so they are
present whenever the request arrived with a ``traceparent`` (even with exporting switched off).
"""

from __future__ import annotations

import contextvars
import logging
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, Any

import orjson
from opentelemetry import trace

# Fields a service may bind per request. Kept to a fixed set so log lines have a stable schema.
BINDABLE_FIELDS = ("request_id", "decision_id", "sub", "tenant", "client_id", "server", "method", "tool")

# Keys the formatter owns; `extra={...}` may not overwrite them (a caller-chosen "level" or "ts"
# would break log pipelines that index on them).
_CORE_KEYS = frozenset({"ts", "level", "logger", "service", "message", "exc_type", "exc"})

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

_EMPTY: Mapping[str, str] = MappingProxyType({})
_bound: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "gateway_log_fields", default=_EMPTY)


_BINDABLE = frozenset(BINDABLE_FIELDS)


def bind(**fields: str | None) -> contextvars.Token[Mapping[str, str]]:
    """Add fields to the current context's log lines; undo with :func:`unbind`.

    ``None`` values are ignored, so callers can pass optional ids without branching.
    """
    if not fields.keys() <= _BINDABLE:
        unknown = set(fields) - _BINDABLE
        raise ValueError(f"unknown log field(s): {', '.join(sorted(unknown))}")
    # Called several times per request on the hot path: one dict build, no set rebuilds.
    current = _bound.get()
    merged = {**current, **{k: v for k, v in fields.items() if v is not None}} if current else \
        {k: v for k, v in fields.items() if v is not None}
    return _bound.set(MappingProxyType(merged))


def unbind(token: contextvars.Token[Mapping[str, str]]) -> None:
    """Restore the log fields that were bound before the matching :func:`bind`."""
    _bound.reset(token)


@contextmanager
def bind_request(**fields: str | None) -> Iterator[None]:
    """Bind request fields (request_id, decision_id, ...) for the duration of a ``with`` block."""
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def bound_fields() -> Mapping[str, str]:
    """The fields currently bound in this context (read-only view)."""
    return _bound.get()


def current_trace_ids() -> tuple[str | None, str | None]:
    """(trace_id, span_id) of the current OpenTelemetry span as lowercase hex, or (None, None)."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object (no trailing newline; the handler adds it)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": _rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "service": self.service,
            "message": record.getMessage(),
        }
        event.update(_bound.get())
        trace_id, span_id = current_trace_ids()
        if trace_id is not None:
            event["trace_id"] = trace_id
            event["span_id"] = span_id
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in _CORE_KEYS:
                event[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            event["exc_type"] = record.exc_info[0].__name__
            event["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            event["exc"] = record.exc_text
        if record.stack_info:
            event["stack"] = record.stack_info
        # default=str: a stray non-JSON value in `extra` must not lose the whole line.
        return orjson.dumps(event, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class _GatewayJsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marker subclass so configure_logging can replace its own handler and nobody else's."""


def configure_logging(service: str, level: str | int = "INFO",
                      stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record of this process to ``stream`` (stderr by default) as JSON lines.

    Idempotent: calling it again replaces the handler it installed before.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _GatewayJsonHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _GatewayJsonHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
