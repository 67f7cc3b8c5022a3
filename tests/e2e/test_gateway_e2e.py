"""End to end through the real Envoy over TLS, the real ext_authz and the real MCP servers, with
the official `mcp` SDK as the client (the session's stack: tests/e2e/conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import ssl
import urllib.request

import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from gateway.config import GatewayConfig
from gatewayctl import devstack

# A tool each server has and the example policy lets an admin call, with arguments.
CALLS = {
    "files": ("list_directory", {"path": "."}),
    "database": ("list_tables", {}),
}
HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream",
           "mcp-protocol-version": "2025-11-25"}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "e2e", "version": "1"}}}


def tls(stack: devstack.Stack) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(stack.ca_file))


def token(config: GatewayConfig, *roles: str) -> str:
    return devstack.mint(config, sub="alice", roles=roles, tenant="acme", ttl=600)


def upstream_requests(config: GatewayConfig, server: str) -> int:
    url = f"http://{config.admin.host}:{config.admin.port}/stats?filter=^cluster.mcp_{server}.upstream_rq_total$"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text: str = reply.read().decode()
    return int(text.split(":")[1])


async def call_tool(stack: devstack.Stack, server: str, bearer: str) -> tuple[list[str], bool]:
    config = stack.config
    async with httpx2.AsyncClient(verify=tls(stack), headers={"authorization": f"Bearer {bearer}"},
                                  timeout=20) as http, \
            streamable_http_client(config.resource_url(server), http_client=http) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        tools = [t.name for t in (await session.list_tools()).tools]
        name, args = CALLS[server]
        result = await session.call_tool(name, args)
        return tools, bool(result.is_error)


@pytest.mark.parametrize("server", sorted(CALLS))
async def test_sdk_initialize_list_and_call(stack: devstack.Stack, server: str) -> None:
    """With a token, the official SDK initializes, lists tools and calls one on every server."""
    tools, is_error = await call_tool(stack, server, token(stack.config, "admin"))
    assert CALLS[server][0] in tools
    assert not is_error


async def test_no_token_is_401_pointing_at_served_metadata(stack: devstack.Stack) -> None:
    """Without a token: 401 + WWW-Authenticate naming the RFC 9728 document, which Envoy serves."""
    config = stack.config
    async with httpx2.AsyncClient(verify=tls(stack), timeout=10) as http:
        reply = await http.post(config.resource_url("files"), json=INIT, headers=HEADERS)
        assert reply.status_code == 401
        challenge = reply.headers["www-authenticate"]
        metadata_url = f"{config.public_url}/.well-known/oauth-protected-resource/mcp/files"
        assert challenge.startswith("Bearer ") and f'resource_metadata="{metadata_url}"' in challenge
        assert reply.json()["error"]["code"] == -32001
        doc = await http.get(metadata_url)
    assert doc.status_code == 200 and doc.headers["content-type"] == "application/json"
    body = doc.json()
    assert body["resource"] == config.resource_url("files")
    assert body["authorization_servers"] == [config.issuers[0].issuer]
    assert body["bearer_methods_supported"] == ["header"]


async def test_denied_tool_is_403_and_never_reaches_the_server(stack: devstack.Stack) -> None:
    """A tool the policy denies answers 403 with a JSON-RPC error; the upstream sees nothing."""
    config = stack.config
    viewer = token(config, "viewer")
    call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": "search", "arguments": {"query": "x"}}}
    async with httpx2.AsyncClient(verify=tls(stack), timeout=10,
                                  headers={**HEADERS, "authorization": f"Bearer {viewer}"}) as http:
        before = upstream_requests(config, "files")
        reply = await http.post(config.resource_url("files"), json=call)
        after = upstream_requests(config, "files")
    assert reply.status_code == 403
    error = reply.json()
    assert error["id"] == 7 and error["error"]["code"] == -32003
    assert after == before


async def test_calls_survive_losing_an_instance(stack: devstack.Stack) -> None:
    """With one of two files instances killed mid-run, every call still succeeds."""
    bearer = token(stack.config, "admin")
    await call_tool(stack, "files", bearer)
    victim = stack.procs["files[0]"]
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    for _ in range(6):
        tools, is_error = await call_tool(stack, "files", bearer)
        assert "list_directory" in tools and not is_error


def test_stack_status_reports_the_dead_instance(stack: devstack.Stack) -> None:
    """`status` shows the killed instance as not alive and the rest healthy."""
    rows = {(r["component"], r["instance"]): r for r in devstack.status(stack.config)}
    assert rows[("files", 0)]["alive"] is False
    assert rows[("files", 1)]["healthy"] and rows[("envoy", 0)]["healthy"]
    json.dumps(list(rows.values()))  # the --json output is serialisable


