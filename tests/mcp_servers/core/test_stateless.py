"""Protocol 2026-07-28: no initialize, no session, _meta envelope and SEP-2243 headers per request."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.mcp_servers.core.conftest import JSON_AND_SSE, Served

V = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": V, "io.modelcontextprotocol/clientCapabilities": {}}


def _headers(method: str, name: str | None = None, **extra: str) -> dict[str, str]:
    h = {
        "Content-Type": "application/json",
        "Accept": JSON_AND_SSE,
        "MCP-Protocol-Version": V,
        "Mcp-Method": method,
    }
    if name is not None:
        h["Mcp-Name"] = name
    h.update(extra)
    return h


async def _post(
    served: Served, method: str, params: dict[str, Any], headers: dict[str, str]
) -> tuple[int, Any]:
    return await served.client.raw(
        orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}), headers
    )


async def test_discover_and_call_without_initialize(served: Served) -> None:
    """server/discover and tools/call work with no session; results carry resultType and serverInfo."""
    status, body = await _post(served, "server/discover", {"_meta": META}, _headers("server/discover"))
    assert status == 200
    result = body["result"]
    assert V in result["supportedVersions"] and "tools" in result["capabilities"]
    assert result["resultType"] == "complete" and result["cacheScope"] == "private"
    status, body = await _post(
        served,
        "tools/call",
        {"name": "echo", "arguments": {"text": "hi"}, "_meta": META},
        _headers("tools/call", "echo"),
    )
    assert status == 200
    assert body["result"]["content"] == [{"type": "text", "text": "hi"}]
    assert body["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "core-test"


@pytest.mark.parametrize(
    ("params", "headers", "status", "code"),
    [
        ({}, _headers("tools/list"), 400, -32602),
        ({"_meta": META}, _headers("tools/list", **{"MCP-Protocol-Version": "2025-11-25"}), 400, None),
        ({"_meta": META}, _headers("prompts/list"), 400, -32020),
        (
            {"_meta": {**META, "io.modelcontextprotocol/protocolVersion": "2031-01-01"}},
            _headers("tools/list", **{"MCP-Protocol-Version": "2031-01-01"}),
            400,
            -32022,
        ),
    ],
    ids=["no-meta", "legacy-header-no-session", "method-mismatch", "unknown-version"],
)
async def test_envelope_errors(
    served: Served, params: dict[str, Any], headers: dict[str, str], status: int, code: int | None
) -> None:
    """Missing _meta, header/body disagreement and unknown versions are 400s with their codes."""
    got_status, body = await _post(served, "tools/list", params, headers)
    assert got_status == status
    if code is not None:
        assert body["error"]["code"] == code
    status2, body2 = await _post(served, "tools/list", {"_meta": META}, _headers("tools/list"))
    assert status2 == 200 and body2["result"]["tools"]


async def test_modern_errors_map_to_http_status(served: Served) -> None:
    """On 2026-07-28 an unknown method is HTTP 404 and a missing resource is -32602 / 400."""
    status, body = await _post(served, "nope/nope", {"_meta": META}, _headers("nope/nope"))
    assert status == 404 and body["error"]["code"] == -32601
    status, body = await _post(
        served,
        "resources/read",
        {"uri": "test://zzz", "_meta": META},
        _headers("resources/read", "test://zzz"),
    )
    assert status == 400 and body["error"]["code"] == -32602


async def test_no_back_channel_and_notifications_dropped(served: Served) -> None:
    """Sampling has no back-channel on 2026-07-28 (isError); notifications get 202."""
    meta = {**META, "io.modelcontextprotocol/clientCapabilities": {"sampling": {}}}
    status, body = await _post(
        served,
        "tools/call",
        {"name": "ask_llm", "arguments": {}, "_meta": meta},
        _headers("tools/call", "ask_llm"),
    )
    assert status == 200 and body["result"]["isError"] is True
    note = orjson.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}})
    status, _ = await served.client.raw(note, _headers("notifications/cancelled"))
    assert status == 202
