"""ext_proc only where needed, through the real stack: masked tool results (JSON and SSE), lists
filtered per caller, and requests that need no inspection never open an ext_proc stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult

from gatewayctl import devstack
from tests.e2e.conftest import HAS_EXT_PROC
from tests.e2e.helpers import bearer, envoy_stat, paused, stateless_call, tls_context
from tests.e2e.pii_server import CARD, EMAIL

pytestmark = pytest.mark.skipif(not HAS_EXT_PROC, reason="needs ext_proc")

STREAMS = "http.mcp_gateway.ext_proc.streams_started"
CARD_DIGITS = CARD.replace(" ", "")


@asynccontextmanager
async def session(stack: devstack.Stack, server: str, token: str) -> AsyncIterator[ClientSession]:
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=20,
                                  headers={"authorization": f"Bearer {token}"}) as http, \
            streamable_http_client(stack.config.resource_url(server), http_client=http) as (r, w), \
            ClientSession(r, w) as client:
        await client.initialize()
        yield client


def leaks(text: str) -> bool:
    return EMAIL in text or CARD in text or CARD_DIGITS in text


async def test_tool_result_is_masked_in_a_json_answer(stack: devstack.Stack) -> None:
    """A viewer (policy masks PII) gets the email and card number of a JSON result redacted."""
    async with session(stack, "pii", bearer(stack.config, "viewer")) as client:
        result = await client.call_tool("contact", {})
    text = result.content[0].text  # type: ignore[union-attr]
    assert not result.is_error and "Alice Smith" in text
    assert not leaks(text)
    assert "[REDACTED:email]" in text and "[REDACTED:card]" in text


async def test_tool_result_and_progress_are_masked_in_an_sse_answer(stack: devstack.Stack) -> None:
    """With a progress token the server answers SSE; the result and each event are masked."""
    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    async with session(stack, "pii", bearer(stack.config, "viewer")) as client:
        result = await client.call_tool("contact", {}, progress_callback=on_progress)
    assert isinstance(result, CallToolResult)
    text = result.content[0].text  # type: ignore[union-attr]
    assert not leaks(text) and "[REDACTED:card]" in text
    assert len(messages) == 3
    assert all("[REDACTED:email]" in m and not leaks(m) for m in messages)


async def test_sse_answer_is_masked_on_the_wire(stack: devstack.Stack) -> None:
    """The raw SSE body (events possibly cut across chunks) carries no PII and stays SSE."""
    reply = await stateless_call(stack, "pii", bearer(stack.config, "viewer"), "contact",
                                 meta={"progressToken": "p1"})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.text.count("data: ") == 4 and not leaks(reply.text)


async def test_tools_list_is_filtered_per_caller(stack: devstack.Stack) -> None:
    """A viewer lists only the tool the policy grants it; an admin lists every tool."""
    lists: dict[str, set[str]] = {}
    for role in ("viewer", "admin"):
        async with session(stack, "pii", bearer(stack.config, role)) as client:
            lists[role] = {t.name for t in (await client.list_tools()).tools}
    assert lists == {"viewer": {"contact"}, "admin": {"contact", "echo"}}


@pytest.mark.parametrize(("role", "tool", "headers"), [
    ("admin", "contact", {}),
    ("viewer", "echo", {}),
    ("admin", "contact", {"x-mcp-inspect": "1"}),
], ids=["unmasked-role", "not-granted", "client-sent-inspect-header"])
async def test_requests_that_need_no_inspection_skip_ext_proc(
        stack: devstack.Stack, role: str, tool: str, headers: dict[str, str]) -> None:
    """No ext_proc stream for a call whose answer needs no inspection (an admin's tools/call,
    a denied call), even when the client sends x-mcp-inspect itself."""
    before = envoy_stat(stack.config, STREAMS)
    reply = await stateless_call(stack, "pii", bearer(stack.config, role), tool, headers=headers)
    assert envoy_stat(stack.config, STREAMS) == before
    if role == "admin":
        assert reply.status_code == 200 and EMAIL in reply.text  # admins see PII unmasked
    else:
        assert reply.status_code == 403


async def test_inspected_request_opens_one_ext_proc_stream(stack: devstack.Stack) -> None:
    """A viewer's tools/call (masked) goes through exactly one ext_proc stream."""
    before = envoy_stat(stack.config, STREAMS)
    reply = await stateless_call(stack, "pii", bearer(stack.config, "viewer"), "contact")
    assert reply.status_code == 200 and not leaks(reply.text)
    assert envoy_stat(stack.config, STREAMS) == before + 1


async def test_ext_proc_unresponsive_fails_closed(stack: devstack.Stack) -> None:
    """With every ext_proc process frozen, an inspected answer is withheld (5xx), never leaked."""
    with paused(stack, "ext_proc"):
        reply = await stateless_call(stack, "pii", bearer(stack.config, "viewer"), "contact")
    assert reply.status_code >= 500 and not leaks(reply.text)
