"""Structured JSON logs: one parseable event per line with request/trace/decision ids."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import orjson
import pytest

from gateway.telemetry import logs, tracing

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    root = logging.getLogger()
    old_level = root.level
    handler = logs.configure_logging("ext_authz", "DEBUG", stream=buf)
    yield buf
    root.removeHandler(handler)
    root.setLevel(old_level)


def events(buf: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in buf.getvalue().splitlines()]


def test_line_is_json_with_core_fields(stream: io.StringIO) -> None:
    """Each record is one JSON line with ts (RFC 3339 UTC), level, logger, service and message."""
    logging.getLogger("gateway.x").info("hello %s #%d", "world", 3)
    (event,) = events(stream)
    assert event["message"] == "hello world #3"
    assert event["level"] == "INFO" and event["logger"] == "gateway.x" and event["service"] == "ext_authz"
    assert event["ts"].endswith("Z")
    assert datetime.fromisoformat(event["ts"]).utcoffset() is not None
    assert "request_id" not in event and "trace_id" not in event


def test_bound_request_fields_and_trace_ids(stream: io.StringIO) -> None:
    """Inside bind_request and a server span, lines carry request_id, decision_id, trace_id, span_id."""
    log = logging.getLogger("gateway.y")
    with tracing.start_server_span("check", {"traceparent": TRACEPARENT}), \
            logs.bind_request(request_id="r-1", decision_id="d-1", tool=None):
        log.warning("denied")
    log.info("after")
    first, second = events(stream)
    assert first["request_id"] == "r-1" and first["decision_id"] == "d-1" and "tool" not in first
    assert first["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert first["span_id"] == "00f067aa0ba902b7"
    assert "request_id" not in second and "trace_id" not in second


def test_token_api_nests_and_restores(stream: io.StringIO) -> None:
    """bind/unbind stack: inner fields add to outer ones and unbinding restores the outer set."""
    outer = logs.bind(request_id="r-outer")
    inner = logs.bind(decision_id="d-inner")
    assert dict(logs.bound_fields()) == {"request_id": "r-outer", "decision_id": "d-inner"}
    logs.unbind(inner)
    assert dict(logs.bound_fields()) == {"request_id": "r-outer"}
    logs.unbind(outer)
    assert dict(logs.bound_fields()) == {}


def test_unknown_bind_field_rejected() -> None:
    """Binding a field outside the fixed schema is refused, keeping log lines predictable."""
    with pytest.raises(ValueError, match="unknown log field"):
        logs.bind(password="x")


def test_extra_fields_merged_without_overriding_core(stream: io.StringIO) -> None:
    """extra={...} fields appear in the event; they cannot replace level/service; odd values become text."""
    logging.getLogger("g").info("x", extra={"status": 403, "level": "FAKE", "service": "evil",
                                            "obj": object()})
    (event,) = events(stream)
    assert event["status"] == 403
    assert event["level"] == "INFO" and event["service"] == "ext_authz"
    assert event["obj"].startswith("<object object")


def test_exception_fields(stream: io.StringIO) -> None:
    """logger.exception records exc_type and the traceback text."""
    try:
        raise KeyError("kid")
    except KeyError:
        logging.getLogger("g").exception("jwks failed")
    (event,) = events(stream)
    assert event["level"] == "ERROR" and event["exc_type"] == "KeyError"
    assert "Traceback" in event["exc"] and "KeyError: 'kid'" in event["exc"]


def test_configure_twice_keeps_one_handler(stream: io.StringIO) -> None:
    """Re-configuring replaces the gateway handler instead of doubling every line."""
    second = io.StringIO()
    handler = logs.configure_logging("ext_proc", "INFO", stream=second)
    try:
        logging.getLogger("g").info("once")
        assert events(second)[0]["service"] == "ext_proc"
        assert stream.getvalue() == ""
    finally:
        logging.getLogger().removeHandler(handler)
