"""Wire tests: a real grpc.aio ext_proc server on port 0 and a real gRPC client."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from ext_proc.app import SERVICE_NAME, Service, start_service
from ext_proc.servicer import _write as servicer_write
from ext_proc.settings import Settings
from gateway.catalog import Catalog
from gateway.config import load_config
from tests.ext_proc.conftest import (
    CARD,
    EMAIL,
    TOOLS,
    StandinPolicy,
    caller,
    jsonrpc_result,
    make_servicer,
    make_settings,
    response_body,
    response_headers,
    tool_result,
)

WAIT = 10.0  # bound on every RPC wait


@pytest.fixture
async def service(policy: StandinPolicy, tmp_path: Path) -> AsyncIterator[Service]:
    catalog = Catalog(tmp_path / "catalog.sqlite")
    catalog.refresh("files", TOOLS)
    svc = await start_service(make_settings(), policy, catalog=catalog)
    try:
        yield svc
    finally:
        await svc.stop(grace=None)


@pytest.fixture
async def channel(service: Service) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        yield ch


async def test_health_is_serving(service: Service, channel: grpc.aio.Channel,
                                 policy: StandinPolicy) -> None:
    """The standard health service reports SERVING once started; the policy was started."""
    stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs omit the RPCs
    for name in ("", SERVICE_NAME):
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=WAIT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert policy.started


async def test_masking_over_the_wire(channel: grpc.aio.Channel) -> None:
    """A bidi Process stream over real gRPC masks a JSON tool result."""
    call = pb_grpc.ExternalProcessorStub(channel).Process(timeout=WAIT)
    await call.write(response_headers(meta=caller()))
    assert (await call.read()).HasField("mode_override")
    await call.write(response_body(jsonrpc_result(tool_result(f"{EMAIL} {CARD}"))))
    body = (await call.read()).response_body.response.body_mutation.body
    assert EMAIL.encode() not in body and b"4111" not in body
    assert orjson.loads(body)["result"]["content"][0]["text"] == "[REDACTED:email] [REDACTED:card]"
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF


async def test_filtering_over_the_wire(channel: grpc.aio.Channel, policy: StandinPolicy) -> None:
    """tools/list through the real server: policy and catalog filter in one pass."""
    call = pb_grpc.ExternalProcessorStub(channel).Process(timeout=WAIT)
    await call.write(response_headers(meta=caller(mcp_method="tools/list")))
    await call.read()
    await call.write(response_body(jsonrpc_result({"tools": TOOLS})))
    body = (await call.read()).response_body.response.body_mutation.body
    assert [t["name"] for t in orjson.loads(body)["result"]["tools"]] == ["read_file", "stat"]
    assert len(policy.queries) == 1
    await call.done_writing()


async def test_failure_is_an_immediate_response_then_end(channel: grpc.aio.Channel) -> None:
    """Missing metadata: an ImmediateResponse, then the server ends the stream."""
    call = pb_grpc.ExternalProcessorStub(channel).Process(timeout=WAIT)
    await call.write(response_headers(meta=None))
    resp = await call.read()
    assert resp.immediate_response.status.code == 500
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


def masked_total(port: int) -> float:
    """Sum of mcp_gateway_masked_values_total over all types, read from a /metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as reply:  # noqa: S310
        text = reply.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "mcp_gateway_masked_values_total")


async def test_metrics_endpoint_counts_masked_values(service: Service, channel: grpc.aio.Channel) -> None:
    """The service serves Prometheus /metrics on loopback; masking a result raises the masked
    values counter by the number of values masked (an email and a card, in text and structured
    content)."""
    assert service.metrics.host == "127.0.0.1" and service.metrics.port != service.port
    before = await asyncio.to_thread(masked_total, service.metrics.port)
    await test_masking_over_the_wire(channel)
    after = await asyncio.to_thread(masked_total, service.metrics.port)
    assert after == before + 4


def test_settings_from_the_default_config() -> None:
    """The embedded config yields the first ext_proc instance, the catalog in state_dir and a
    per-message budget below Envoy's timeout."""
    cfg = load_config(None)
    settings = Settings.from_config(cfg, port=0)
    assert settings.listen.port == 0 and settings.listen.host == cfg.ext_proc.instances[0].host
    assert settings.catalog_path is not None and settings.catalog_path.name == "catalog.sqlite"
    assert 0 < settings.message_timeout_seconds < cfg.ext_proc.timeout_ms / 1000
    assert settings.list_entrypoints["tools"] == "mcp/authz/visible_tools"
    assert (settings.metrics_host, settings.metrics_port_offset) == (
        cfg.telemetry.metrics_host, cfg.telemetry.metrics_port_offset)
    assert settings.otlp_endpoint == cfg.telemetry.otlp_endpoint


