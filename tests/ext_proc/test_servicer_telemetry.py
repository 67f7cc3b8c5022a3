"""The servicer's log fields and spans: per-stream ids on every JSON log line, one span per stream
joined to Envoy's trace, and nothing shared between streams."""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from ext_proc.app import Service, start_service
from ext_proc.servicer import SPAN_NAME, ExternalProcessorServicer
from gateway.catalog import Catalog
from gateway.telemetry import configure_logging
from gateway.telemetry.logs import bound_fields
from tests.ext_proc.conftest import (
    EMAIL,
    TOOLS,
    StandinPolicy,
    caller,
    jsonrpc_result,
    make_servicer,
    make_settings,
    response_body,
    response_headers,
    run,
    sse_event,
    tool_result,
    with_attributes,
)
from tests.gateway.telemetry.otlp_receiver import OtlpReceiver

WAIT = 10.0  # bound on every RPC and export wait


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Every log record of the process as JSON lines into a buffer, DEBUG and up."""
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging("ext_proc", "DEBUG", stream=stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def events(stream: io.StringIO, logger: str = "ext_proc.servicer") -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    return [e for e in lines if e["logger"] == logger]


def traceparent(trace_id: str, span_id: str) -> str:
    return f"00-{trace_id}-{span_id}-01"


STREAM_IDS = {"request_id": "r-1", "decision_id": "d-1", "sub": "alice", "tenant": "acme",
              "server": "files", "method": "tools/call", "tool": "read_file"}


async def test_log_lines_carry_the_stream_ids(policy: StandinPolicy, log_stream: io.StringIO) -> None:
    """A processed stream's log lines carry request, decision, caller, server, method and tool."""
    body = jsonrpc_result(tool_result(f"mail {EMAIL}"))
    await run(make_servicer(policy), response_headers(meta=caller()), response_body(body))
    (event,) = events(log_stream)
    assert event["message"].startswith("stream ended: masked")
    assert {k: event.get(k) for k in STREAM_IDS} == STREAM_IDS
    assert "trace_id" not in event  # no traceparent and tracing off: no span at all
    assert dict(bound_fields()) == {}


async def test_withheld_answer_is_logged_with_the_ids(policy: StandinPolicy,
                                                      log_stream: io.StringIO) -> None:
    """The fail-closed warning of a withheld answer carries the stream's ids."""
    out = await run(make_servicer(policy), response_headers("text/html", meta=caller()))
    assert out[-1].WhichOneof("response") == "immediate_response"
    warning = next(e for e in events(log_stream) if e["level"] == "WARNING")
    assert warning["message"].startswith("response withheld: unsupported_content")
    assert {k: warning.get(k) for k in STREAM_IDS} == STREAM_IDS


async def test_request_id_from_attributes_without_metadata(policy: StandinPolicy,
                                                           log_stream: io.StringIO) -> None:
    """Without ext_authz metadata the request id Envoy sends as a response attribute still tags
    the lines."""
    req = with_attributes(response_headers(meta=None), request_id="hdr-7")
    out = await run(make_servicer(policy), req)
    assert out[-1].WhichOneof("response") == "immediate_response"
    for event in events(log_stream):
        assert event["request_id"] == "hdr-7" and "decision_id" not in event


async def test_interleaved_streams_in_one_task_do_not_leak(policy: StandinPolicy,
                                                           log_stream: io.StringIO) -> None:
    """Two streams driven alternately from one task: each line has only its own stream's ids and
    nothing stays bound between messages."""
    servicer = make_servicer(policy)
    ids = {"a": ("r-a", "d-a"), "b": ("r-b", "d-b")}
    queues: dict[str, asyncio.Queue[pb.ProcessingRequest]] = {k: asyncio.Queue() for k in ids}

    async def feed(q: asyncio.Queue[pb.ProcessingRequest]) -> AsyncIterator[pb.ProcessingRequest]:
        while True:
            yield await q.get()

    # process is an async generator; aclose() ends the two streams the test keeps open.
    streams = {k: servicer.process(feed(q), None) for k, q in queues.items()}
    # The unterminated last SSE event makes each stream log a warning while handling its body.
    tail = sse_event(jsonrpc_result(tool_result("x"))) + b"data: {"
    for i in range(2):
        for key, (rid, did) in ids.items():
            step = (response_headers("text/event-stream", meta=caller(request_id=rid, decision_id=did)),
                    response_body(tail))[i]
            queues[key].put_nowait(step)
            async with asyncio.timeout(WAIT):  # not wait_for: its own task would hide a leak
                resp = await anext(streams[key])
            assert resp.WhichOneof("response") != "immediate_response"
            assert dict(bound_fields()) == {}
            logging.getLogger("ext_proc.servicer").info("between messages")
    for stream in streams.values():
        await stream.aclose()
    lines = events(log_stream)
    between = [e for e in lines if e["message"] == "between messages"]
    assert len(between) == 4 and all("request_id" not in e for e in between)
    dropped = [e for e in lines if e["message"].startswith("dropped an unterminated")]
    assert sorted((e["request_id"], e["decision_id"]) for e in dropped) == sorted(ids.values())
    for e in dropped:
        assert e["message"].endswith(f"(decision {e['decision_id']})")


