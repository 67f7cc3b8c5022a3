"""GET stream fan-in, server-to-client requests, client answers and DELETE."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from gateway.caller import SessionOwner
from mcp_aggregator.sessions import store_key
from mcp_aggregator.streams import ListChangedDedup, client_message
from mcp_servers.core.errors import SessionNotFound
from tests.mcp_aggregator.conftest import JSON_AND_SSE, SERVERS, RawClient, Stack, wait_for

ALICE = SessionOwner(None, "alice", None)


async def sse_messages(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    data: list[bytes] = []
    async for raw in resp.content:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data and any(data):
                yield orjson.loads(b"\n".join(data))
            data = []
        elif line.startswith(b"data:"):
            data.append(line[5:].lstrip())


async def next_message(messages: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await asyncio.wait_for(anext(messages), 10)
    except TimeoutError:
        raise AssertionError("no message on the GET stream within 10 s") from None


async def open_get(stack: Stack, client: RawClient) -> aiohttp.ClientResponse:
    """The client's GET stream, returned once every upstream stream behind it is open."""
    resp = await stack.http.get(client.url, headers={**client.headers(), "Accept": "text/event-stream"})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    assert stack.aggregator.fan_ins, "the GET fan-in did not start before the answer's headers"
    for server, opened in stack.aggregator.fan_ins[-1].open.items():
        await wait_for(opened, f"the GET stream of {server}")
    return resp


async def upstream_call(stack: Stack, server: str, tool: str, session_id: str | None,
                        user: str = "alice") -> tuple[int, Any]:
    """tools/call straight on a per-server route (the fast path's job), JSON answers only."""
    client = RawClient(stack.http, f"{stack.envoy_base}/mcp/{server}", user=user)
    client.session_id = session_id
    if session_id is None:
        await client.initialize()
    headers = {**client.headers("application/json")}
    body = {"jsonrpc": "2.0", "id": 99, "method": "tools/call", "params": {"name": tool, "arguments": {}}}
    return await client.post(body, headers)


async def test_list_changed_from_any_upstream_reaches_the_get_stream(stack: Stack) -> None:
    """A list_changed sent by one server on its stream reaches the client's one GET stream."""
    client = RawClient(stack.http, stack.url)
    await client.initialize()
    resp = await open_get(stack, client)
    try:
        messages = sse_messages(resp)
        # Another session of beta changes the list: beta broadcasts to every session's stream.
        status, body = await upstream_call(stack, "beta", "notify", None, user="dave")
        assert status == 200 and "result" in body
        message = await next_message(messages)
        assert message == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
    finally:
        resp.close()


async def test_server_request_on_get_stream_gets_a_prefixed_id_and_the_answer_returns(stack: Stack) -> None:
    """An elicitation sent on alpha's stream reaches the client as alpha__s:<id>; the client's
    answer goes back to alpha with alpha's own id, and the tool finishes with it."""
    client = RawClient(stack.http, stack.url)
    await client.initialize(capabilities={"elicitation": {}})
    assert client.session_id is not None
    upstream_sid = stack.token(client.session_id).upstream["alpha"]
    resp = await open_get(stack, client)
    try:
        messages = sse_messages(resp)
        call = asyncio.create_task(upstream_call(stack, "alpha", "ask", upstream_sid))
        request = await next_message(messages)
        assert request["method"] == "elicitation/create"
        assert isinstance(request["id"], str) and request["id"].startswith("alpha__s:srv-")
        status, _ = await client.post({"jsonrpc": "2.0", "id": request["id"],
                                       "result": {"action": "accept", "content": {"name": "Ada"}}})
        assert status == 202
        status, body = await asyncio.wait_for(call, 10)
        assert status == 200 and body["result"]["content"][0]["text"] == "user said Ada"
    finally:
        resp.close()


