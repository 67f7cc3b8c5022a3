"""SSE answers, server-to-client requests (sampling, elicitation), cancellation, GET streams."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from mcp_servers.core import ServerSettings
from tests.mcp_servers.core.conftest import Served, read_sse, start


def _tool_call(rid: int, name: str, meta: dict[str, Any] | None = None) -> bytes:
    params: dict[str, Any] = {"name": name, "arguments": {}}
    if meta:
        params["_meta"] = meta
    return orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params})


async def test_progress_turns_the_answer_into_sse(served: Served) -> None:
    """A call that sends progress and logs is answered as SSE: notifications first, then the result."""
    await served.client.initialize()
    async with served.http.post(
        served.url, data=_tool_call(7, "progress", {"progressToken": "p1"}), headers=served.client.headers()
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        messages = [m async for m in read_sse(resp)]
    progress = [m["params"] for m in messages if m.get("method") == "notifications/progress"]
    assert [p["progress"] for p in progress] == [1, 2, 3]
    assert all(p["progressToken"] == "p1" for p in progress)
    assert any(m.get("method") == "notifications/message" for m in messages)
    assert messages[-1] == {
        "jsonrpc": "2.0",
        "id": 7,
        "result": {"content": [{"type": "text", "text": "done"}]},
    }


async def test_plain_calls_stay_json_and_json_only_clients_get_json(served: Served) -> None:
    """A call that sends nothing is plain JSON; a JSON-only client gets JSON even with progress."""
    await served.client.initialize()
    async with served.http.post(
        served.url, data=_tool_call(1, "structured"), headers=served.client.headers()
    ) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
    async with served.http.post(
        served.url,
        data=_tool_call(2, "progress", {"progressToken": "p"}),
        headers=served.client.headers(accept="application/json"),
    ) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        assert (await resp.json())["result"]["content"][0]["text"] == "done"


async def _round_trip(served: Served, tool: str, method: str, answer: dict[str, Any]) -> dict[str, Any]:
    await served.client.initialize(capabilities={"sampling": {}, "elicitation": {}})
    async with served.http.post(
        served.url, data=_tool_call(3, tool), headers=served.client.headers()
    ) as resp:
        events = read_sse(resp)
        request = await anext(events)
        assert request["method"] == method
        reply = {"jsonrpc": "2.0", "id": request["id"], "result": answer}
        async with served.http.post(
            served.url, data=orjson.dumps(reply), headers=served.client.headers()
        ) as ack:
            assert ack.status == 202
        final = await anext(events)
    assert final["id"] == 3
    result: dict[str, Any] = final["result"]
    return result


async def test_sampling_round_trip(served: Served) -> None:
    """sampling/createMessage goes out on the call's SSE stream; the client's POSTed answer resolves it."""
    result = await _round_trip(
        served,
        "ask_llm",
        "sampling/createMessage",
        {"role": "assistant", "content": {"type": "text", "text": "42"}, "model": "m"},
    )
    assert result["content"][0]["text"] == "llm said 42"


async def test_elicitation_round_trip(served: Served) -> None:
    """elicitation/create round trip delivers the user's answer to the tool."""
    result = await _round_trip(
        served, "ask_user", "elicitation/create", {"action": "accept", "content": {"name": "Ada"}}
    )
    assert result["content"][0]["text"] == "user said Ada"


async def test_client_error_answer_becomes_is_error(served: Served) -> None:
    """A JSON-RPC error from the client to a sampling request becomes an isError tool result."""
    await served.client.initialize(capabilities={"sampling": {}})
    async with served.http.post(
        served.url, data=_tool_call(3, "ask_llm"), headers=served.client.headers()
    ) as resp:
        events = read_sse(resp)
        request = await anext(events)
        reply = {"jsonrpc": "2.0", "id": request["id"], "error": {"code": -1, "message": "user declined"}}
        async with served.http.post(
            served.url, data=orjson.dumps(reply), headers=served.client.headers()
        ) as ack:
            assert ack.status == 202
        final = await anext(events)
    assert final["result"]["isError"] is True
    assert "user declined" in final["result"]["content"][0]["text"]


async def test_sampling_without_capability_or_answer(served: Served) -> None:
    """No sampling capability: isError at once; no answer within the bound: isError after the timeout."""
    await served.client.initialize()
    _, body = await served.client.call("tools/call", {"name": "ask_llm", "arguments": {}})
    assert body["result"]["isError"] is True and "does not support" in body["result"]["content"][0]["text"]
    quick = await start(ServerSettings(client_request_timeout=0.2))
    try:
        await quick.client.initialize(capabilities={"sampling": {}})
        async with quick.http.post(
            quick.url, data=_tool_call(3, "ask_llm"), headers=quick.client.headers()
        ) as resp:
            messages = [m async for m in read_sse(resp)]
        assert messages[0]["method"] == "sampling/createMessage"
        assert messages[-1]["result"]["isError"] is True
        assert "did not answer" in messages[-1]["result"]["content"][0]["text"]
    finally:
        await quick.http.close()
        await quick.runner.cleanup()


async def test_cancellation_sets_ctx_cancelled_and_drops_the_answer(served: Served) -> None:
    """notifications/cancelled sets ctx.cancelled; the JSON answer is a -32800 error, not the result."""
    await served.client.initialize()
    call = asyncio.create_task(served.client.call("tools/call", {"name": "slow", "arguments": {}}))
    await asyncio.wait_for(served.gates.started.wait(), 10)
    rid = served.client._next
    cancel = {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": rid, "reason": "t"},
    }
    async with served.http.post(
        served.url, data=orjson.dumps(cancel), headers=served.client.headers()
    ) as resp:
        assert resp.status == 202
    status, body = await asyncio.wait_for(call, 10)
    assert served.gates.saw_cancel.is_set()
    assert status == 200 and body["error"]["code"] == -32800
    assert await served.client.ping_ok()


async def test_get_stream_carries_updates_and_list_changed(served: Served) -> None:
    """A subscribed session's GET stream receives resources/updated and list_changed from another session."""
    watcher = served.client
    await watcher.initialize()
    _, body = await watcher.call("resources/subscribe", {"uri": "test://doc"})
    assert body["result"] == {}
    async with served.http.get(
        served.url, headers={**watcher.headers(), "Accept": "text/event-stream"}
    ) as stream:
        assert stream.status == 200
        events = read_sse(stream)
        from tests.mcp_servers.core.conftest import Client

        actor = Client(served.http, served.url)
        await actor.initialize()
        _, body = await actor.call("tools/call", {"name": "touch", "arguments": {}})
        assert body["result"]["content"][0]["text"] == "ok"
        first = await asyncio.wait_for(anext(events), 10)
        second = await asyncio.wait_for(anext(events), 10)
    assert first == {
        "jsonrpc": "2.0",
        "method": "notifications/resources/updated",
        "params": {"uri": "test://doc"},
    }
    assert second["method"] == "notifications/tools/list_changed"


async def test_second_get_stream_conflicts(served: Served) -> None:
    """Only one standalone GET stream per session; a second one gets 409."""
    await served.client.initialize()
    headers = {**served.client.headers(), "Accept": "text/event-stream"}
    async with served.http.get(served.url, headers=headers) as first:
        assert first.status == 200
        await first.content.readline()  # the priming event: the stream is attached
        async with served.http.get(served.url, headers=headers) as second:
            assert second.status == 409
