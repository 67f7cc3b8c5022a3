"""Feature methods: tools (validation, structured output, errors), pagination, resources,
prompts, completion, logging level."""

from __future__ import annotations

from typing import Any

import pytest

from mcp_servers.core import MCPServer, ToolContext
from tests.mcp_servers.core.conftest import Served


async def _call_tool(served: Served, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    status, body = await served.client.call("tools/call", {"name": name, "arguments": arguments or {}})
    assert status == 200, body
    result: dict[str, Any] = body["result"]
    return result


async def test_tools_list_is_paginated_with_opaque_cursors(served: Served) -> None:
    """tools/list pages by page_size; following nextCursor visits every tool exactly once."""
    await served.client.initialize()
    names: list[str] = []
    cursor = None
    pages = 0
    while True:
        status, body = await served.client.call("tools/list", {"cursor": cursor} if cursor else {})
        assert status == 200
        page = body["result"]
        assert len(page["tools"]) <= 2
        names += [t["name"] for t in page["tools"]]
        pages += 1
        cursor = page.get("nextCursor")
        if cursor is None:
            break
    assert pages > 1
    assert len(names) == len(set(names)) and "echo" in names and "touch" in names
    echo = next(
        t for t in (await served.client.call("tools/list"))[1]["result"]["tools"] if t["name"] == "echo"
    )
    assert echo["title"] == "Echo" and echo["annotations"] == {"readOnlyHint": True}


@pytest.mark.parametrize("cursor", ["garbage!", "eyJ4IjoxfQ", 5], ids=["not-base64", "foreign", "not-string"])
async def test_invalid_cursor_is_32602(served: Served, cursor: Any) -> None:
    """A cursor the server did not issue is invalid params."""
    await served.client.initialize()
    status, body = await served.client.call("tools/list", {"cursor": cursor})
    assert status == 200
    assert body["error"]["code"] == -32602


async def test_invalid_arguments_give_is_error_naming_field(served: Served) -> None:
    """Arguments failing inputSchema produce an isError result naming the field; handler not run."""
    await served.client.initialize()
    result = await _call_tool(served, "echo", {"text": "x", "times": 0})
    assert result["isError"] is True
    assert "arguments.times" in result["content"][0]["text"]
    result = await _call_tool(served, "echo", {})
    assert result["isError"] is True and "arguments.text" in result["content"][0]["text"]
    result = await _call_tool(served, "echo", {"text": "ab", "times": 2})
    assert result == {"content": [{"type": "text", "text": "abab"}]}


async def test_unknown_tool_and_method(served: Served) -> None:
    """An unknown tool is -32602 (per spec); an unknown method is -32601."""
    await served.client.initialize()
    status, body = await served.client.call("tools/call", {"name": "nope"})
    assert status == 200 and body["error"]["code"] == -32602
    status, body = await served.client.call("tools/destroy", {})
    assert status == 200 and body["error"]["code"] == -32601


async def test_structured_output_and_errors(served: Served) -> None:
    """dict results become structuredContent (checked against outputSchema); errors become isError."""
    await served.client.initialize()
    result = await _call_tool(served, "structured")
    assert result["structuredContent"] == {"n": 7}
    assert result["content"][0]["text"] == '{"n":7}'
    broken = await _call_tool(served, "broken_output")
    assert broken["isError"] is True and "outputSchema" in broken["content"][0]["text"]
    fail = await _call_tool(served, "fail")
    assert fail == {
        "content": [{"type": "text", "text": "the thing failed; try again with a smaller input"}],
        "isError": True,
    }
    crash = await _call_tool(served, "crash")
    assert crash["isError"] is True and "internal error" in crash["content"][0]["text"]
    assert await served.client.ping_ok()


async def test_identity_headers_reach_the_context(served: Served) -> None:
    """x-mcp-user / x-mcp-tenant / x-mcp-roles are visible to handlers."""
    await served.client.initialize(user="alice", identity={"x-mcp-tenant": "acme"})
    status, body = await served.client.call(
        "tools/call",
        {"name": "whoami", "arguments": {}},
        headers={"x-mcp-roles": "dev, ops"},
    )
    assert status == 200
    assert body["result"]["structuredContent"] == {"user": "alice", "tenant": "acme", "roles": ["dev", "ops"]}


async def test_resources(served: Served) -> None:
    """resources/list merges static and listed resources; read handles text, templates, blobs, missing."""
    await served.client.initialize()
    uris: list[str] = []
    cursor = None
    while True:
        _, body = await served.client.call("resources/list", {"cursor": cursor} if cursor else {})
        uris += [r["uri"] for r in body["result"]["resources"]]
        cursor = body["result"].get("nextCursor")
        if cursor is None:
            break
    assert uris == ["test://doc", "test://items/0", "test://items/1", "test://items/2"]
    _, body = await served.client.call("resources/templates/list")
    assert body["result"]["resourceTemplates"] == [{"uriTemplate": "test://items/{id}", "name": "item"}]
    _, body = await served.client.call("resources/read", {"uri": "test://doc"})
    assert body["result"]["contents"] == [{"uri": "test://doc", "mimeType": "text/plain", "text": "hello"}]
    _, body = await served.client.call("resources/read", {"uri": "test://items/ab"})
    assert body["result"]["contents"] == [
        {"uri": "test://items/ab", "mimeType": "application/octet-stream", "blob": "YWI="}
    ]
    for uri in ("test://items/missing", "test://other"):
        _, body = await served.client.call("resources/read", {"uri": uri})
        assert body["error"]["code"] == -32002
    _, body = await served.client.call("resources/subscribe", {"uri": "test://doc"})
    assert body["result"] == {}
    _, body = await served.client.call("resources/unsubscribe", {"uri": "test://doc"})
    assert body["result"] == {}


async def test_prompts_and_completion(served: Served) -> None:
    """prompts/get fills arguments and rejects missing ones; completion/complete filters values."""
    await served.client.initialize()
    _, body = await served.client.call("prompts/list")
    assert body["result"]["prompts"][0]["name"] == "greet"
    _, body = await served.client.call("prompts/get", {"name": "greet", "arguments": {"who": "bob"}})
    assert body["result"]["messages"][0]["content"]["text"] == "hello bob"
    _, body = await served.client.call("prompts/get", {"name": "greet", "arguments": {}})
    assert body["error"]["code"] == -32602
    _, body = await served.client.call("prompts/get", {"name": "nope"})
    assert body["error"]["code"] == -32602
    _, body = await served.client.call(
        "completion/complete",
        {"ref": {"type": "ref/prompt", "name": "greet"}, "argument": {"name": "who", "value": "al"}},
    )
    assert body["result"]["completion"] == {"values": ["alice", "alfred"], "total": 2, "hasMore": False}
    _, body = await served.client.call("completion/complete", {"ref": {}, "argument": {}})
    assert body["error"]["code"] == -32602


async def test_set_level_validates(served: Served) -> None:
    """logging/setLevel accepts RFC 5424 levels and rejects others with -32602."""
    await served.client.initialize()
    _, body = await served.client.call("logging/setLevel", {"level": "warning"})
    assert body["result"] == {}
    _, body = await served.client.call("logging/setLevel", {"level": "loud"})
    assert body["error"]["code"] == -32602


def test_registration_errors_fail_at_start() -> None:
    """Bad schemas and duplicate names are refused when registered, not on first call."""
    server = MCPServer("x")
    with pytest.raises(ValueError, match="inputSchema"):
        server.tool(name="t", description="d", input_schema={"type": "array"})
    with pytest.raises(ValueError, match="invalid JSON Schema"):
        server.tool(
            name="t", description="d", input_schema={"type": "object", "properties": {"a": {"type": 5}}}
        )

    @server.tool(name="ok", description="d")
    async def ok(_ctx: ToolContext, _args: dict[str, Any]) -> str:
        return "ok"

    with pytest.raises(ValueError, match="twice"):
        server.tool(name="ok", description="d")
