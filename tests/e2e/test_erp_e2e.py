"""The ERP through the gateway (issue 8): the integration server fronts the demo ERP backend as
the "erp" MCP server; the official SDK lists and calls its tools, and the backend sees only the
connector's API key, never the client's token or the gateway's identity headers."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from gatewayctl import devstack
from tests.e2e.conftest import ERP_OPERATIONS
from tests.e2e.helpers import bearer, tls_context


def backend_requests(stack: devstack.Stack) -> list[dict[str, Any]]:
    backend = stack.config.backends[0].instance
    req = urllib.request.Request(f"http://{backend.host}:{backend.port}/_debug/requests",
                                 headers={"X-API-Key": stack.secrets["ERP_API_KEY"]})
    with urllib.request.urlopen(req, timeout=5) as reply:  # noqa: S310  (loopback test backend)
        data: dict[str, Any] = json.loads(reply.read())
    requests: list[dict[str, Any]] = data["requests"]
    return requests


async def erp_session(stack: devstack.Stack, role: str, work: Any) -> Any:
    token = bearer(stack.config, role)
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=20,
                                  headers={"authorization": f"Bearer {token}"}) as http, \
            streamable_http_client(stack.config.resource_url("erp"), http_client=http) as (r, w), \
            ClientSession(r, w) as client:
        await client.initialize()
        return await work(client)


async def test_sdk_lists_the_allowed_erp_operations(stack: devstack.Stack) -> None:
    """An admin's tools/list through the gateway names exactly the allowlisted ERP operations."""
    async def work(client: ClientSession) -> set[str]:
        return {t.name for t in (await client.list_tools()).tools}
    assert await erp_session(stack, "admin", work) == set(ERP_OPERATIONS)


async def test_sdk_calls_an_erp_tool_with_the_connector_key(stack: devstack.Stack) -> None:
    """An admin's call reaches the backend with the connector's API key and nothing of the
    client's identity (no token, no x-mcp-* headers)."""
    before = len(backend_requests(stack))

    async def work(client: ClientSession) -> Any:
        return await client.call_tool("listCustomers", {})
    result = await erp_session(stack, "admin", work)
    assert not result.is_error and result.structured_content is not None
    seen = [s for s in backend_requests(stack)[before:] if s["path"] == "/customers"]
    assert len(seen) == 1
    assert seen[0]["x_api_key"] == stack.secrets["ERP_API_KEY"]
    assert seen[0]["authorization"] is None and seen[0]["forwarded_identity"] == {}


async def test_erp_write_is_denied_to_a_read_only_role(stack: devstack.Stack) -> None:
    """An analyst may read the ERP but not create orders: 403, and the backend sees nothing."""
    token = bearer(stack.config, "analyst")
    body = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"name": "createOrder", "arguments": {"customer_id": 1, "items": []}}}
    before = len(backend_requests(stack))
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=20) as http:
        reply = await http.post(stack.config.resource_url("erp"), json=body, headers={
            "authorization": f"Bearer {token}", "content-type": "application/json",
            "accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-11-25"})
    assert reply.status_code == 403 and reply.json()["error"]["code"] == -32003
    assert len(backend_requests(stack)) == before
