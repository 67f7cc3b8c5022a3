"""The step transport against a real loopback server that answers in awkward ways: a JSON answer
in many chunks, oversized answers, answers that end or break after the request was sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from aiohttp import web

from mcp_servers.workflow.client import (
    BAD_ANSWER,
    MAX_ANSWER_BYTES,
    UNAVAILABLE,
    GatewayClient,
    StepError,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[GatewayClient]:
    app = web.Application()
    app.router.add_post("/mcp/{server}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    client = GatewayClient(f"http://127.0.0.1:{runner.addresses[0][1]}", None)
    await client.open()
    try:
        yield client
    finally:
        await client.close()
        await runner.cleanup()


def answer(rid: Any, structured: dict[str, Any]) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": rid, "result": {
        "content": [{"type": "text", "text": "ok"}], "structuredContent": structured}})


async def chunked(request: web.Request, body: bytes, ctype: str = "application/json",
                  chunk: int = 16 * 1024) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": ctype})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for i in range(0, len(body), chunk):
        await resp.write(body[i:i + chunk])
        await asyncio.sleep(0)  # let the client see each chunk on its own
    await resp.write_eof()
    return resp


async def test_json_answer_in_many_chunks_is_read_whole() -> None:
    """A 300 KB application/json answer sent in 16 KB chunks is one answer, not a bad one."""
    async def handle(request: web.Request) -> web.StreamResponse:
        rid = (await request.json())["id"]
        return await chunked(request, answer(rid, {"blob": "x" * 300_000}))
    async with server(handle) as client:
        outcome = await client.call("erp", "createOrder", {}, "t", timeout_seconds=10)
    assert outcome.output["blob"] == "x" * 300_000


async def test_oversized_json_answer_is_refused_with_unknown_outcome() -> None:
    """An answer over the size limit (streamed, no Content-Length) is a bad answer whose
    call may have taken effect."""
    async def handle(request: web.Request) -> web.StreamResponse:
        rid = (await request.json())["id"]
        return await chunked(request, answer(rid, {"blob": "x" * (MAX_ANSWER_BYTES + 10)}),
                             chunk=1024 * 1024)
    async with server(handle) as client:
        with pytest.raises(StepError) as info:
            await client.call("erp", "createOrder", {}, "t", timeout_seconds=10)
    assert info.value.reason == BAD_ANSWER and info.value.outcome_unknown


@pytest.mark.parametrize("status", [502, 504, 200])
async def test_failures_after_sending_leave_the_outcome_unknown(status: int) -> None:
    """A 502/504 without a JSON-RPC answer, or a 200 that is not JSON-RPC, may have taken
    effect: the error says so."""
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, text="upstream reset", content_type="text/plain")
    async with server(handle) as client:
        with pytest.raises(StepError) as info:
            await client.call("erp", "createOrder", {}, "t", timeout_seconds=10)
    assert info.value.outcome_unknown and "may have taken effect" in info.value.message


async def test_sse_ending_without_a_response_leaves_the_outcome_unknown() -> None:
    """An SSE answer that ends before the call's response is an unknown outcome."""
    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        return await chunked(request, b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":"
                                      b"\"notifications/progress\",\"params\":{}}\n\n",
                             ctype="text/event-stream")
    async with server(handle) as client:
        with pytest.raises(StepError) as info:
            await client.call("erp", "createOrder", {}, "t", timeout_seconds=10)
    assert info.value.reason == UNAVAILABLE and info.value.outcome_unknown


async def test_connection_closed_after_sending_leaves_the_outcome_unknown() -> None:
    """A connection dropped after the request reached the server is an unknown outcome."""
    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        request.transport.close()
        return web.Response()
    async with server(handle) as client:
        with pytest.raises(StepError) as info:
            await client.call("erp", "createOrder", {}, "t", timeout_seconds=10)
    assert info.value.reason == UNAVAILABLE and info.value.outcome_unknown


async def test_unreachable_gateway_is_a_known_outcome() -> None:
    """A connection that could not be made never sent the call: not an unknown outcome."""
    client = GatewayClient("http://127.0.0.1:9", None)
    await client.open()
    try:
        with pytest.raises(StepError) as info:
            await client.call("erp", "createOrder", {}, "t", timeout_seconds=10)
    finally:
        await client.close()
    assert info.value.reason == UNAVAILABLE and info.value.retryable
    assert not info.value.outcome_unknown


async def test_refusal_is_a_known_outcome() -> None:
    """A 403 from the gateway is a refusal: the call did not run."""
    async def handle(request: web.Request) -> web.Response:
        rid = (await request.json())["id"]
        return web.json_response({"jsonrpc": "2.0", "id": rid, "error": {
            "code": -32003, "message": "denied", "data": {"reason": "tool_not_allowed"}}},
            status=403)
    async with server(handle) as client:
        with pytest.raises(StepError) as info:
            await client.call("erp", "createOrder", {}, "t", timeout_seconds=10)
    assert info.value.reason == "refused" and not info.value.outcome_unknown
