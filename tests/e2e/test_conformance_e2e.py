"""The conformance server behind the gateway: initialize, tools/list and tools/call on
/mcp/conformance with the official SDK (runs once mcp_servers.conformance exists)."""

from __future__ import annotations

import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from gatewayctl import devstack
from tests.e2e.conftest import HAS_CONFORMANCE
from tests.e2e.helpers import bearer, tls_context

pytestmark = pytest.mark.skipif(not HAS_CONFORMANCE, reason="needs mcp_servers.conformance")


async def test_initialize_list_and_call_through_the_gateway(stack: devstack.Stack) -> None:
    """The conformance role initializes, sees test_simple_text and calls it."""
    token = bearer(stack.config, "conformance")
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=20,
                                  headers={"authorization": f"Bearer {token}"}) as http, \
            streamable_http_client(stack.config.resource_url("conformance"), http_client=http) as (r, w), \
            ClientSession(r, w) as client:
        init = await client.initialize()
        tools = {t.name for t in (await client.list_tools()).tools}
        result = await client.call_tool("test_simple_text", {})
    assert init.server_info.name
    assert "test_simple_text" in tools
    assert not result.is_error and result.content