async def test_answer_to_no_servers_request_is_ignored(stack: Stack) -> None:
    """A client answer whose id names no server of the view is accepted and goes nowhere."""
    client = RawClient(stack.http, stack.url)
    await client.initialize()
    legs = len(stack.envoy.seen)
    for rid in ("nosuch__s:1", "alpha__x:1", 5):
        status, body = await client.post({"jsonrpc": "2.0", "id": rid, "result": {}})
        assert status == 202 and body is None
    assert len(stack.envoy.seen) == legs


async def test_delete_ends_every_upstream_session(stack: Stack) -> None:
    """DELETE ends each upstream session, and the aggregate id answers 404 afterwards."""
    client = RawClient(stack.http, stack.url)
    await client.initialize()
    assert client.session_id is not None
    upstream = stack.token(client.session_id).upstream
    for server in SERVERS:
        stack.envoy.transports[server].sessions.get(upstream[server], ALICE)
    async with stack.http.delete(client.url, headers=client.headers()) as resp:
        assert resp.status == 200
    for server in SERVERS:
        try:
            stack.envoy.transports[server].sessions.get(upstream[server], ALICE)
        except SessionNotFound:
            continue
        raise AssertionError(f"the session of {server} is still open")
    status, body = await client.request("tools/list")
    assert status == 404 and body["error"]["code"] == -32004


async def test_get_without_session_or_sse_is_refused(stack: Stack) -> None:
    """GET needs a session (405 without: no GET stream in 2026-07-28) and Accept: text/event-stream."""
    async with stack.http.get(stack.url, headers={"Accept": "text/event-stream"}) as resp:
        assert resp.status == 405
    async with stack.http.get(stack.url, headers={"Accept": JSON_AND_SSE.split(",")[0]}) as resp:
        assert resp.status == 406


def test_list_changed_is_deduplicated_within_the_window() -> None:
    """One list_changed of each kind per window passes; the next window lets one through again."""
    now = [0.0]
    dedup = ListChangedDedup(0.1, clock=lambda: now[0])
    assert dedup.admit("notifications/tools/list_changed")
    now[0] = 0.05
    assert not dedup.admit("notifications/tools/list_changed")
    assert dedup.admit("notifications/prompts/list_changed")
    now[0] = 0.2
    assert dedup.admit("notifications/tools/list_changed")


def test_stream_messages_are_prefixed() -> None:
    """Requests get typed prefixed ids, resources/updated a prefixed URI, responses are dropped."""
    roots = client_message("files", {"jsonrpc": "2.0", "id": 3, "method": "roots/list"})
    ping = client_message("files", {"jsonrpc": "2.0", "id": "3", "method": "ping"})
    assert roots is not None and roots["id"] == "files__n:3"
    assert ping is not None and ping["id"] == "files__s:3"
    updated = client_message("files", {"jsonrpc": "2.0", "method": "notifications/resources/updated",
                                       "params": {"uri": "file:///a"}})
    assert updated is not None and updated["params"]["uri"] == "files+file:///a"
    assert client_message("files", {"jsonrpc": "2.0", "id": 1, "result": {}}) is None


async def test_get_stream_joins_a_server_once_it_recovers(stack: Stack) -> None:
    """A server down at initialize joins the open GET stream when it comes back: its session
    goes to the store and its list_changed reaches the client."""
    stack.envoy.down.add("gamma")
    client = RawClient(stack.http, stack.url)
    await client.initialize()
    assert client.session_id is not None
    resp = await stack.http.get(client.url, headers={**client.headers(), "Accept": "text/event-stream"})
    try:
        assert resp.status == 200
        fan_in = stack.aggregator.fan_ins[-1]
        await wait_for(fan_in.open["alpha"], "the GET stream of alpha")
        assert not fan_in.open["gamma"].is_set()
        stack.envoy.down.clear()
        await wait_for(fan_in.open["gamma"], "the GET stream of gamma after its recovery")
        assert await stack.facts.get(store_key(client.session_id, "gamma")) is not None
        status, _ = await upstream_call(stack, "gamma", "notify", None, user="erin")
        assert status == 200
        message = await next_message(sse_messages(resp))
        assert message["method"] == "notifications/tools/list_changed"
    finally:
        resp.close()