@pytest.fixture
async def traced(policy: StandinPolicy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                 ) -> AsyncIterator[tuple[Service, OtlpReceiver]]:
    """A real ext_proc server exporting spans to a real OTLP receiver (batches every 50 ms)."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    receiver = OtlpReceiver()
    await receiver.start()
    catalog = Catalog(tmp_path / "catalog.sqlite")
    catalog.refresh("files", TOOLS)
    try:
        svc = await start_service(make_settings(otlp_endpoint=f"http://{receiver.endpoint}"),
                                  policy, catalog=catalog)
        try:
            yield svc, receiver
        finally:
            await svc.stop(grace=None)
    finally:
        await receiver.stop()


def ours(receiver: OtlpReceiver, trace_id: str) -> list[Span]:
    return [s for service, s in receiver.spans
            if service == "ext_proc" and s.name == SPAN_NAME and s.trace_id.hex() == trace_id]


def attributes(span: Span) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        result[a.key] = getattr(a.value, kind) if kind else None
    return result


async def exchange(channel: grpc.aio.Channel, requests: list[pb.ProcessingRequest],
                   metadata: tuple[tuple[str, str], ...] = ()) -> list[pb.ProcessingResponse]:
    call = pb_grpc.ExternalProcessorStub(channel).Process(timeout=WAIT, metadata=metadata)
    answers = []
    for req in requests:
        await call.write(req)
        answers.append(await call.read())
        if answers[-1].WhichOneof("response") == "immediate_response":
            break
    await call.done_writing()
    return answers


async def test_span_joins_envoys_trace(traced: tuple[Service, OtlpReceiver]) -> None:
    """The stream's span is a SERVER child of the traceparent in the gRPC metadata (Envoy's span),
    not of the client's one (a response attribute), with method, tool and the masked count."""
    svc, receiver = traced
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    client_trace = secrets.token_hex(16)
    headers = with_attributes(response_headers(meta=caller()),
                              traceparent=traceparent(client_trace, secrets.token_hex(8)))
    body = jsonrpc_result(tool_result(f"mail {EMAIL} and {EMAIL}"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        answers = await exchange(channel, [headers, response_body(body)],
                                 metadata=(("traceparent", traceparent(trace_id, parent)),))
    assert answers[-1].WhichOneof("response") == "response_body"
    await receiver.wait_for(lambda: bool(ours(receiver, trace_id)), timeout=WAIT)
    (span,) = ours(receiver, trace_id)
    assert span.kind == Span.SPAN_KIND_SERVER and span.parent_span_id.hex() == parent
    attrs = attributes(span)
    assert attrs["mcp.method"] == "tools/call" and attrs["mcp.tool"] == "read_file"
    assert attrs["decision.id"] == "d-1" and attrs["ext_proc.outcome"] == "masked"
    assert attrs["ext_proc.masked_values"] == 4  # two in the text, two in structuredContent
    assert not ours(receiver, client_trace)


async def test_span_falls_back_to_the_clients_traceparent(traced: tuple[Service, OtlpReceiver]) -> None:
    """Without trace context in the gRPC metadata the request's traceparent (a response attribute)
    is the parent;
    a filtered list reports how many items were removed."""
    svc, receiver = traced
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    headers = with_attributes(response_headers(meta=caller(mcp_method="tools/list", tool=None)),
                              traceparent=traceparent(trace_id, parent))
    body = jsonrpc_result({"tools": TOOLS})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        await exchange(channel, [headers, response_body(body)])
    await receiver.wait_for(lambda: bool(ours(receiver, trace_id)), timeout=WAIT)
    (span,) = ours(receiver, trace_id)
    assert span.parent_span_id.hex() == parent
    attrs = attributes(span)
    assert attrs["mcp.method"] == "tools/list" and attrs["ext_proc.outcome"] == "filtered"
    assert attrs["ext_proc.filtered_items"] == 1  # write_file is not in the stand-in's allow list


async def test_withheld_and_cancelled_streams_end_their_spans(
        traced: tuple[Service, OtlpReceiver]) -> None:
    """A fail-closed stream's span has error status and the code; a stream the client resets
    mid-way still ends its span (outcome cancelled)."""
    svc, receiver = traced
    failed, cancelled = secrets.token_hex(16), secrets.token_hex(16)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        await exchange(channel, [response_headers("text/html", meta=caller())],
                       metadata=(("traceparent", traceparent(failed, secrets.token_hex(8))),))
        call = pb_grpc.ExternalProcessorStub(channel).Process(
            timeout=WAIT, metadata=(("traceparent", traceparent(cancelled, secrets.token_hex(8))),))
        await call.write(response_headers("text/event-stream", meta=caller()))
        await call.read()
        call.cancel()
        await receiver.wait_for(lambda: bool(ours(receiver, failed) and ours(receiver, cancelled)),
                                timeout=WAIT)
    (span,) = ours(receiver, failed)
    assert span.status.code == Status.STATUS_CODE_ERROR
    assert attributes(span)["error.type"] == "unsupported_content"
    assert attributes(span)["ext_proc.outcome"] == "withheld"
    (span,) = ours(receiver, cancelled)
    assert attributes(span)["ext_proc.outcome"] == "cancelled"


async def test_concurrent_wire_streams_keep_their_ids(policy: StandinPolicy,
                                                      log_stream: io.StringIO) -> None:
    """Two concurrent gRPC streams with tracing off: each line carries its own request, decision
    and trace ids (the trace id from the call's metadata, without exporting anything)."""
    svc = await start_service(make_settings(), policy)
    streams = {f"r-{i}": (f"d-{i}", secrets.token_hex(16)) for i in range(2)}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            # The response headers fail closed, so each stream logs a warning.
            await asyncio.gather(*(
                exchange(channel, [response_headers("text/html",
                                                    meta=caller(request_id=rid, decision_id=did))],
                         metadata=(("traceparent", traceparent(tid, secrets.token_hex(8))),))
                for rid, (did, tid) in streams.items()))
    finally:
        await svc.stop(grace=None)
    warnings = [e for e in events(log_stream) if e["level"] == "WARNING"]
    assert sorted((e["request_id"], e["decision_id"], e["trace_id"]) for e in warnings) == \
        sorted((rid, did, tid) for rid, (did, tid) in streams.items())


def test_no_span_without_tracing_or_context(policy: StandinPolicy) -> None:
    """Tracing off and no trace context: no span is started (no per-stream cost)."""
    servicer: ExternalProcessorServicer = make_servicer(policy)
    assert servicer._start_span({}) is None


def _sample(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_streams_failures_and_body_time_are_counted(policy: StandinPolicy) -> None:
    """ext_proc's own metrics: a stream by its outcome, a withheld answer by its error code, and
    the time spent on each response body."""
    masked_before = _sample("mcp_gateway_ext_proc_streams_total", outcome="masked")
    withheld_before = _sample("mcp_gateway_ext_proc_streams_total", outcome="withheld")
    failures_before = _sample("mcp_gateway_ext_proc_failures_total", code="unsupported_content")
    bodies_before = _sample("mcp_gateway_ext_proc_body_duration_seconds_count")

    body = jsonrpc_result(tool_result(f"mail {EMAIL}"))
    await run(make_servicer(policy), response_headers(meta=caller()), response_body(body))
    await run(make_servicer(policy), response_headers("text/html", meta=caller()))

    assert _sample("mcp_gateway_ext_proc_streams_total", outcome="masked") == masked_before + 1
    assert _sample("mcp_gateway_ext_proc_streams_total", outcome="withheld") == withheld_before + 1
    assert _sample("mcp_gateway_ext_proc_failures_total", code="unsupported_content") == \
        failures_before + 1
    assert _sample("mcp_gateway_ext_proc_body_duration_seconds_count") == bodies_before + 1
