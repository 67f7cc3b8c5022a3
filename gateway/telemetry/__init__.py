"""Telemetry building blocks every gateway service uses: JSON logs, metrics, tracing, audit.

    configure_logging("ext_authz"); setup_tracing("ext_authz", otlp_endpoint)
    with start_server_span("check", headers), bind_request(request_id=rid, decision_id=did): ...
    async with AuditWriter(path) as audit: await audit.write(AuditEntry(...))
"""

from gateway.telemetry.audit import (
    AuditEntry,
    AuditUnavailable,
    AuditWriter,
    OtlpAuditExporter,
    args_digest,
    iter_audit,
    iter_audit_all,
)
from gateway.telemetry.logs import bind, bind_request, configure_logging, current_trace_ids, unbind
from gateway.telemetry.metrics import add_metrics_route, start_metrics_server
from gateway.telemetry.tracing import (
    extract_context,
    get_tracer,
    inject_headers,
    setup_tracing,
    shutdown_tracing,
    start_server_span,
)

__all__ = [
    "AuditEntry",
    "AuditUnavailable",
    "AuditWriter",
    "OtlpAuditExporter",
    "add_metrics_route",
    "args_digest",
    "bind",
    "bind_request",
    "configure_logging",
    "current_trace_ids",
    "extract_context",
    "get_tracer",
    "inject_headers",
    "iter_audit",
    "iter_audit_all",
    "setup_tracing",
    "shutdown_tracing",
    "start_metrics_server",
    "start_server_span",
    "unbind",
]
