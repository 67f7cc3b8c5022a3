"""Tracing: W3C propagation and export to a real OTLP/gRPC receiver."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry import trace

from gateway.telemetry import tracing
from gateway.telemetry.logs import current_trace_ids
from tests.gateway.telemetry.otlp_receiver import OtlpReceiver

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"


@pytest.fixture(autouse=True)
def _no_tracing_left_on() -> Iterator[None]:
    yield
    tracing.shutdown_tracing()


def test_setup_without_endpoint_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no endpoint nothing is exported, yet the caller's trace id is adopted for logs."""
    for name in tracing.ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert tracing.setup_tracing("svc", None) is False
    with tracing.start_server_span("check", {"Traceparent": TRACEPARENT}) as span:
        assert not span.is_recording()
        assert current_trace_ids() == (TRACE_ID, PARENT_SPAN_ID)
    assert current_trace_ids() == (None, None)


def test_extract_context_ignores_malformed_traceparent() -> None:
    """A malformed traceparent yields no parent, so the span starts a new trace."""
    ctx = tracing.extract_context([("traceparent", "00-zz-yy-01")])
    assert not trace.get_current_span(ctx).get_span_context().is_valid


def test_inject_headers_round_trips_through_extract() -> None:
    """inject_headers writes the current span's traceparent, which extract_context reads back."""
    with tracing.start_server_span("outer", {"traceparent": TRACEPARENT}):
        headers: dict[str, str] = {}
        tracing.inject_headers(headers)
    assert headers["traceparent"].split("-")[1] == TRACE_ID
    ctx = trace.get_current_span(tracing.extract_context(headers)).get_span_context()
    assert format(ctx.trace_id, "032x") == TRACE_ID


async def test_server_span_exported_with_parent_from_traceparent(otlp_receiver: OtlpReceiver) -> None:
    """Spans reach a real OTLP receiver as children of the trace named by the incoming traceparent."""
    assert tracing.setup_tracing("ext_authz-test", otlp_receiver.endpoint) is True
    with tracing.start_server_span("ext_authz.check", {"traceparent": TRACEPARENT},
                                   attributes={"mcp.method": "tools/call"}):
        with tracing.get_tracer("test").start_as_current_span("policy.eval"):
            pass
    # force_flush blocks on the exporter, which needs this loop to run the receiver.
    await asyncio.to_thread(tracing.shutdown_tracing)
    await otlp_receiver.wait_for(lambda: len(otlp_receiver.spans) >= 2)

    by_name = {span.name: (service, span) for service, span in otlp_receiver.spans}
    service, server_span = by_name["ext_authz.check"]
    assert service == "ext_authz-test"
    assert server_span.trace_id.hex() == TRACE_ID
    assert server_span.parent_span_id.hex() == PARENT_SPAN_ID
    assert server_span.kind == server_span.SPAN_KIND_SERVER
    _, child = by_name["policy.eval"]
    assert child.trace_id.hex() == TRACE_ID and child.parent_span_id == server_span.span_id


async def test_error_in_server_span_is_recorded(otlp_receiver: OtlpReceiver) -> None:
    """An exception leaving the span marks it as an error on the exported span."""
    tracing.setup_tracing("svc", otlp_receiver.endpoint)
    with pytest.raises(KeyError), tracing.start_server_span("boom", {}):
        raise KeyError("x")
    await asyncio.to_thread(tracing.shutdown_tracing)
    await otlp_receiver.wait_for(lambda: len(otlp_receiver.spans) >= 1)
    _, span = otlp_receiver.spans[0]
    assert span.status.code == span.status.STATUS_CODE_ERROR
    assert len(span.parent_span_id) == 0


async def test_global_api_tracer_follows_setup_and_shutdown(otlp_receiver: OtlpReceiver) -> None:
    """A tracer from the OpenTelemetry API, taken before set-up, exports after it and stops after shutdown."""
    api_tracer = trace.get_tracer("third.party")
    tracing.setup_tracing("svc", otlp_receiver.endpoint)
    with api_tracer.start_as_current_span("library.span") as span:
        assert span.is_recording()
    await asyncio.to_thread(tracing.shutdown_tracing)
    await otlp_receiver.wait_for(lambda: any(s.name == "library.span" for _, s in otlp_receiver.spans))
    with api_tracer.start_as_current_span("after.shutdown") as span:
        assert not span.is_recording()


async def test_standard_environment_variable_is_the_fallback(otlp_receiver: OtlpReceiver,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With no endpoint in the config, spans go to OTEL_EXPORTER_OTLP_ENDPOINT (what ext_authz,
    ext_proc and the servers pass when telemetry.otlp_endpoint is unset)."""
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{otlp_receiver.endpoint}")
    assert tracing.setup_tracing("ext_proc-env", None) is True
    with tracing.start_server_span("ext_proc.process", {}):
        pass
    await asyncio.to_thread(tracing.shutdown_tracing)
    await otlp_receiver.wait_for(lambda: len(otlp_receiver.spans) >= 1)
    assert otlp_receiver.spans[0][0] == "ext_proc-env"


def test_environment_endpoints_are_read_by_the_standard_rules(caplog: pytest.LogCaptureFixture) -> None:
    """The traces-only variable wins; a value that is not http(s)://host[:port] leaves tracing
    off with an error naming the variable; unset is None."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example:4317"}
    assert tracing.endpoint_from_environment(env) == "https://traces.example:4317"
    assert tracing.endpoint_from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://[::1]:4317/"}) \
        == "http://[::1]:4317/"
    assert tracing.endpoint_from_environment({}) is None
    with caplog.at_level("ERROR", logger="gateway.telemetry.tracing"):
        assert tracing.endpoint_from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}) is None
    assert "OTEL_EXPORTER_OTLP_ENDPOINT must be http(s)://host[:port]" in caplog.text


def test_the_config_endpoint_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """telemetry.otlp_endpoint, when set, is used as it is: the variable is only the fallback."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")
    assert tracing.setup_tracing("svc", "http://127.0.0.1:9") is True
