"""initialize, server/discover and the merged lists of the aggregator, over real core servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx2
import pytest
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from prometheus_client import REGISTRY

from gateway.aggregate.cursor import ListCursor, seal_cursor
from gateway.caller import SessionOwner
from mcp_aggregator.fanout import fan_out
from mcp_aggregator.lists import UNAVAILABLE_META
from mcp_aggregator.sessions import store_key
from tests.mcp_aggregator.conftest import SERVERS, TOOLS, RawClient, Stack

CLIENT_INFO = types.Implementation(name="aggregator-test", version="1.0")
ALL_TOOLS = {f"{s}__{t}" for s in SERVERS for t in (*TOOLS, "ask")}


@asynccontextmanager
async def sdk(url: str, version: str) -> AsyncIterator[ClientSession]:
    """An SDK session on ``url`` that negotiated exactly ``version`` (identity as the gateway sets it)."""
    headers = {"Authorization": "Bearer alice", "x-mcp-user": "alice"}
    async with httpx2.AsyncClient(headers=headers, timeout=20) as client, \
            streamable_http_client(url, http_client=client) as (read, write), \
            ClientSession(read, write, client_info=CLIENT_INFO) as session:
        if version == "2025-06-18":
            request = types.InitializeRequest(params=types.InitializeRequestParams(
                protocol_version=version, capabilities=types.ClientCapabilities(), client_info=CLIENT_INFO))
            result = await session.send_request(request, types.InitializeResult)
            session.adopt(result)
            await session.send_notification(types.InitializedNotification())
        elif version == "2025-11-25":
            result = await session.initialize()
        else:
            discovered = await session.discover()
            assert version in discovered.supported_versions
        assert session.protocol_version == version
        yield session


async def all_tools(session: ClientSession) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor = None
    for _ in range(20):
        params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools += page.tools
        cursor = page.next_cursor
        if cursor is None:
            return tools
    raise AssertionError("tools/list did not end")


@pytest.mark.parametrize("version", ["2025-06-18", "2025-11-25", "2026-07-28"])
async def test_sdk_client_lists_every_server_prefixed(stack: Stack, version: str) -> None:
    """The SDK negotiates each version with the aggregator and sees every server's tools,
    prefixed, with title and outputSchema kept."""
    async with sdk(stack.url, version) as session:
        tools = {t.name: t for t in await all_tools(session)}
        assert set(tools) == ALL_TOOLS
        assert tools["beta__read_a"].title == "beta read_a"
        assert tools["beta__read_a"].output_schema == {"type": "object",
                                                       "properties": {"who": {"type": "string"}}}
        prompts = (await session.list_prompts()).prompts
        assert {p.name for p in prompts} == {f"{s}__greet" for s in SERVERS}
        assert {p.title for p in prompts} == {"Greeting"}
        resources = (await session.list_resources()).resources
        assert {str(r.uri) for r in resources} == {f"{s}+test://{s}/doc" for s in SERVERS}
        templates = (await session.list_resource_templates()).resource_templates
        assert {t.uri_template for t in templates} == {f"{s}+test://{s}/items/{{id}}" for s in SERVERS}


@pytest.mark.parametrize("version", ["2025-06-18", "2025-11-25"])
async def test_initialize_echoes_version_and_seals_upstream_sessions(stack: Stack, version: str) -> None:
    """initialize answers the client's version with the union of capabilities, and the session
    id is a sealed token holding each upstream's session id."""
    client = RawClient(stack.http, stack.url)
    result = await client.initialize(version)
    assert result["protocolVersion"] == version
    assert result["capabilities"]["tools"] == {"listChanged": True}
    assert result["capabilities"]["resources"] == {"subscribe": True, "listChanged": True}
    assert "alpha: the alpha server" in result["instructions"]
    assert client.session_id is not None
    token = stack.token(client.session_id)
    assert token.subject == "alice" and token.protocol_version == version
    assert set(token.upstream) == set(SERVERS)
    for server, upstream_sid in token.upstream.items():
        session = stack.envoy.transports[server].sessions.get(upstream_sid, _owner("alice"))
        assert session.protocol_version == version
        assert session.initialized  # the client's notifications/initialized reached it


def _owner(sub: str) -> SessionOwner:
    return SessionOwner(None, sub, None)