def test_settings_take_the_otlp_endpoint() -> None:
    """telemetry.otlp_endpoint in the config is where ext_proc exports its spans."""
    cfg = load_config(None)
    cfg = dataclasses.replace(cfg, telemetry=dataclasses.replace(
        cfg.telemetry, otlp_endpoint="http://127.0.0.1:4317"))
    assert Settings.from_config(cfg).otlp_endpoint == "http://127.0.0.1:4317"


async def test_stream_ends_once_the_answer_is_complete(channel: grpc.aio.Channel) -> None:
    """After the last body chunk is answered the server ends the stream itself (no read is left
    outstanding for Envoy's reset to cancel: grpc.aio leaks such a read's native batch)."""
    call = pb_grpc.ExternalProcessorStub(channel).Process(timeout=WAIT)
    for req in (response_headers(meta=caller()), response_body(jsonrpc_result(tool_result(EMAIL)))):
        await call.write(req)
        assert (await call.read()).WhichOneof("response") != "immediate_response"
    assert await call.read() == grpc.aio.EOF  # without done_writing: the server closed it
    assert await call.code() == grpc.StatusCode.OK


async def test_stream_ends_when_the_answer_needs_no_inspection(channel: grpc.aio.Channel) -> None:
    """A tools/call answer without masking: the stream ends with the response-headers answer."""
    call = pb_grpc.ExternalProcessorStub(channel).Process(timeout=WAIT)
    await call.write(response_headers(meta=caller(mask=[])))
    resp = await call.read()
    assert resp.WhichOneof("response") == "response_headers" and not resp.HasField("mode_override")
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_an_sse_stream_ends_after_its_last_chunk(channel: grpc.aio.Channel) -> None:
    """SSE: the stream stays open across chunks and ends once the end_of_stream chunk is answered."""
    call = pb_grpc.ExternalProcessorStub(channel).Process(timeout=WAIT)
    event = b"data: " + jsonrpc_result(tool_result(EMAIL)) + b"\n\n"
    for req in (response_headers("text/event-stream", meta=caller()),
                response_body(event, end_of_stream=False)):
        await call.write(req)
        assert (await call.read()).WhichOneof("response") != "immediate_response"
    await call.write(response_body(b"", end_of_stream=True))  # the stream was still open
    assert (await call.read()).WhichOneof("response") == "response_body"
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


class _SlowWrites:
    """The one part of a grpc.aio ServicerContext _write uses; each write waits for a gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.written: list[Any] = []

    async def write(self, message: Any) -> None:
        await self.gate.wait()
        self.written.append(message)


async def test_cancelling_the_handler_never_cancels_a_write() -> None:
    """Envoy's reset cancels the handler; the write in flight still runs to completion (a
    cancelled grpc.aio write never frees its copy of the message)."""
    ctx = _SlowWrites()
    msg = response_body(b"x")
    handler = asyncio.ensure_future(servicer_write(ctx, msg))
    await asyncio.sleep(0)  # let the write start and block on the gate
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler
    ctx.gate.set()
    async with asyncio.timeout(WAIT):
        while not ctx.written:
            await asyncio.sleep(0)
    assert ctx.written == [msg]


class _Replay:
    """The parts of a grpc.aio ServicerContext that Process uses: fixed reads, recorded writes."""

    def __init__(self, *messages: Any) -> None:
        self._messages = list(messages)
        self.written: list[Any] = []

    async def read(self) -> Any:
        return self._messages.pop(0) if self._messages else grpc.aio.EOF

    async def write(self, message: Any) -> None:
        self.written.append(message)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


async def test_process_leaves_no_generator_to_asyncio_finalizer(policy: StandinPolicy) -> None:
    """A stream that ends once its answer is complete closes its generators itself: one left
    to the garbage collector makes asyncio wake the loop and start a task per stream."""
    finalized: list[Any] = []
    firstiter, finalizer = sys.get_asyncgen_hooks()

    def record(agen: Any) -> None:
        finalized.append(agen)
        if finalizer is not None:
            finalizer(agen)

    ctx = _Replay(response_headers(meta=caller()), response_body(jsonrpc_result(tool_result(EMAIL))),
                  response_body(b"never read"))
    sys.set_asyncgen_hooks(firstiter, record)
    try:
        async with asyncio.timeout(WAIT):
            await make_servicer(policy).Process(None, ctx)
        gc.collect()
    finally:
        sys.set_asyncgen_hooks(firstiter, finalizer)
    assert [r.WhichOneof("response") for r in ctx.written] == ["response_headers", "response_body"]
    assert finalized == []