async def test_discover_answers_the_union_for_2026(stack: Stack) -> None:
    """server/discover lists every protocol version and the servers' capabilities."""
    client = RawClient(stack.http, stack.url)
    client.version = "2026-07-28"
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}}
    status, body = await client.post({"jsonrpc": "2.0", "id": 1, "method": "server/discover",
                                      "params": {"_meta": meta}},
                                     {**client.headers(), "Mcp-Method": "server/discover"})
    assert status == 200, body
    assert body["result"]["resultType"] == "complete"
    assert body["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "mcp-gateway"
    assert body["result"]["supportedVersions"] == ["2025-06-18", "2025-11-25", "2026-07-28"]
    assert "prompts" in body["result"]["capabilities"]


async def test_pagination_over_three_servers_with_two_pages_each(stack: Stack) -> None:
    """Each server pages its tools by 2; the merged list walks every page once, in order."""
    client = RawClient(stack.http, stack.url)
    await client.initialize()
    tools, pages = await client.list_all("tools/list", "tools")
    names = [t["name"] for t in tools]
    assert len(names) == len(set(names)) and set(names) == ALL_TOOLS
    assert pages == 7  # 3 servers x 5 tools in pages of 2: 3 pages each, the first pages merged
    assert [n.split("__")[0] for n in names] == sorted(n.split("__")[0] for n in names)


async def test_altered_or_foreign_cursor_is_invalid_params(stack: Stack) -> None:
    """A cursor that was altered, sealed for another list or for another caller is -32602."""
    client = RawClient(stack.http, stack.url)
    await client.initialize()
    status, body = await client.request("tools/list")
    cursor = body["result"]["nextCursor"]
    altered = cursor[:-2] + ("AA" if cursor[-2:] != "AA" else "BB")
    foreign = seal_cursor(stack.sealer, ListCursor(method="tools/list", view="", owner='[null,"bob",null]',
                                                   server=0, upstream=None))
    other_list = seal_cursor(stack.sealer, ListCursor(method="prompts/list", view="",
                                                      owner='[null,"alice",null]', server=0))
    for bad in (altered, foreign, other_list, 7):
        status, body = await client.request("tools/list", {"cursor": bad})
        assert status == 200 and body["error"]["code"] == -32602, bad


async def test_virtual_server_view_filters_lists(stack: Stack) -> None:
    """/mcp/readers lists only the tools its patterns select, and the prompts of its servers."""
    client = RawClient(stack.http, stack.base + "/mcp/readers")
    await client.initialize()
    tools, _ = await client.list_all("tools/list", "tools")
    assert {t["name"] for t in tools} == {"alpha__read_a", "alpha__read_b", "beta__read_a"}
    prompts, _ = await client.list_all("prompts/list", "prompts")
    assert {p["name"] for p in prompts} == {"alpha__greet", "beta__greet"}
    assert set(stack.token(client.session_id or "").upstream) == {"alpha", "beta"}
    assert all(h.get("x-mcp-view") == "readers" for _s, _m, h in stack.envoy.seen)


async def test_session_of_one_view_is_unknown_on_another(stack: Stack) -> None:
    """A session of /mcp/readers is 404 on /mcp, as is another caller's session."""
    client = RawClient(stack.http, stack.base + "/mcp/readers")
    await client.initialize()
    other = RawClient(stack.http, stack.url)
    other.session_id = client.session_id
    status, body = await other.request("tools/list")
    assert status == 404 and body["error"]["code"] == -32004
    bob = RawClient(stack.http, stack.base + "/mcp/readers", user="bob")
    bob.session_id = client.session_id
    status, body = await bob.request("tools/list")
    assert status == 404 and body["error"]["code"] == -32004


def _unavailable_count(server: str) -> float:
    value = REGISTRY.get_sample_value("mcp_gateway_aggregate_upstream_unavailable_total",
                                      {"server": server, "method": "tools/list", "reason": "http_error"})
    return value or 0.0


async def test_down_server_is_left_out_and_named(stack: Stack) -> None:
    """With one server down the others' tools are listed and _meta names the missing one."""
    client = RawClient(stack.http, stack.url)
    await client.initialize()
    stack.envoy.down.add("beta")
    before = _unavailable_count("beta")
    status, body = await client.request("tools/list")
    assert status == 200
    names = {t["name"] for t in body["result"]["tools"]}
    assert names and not any(n.startswith("beta__") for n in names)
    assert body["result"]["_meta"][UNAVAILABLE_META] == [{"server": "beta", "reason": "http_error"}]
    assert _unavailable_count("beta") == before + 1


async def test_late_join_after_recovery_writes_the_store(stack: Stack) -> None:
    """A server down at initialize is initialized on the first list after it recovers; its
    upstream session id goes to the shared store, and its tools are listed."""
    stack.envoy.down.add("gamma")
    client = RawClient(stack.http, stack.url)
    result = await client.initialize()
    assert result["_meta"][UNAVAILABLE_META] == [{"server": "gamma", "reason": "http_error"}]
    assert client.session_id is not None
    assert "gamma" not in stack.token(client.session_id).upstream
    stack.envoy.down.clear()
    tools, _ = await client.list_all("tools/list", "tools")
    assert {t["name"] for t in tools} == ALL_TOOLS
    joined = await stack.facts.get(store_key(client.session_id, "gamma"))
    assert joined is not None
    session = stack.envoy.transports["gamma"].sessions.get(joined, _owner("alice"))
    assert session.initialized


async def test_legs_carry_the_clients_authorization(stack: Stack) -> None:
    """Every leg goes to the per-server route with the client's Authorization."""
    client = RawClient(stack.http, stack.url, user="carol")
    await client.initialize()
    await client.request("tools/list")
    assert stack.envoy.seen
    assert all(h.get("Authorization") == "Bearer carol" for _s, _m, h in stack.envoy.seen)


async def test_ping_and_unknown_methods(stack: Stack) -> None:
    """ping is answered by the aggregator; a call aimed at one server is not its job (-32601)."""
    client = RawClient(stack.http, stack.url)
    await client.initialize()
    assert (await client.request("ping"))[1]["result"] == {}
    status, body = await client.request("tools/call", {"name": "alpha__read_a"})
    assert status == 200 and body["error"]["code"] == -32601


async def test_a_leg_past_its_timeout_is_left_out() -> None:
    """fan_out cancels a leg at its timeout and names the server with reason timeout."""
    never = asyncio.Event()

    async def leg(server: str) -> str:
        if server == "slow":
            await never.wait()
        return server

    fan = await fan_out(["fast", "slow"], leg, leg_timeout=0.05, method="tools/list")
    assert fan.answers == {"fast": "fast"}
    assert fan.unavailable == {"slow": "timeout"}
