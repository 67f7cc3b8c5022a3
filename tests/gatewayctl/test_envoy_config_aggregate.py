"""The aggregate endpoint in the rendered Envoy config: routes on /mcp and /mcp/<virtual> picked by
ext_authz's x-mcp-route, the aggregator cluster, the inner listener, the Lua filter and the
"server unavailable" local reply; `envoy --mode validate` accepts every variant; and the Lua
filter's byte work checked through a real Envoy in front of a stand-in upstream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.config import DEFAULT_CONFIG_PATH, GatewayConfig, Instance, parse_config
from gateway.wire import (
    AGGREGATE_HEADERS,
    AGGREGATOR_ROUTE,
    ID_JSON_HEADER,
    REWRITE_AT_HEADER,
    REWRITE_LEN_HEADER,
    REWRITE_TO_HEADER,
    ROUTE_HEADER,
)
from gatewayctl.envoy_config import RenderOptions, find_envoy, render
from tests.gatewayctl.test_envoy_config import (
    REPO,
    Certs,
    certs,  # noqa: F401  (the fixture)
    clusters,
    filters,
    hcm,
    routes,
    validate_text,
    with_certs,
)
from tests.ports import free_ports

LUA_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute"
READY_TIMEOUT = 30.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15)


def aggregate_config(*, virtual: bool = True, transport: str = "http") -> GatewayConfig:
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["ext_authz"]["transport"] = transport
    if virtual:
        raw["virtual_servers"] = {
            "readonly": {"tools": ["files/read_*", "database/list_tables"]},
            "ops": {"tools": ["time/*"], "description": "Operations"}}
    return parse_config(raw, base_dir=REPO, source=str(DEFAULT_CONFIG_PATH))


def without_aggregate() -> GatewayConfig:
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    del raw["aggregate"]
    return parse_config(raw, base_dir=REPO, source=str(DEFAULT_CONFIG_PATH))


def rendered(config: GatewayConfig, *, ext_proc: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(render(config, RenderOptions(ext_proc=ext_proc)))
    return doc


# ----------------------------------------------------------------------------- structure

def test_fast_path_routes_are_the_server_routes_matched_by_ext_authz_header() -> None:
    """Each server gets an inspected and a plain route on /mcp and the virtual paths, selected by
    x-mcp-route: same cluster, upstream path, hash, retries and ext_proc switch as its own
    /mcp/<server> route; the Lua filter on; the upstream's session id never reaches the client."""
    doc = rendered(aggregate_config())
    by_name = routes(doc)
    for server in ("files", "time"):
        own = by_name[f"{server}_mcp"]
        plain, inspected = by_name[f"{server}_aggregate_mcp"], by_name[f"{server}_aggregate_mcp_inspected"]
        assert plain["match"]["safe_regex"]["regex"] == "/mcp(/(readonly|ops))?"
        assert plain["match"]["headers"] == [{"name": ROUTE_HEADER, "string_match": {"exact": server}}]
        assert [h["name"] for h in inspected["match"]["headers"]] == [ROUTE_HEADER, "x-mcp-inspect"]
        for route in (plain, inspected):
            assert route["route"]["cluster"] == own["route"]["cluster"] == f"mcp_{server}"
            assert route["route"]["regex_rewrite"] == {"pattern": {"regex": "^/mcp.*"},
                                                       "substitution": "/mcp"}
            for key in ("hash_policy", "retry_policy", "timeout", "idle_timeout"):
                assert route["route"][key] == own["route"][key]
            assert route["response_headers_to_remove"] == ["mcp-session-id"]
            assert {"authorization", ROUTE_HEADER} <= set(route["request_headers_to_remove"])
            lua = route["typed_per_filter_config"]["envoy.filters.http.lua"]
            assert lua == {"@type": LUA_PER_ROUTE, "name": "aggregate"}
        assert plain["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["disabled"] is True
        assert inspected["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["disabled"] is False
        # The per-server route itself has no Lua and no header match on x-mcp-route.
        assert "envoy.filters.http.lua" not in own["typed_per_filter_config"]
        assert own["match"]["path"] == f"/mcp/{server}"


def test_route_order_sends_the_rest_to_the_aggregator_and_refuses_undecided() -> None:
    """After the per-server routes: the fast path, then x-mcp-route: _aggregator to the
    aggregator (Authorization kept for its legs, no session affinity, no ext_proc), then a
    refusal for a request ext_authz gave no route decision."""
    doc = rendered(aggregate_config(virtual=False))
    names = list(routes(doc))
    assert names.index("files_mcp") < names.index("files_aggregate_mcp_inspected") \
        < names.index("files_aggregate_mcp") < names.index("aggregate_aggregator") \
        < names.index("aggregate_undecided") < names.index("not_found")
    agg = routes(doc)["aggregate_aggregator"]
    assert agg["match"] == {"path": "/mcp", "headers": [
        {"name": ROUTE_HEADER, "string_match": {"exact": AGGREGATOR_ROUTE}}]}
    assert agg["route"]["cluster"] == "aggregator"
    assert "authorization" not in agg.get("request_headers_to_remove", [])
    per_filter = agg["typed_per_filter_config"]
    assert per_filter["envoy.filters.http.stateful_session"]["disabled"] is True
    assert per_filter["envoy.filters.http.ext_proc"]["disabled"] is True
    assert per_filter["envoy.filters.http.lua"] == {"@type": LUA_PER_ROUTE, "disabled": True}
    assert routes(doc)["files_aggregate_mcp"]["route"]["prefix_rewrite"] == "/mcp"
    undecided = routes(doc)["aggregate_undecided"]
    assert undecided["match"] == {"path": "/mcp"} and undecided["direct_response"]["status"] == 503
    # Envoy builds the filter chain from this first match: Lua and ext_proc (off by default) are
    # named there as plain per-route configs, so they join the chain and read the config of the
    # route ext_authz selects. ext_authz itself runs there.
    per_filter = undecided["typed_per_filter_config"]
    assert set(per_filter) == {"envoy.filters.http.lua", "envoy.filters.http.ext_proc"}
    assert all(c["disabled"] is True and "FilterConfig" not in c["@type"] for c in per_filter.values())


def test_aggregator_cluster_inner_listener_and_metadata() -> None:
    """The aggregator cluster checks /ready; the inner listener is plain HTTP on its address
    with the edge listener's very filters; /mcp and each virtual server publish RFC 9728
    metadata naming their own resource."""
    config = aggregate_config()
    doc = rendered(config)
    cluster = clusters(doc)["aggregator"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9301}
    assert cluster["health_checks"][0]["http_health_check"] == {"path": "/ready"}
    edge, *rest = doc["static_resources"]["listeners"]
    (inner,) = [listener for listener in rest if listener["name"] == "mcp_gateway_inner"]
    assert inner["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9300}
    assert "transport_socket" not in inner["filter_chains"][0]
    assert inner["filter_chains"][0]["filters"] == edge["filter_chains"][0]["filters"]
    by_name = routes(doc)
    meta = json.loads(by_name["aggregate_resource_metadata"]["direct_response"]["body"]["inline_string"])
    assert meta["resource"] == "https://127.0.0.1:8443/mcp"
    assert by_name["aggregate_resource_metadata"]["match"] == {
        "path": "/.well-known/oauth-protected-resource/mcp"}
    ops = json.loads(by_name["aggregate_ops_resource_metadata"]["direct_response"]["body"]["inline_string"])
    assert ops["resource"] == "https://127.0.0.1:8443/mcp/ops" and ops["resource_name"] == "Operations"
    assert ops["scopes_supported"] == ["tools:call:time/*"]


def test_edge_strips_client_copies_and_ext_authz_may_set_session_headers() -> None:
    """A client's x-mcp-route or rewrite headers never survive the edge; ext_authz's HTTP answer
    may set mcp-session-id and mcp-name (the upstream session and the real name)."""
    doc = rendered(aggregate_config())
    scrub = filters(doc)["envoy.filters.http.header_mutation"]["typed_config"]["mutations"]
    removed = {m["remove"] for m in scrub["request_mutations"]}
    assert set(AGGREGATE_HEADERS) <= removed
    authz = filters(doc)["envoy.filters.http.ext_authz"]["typed_config"]["http_service"]
    patterns = authz["authorization_response"]["allowed_upstream_headers"]["patterns"]
    assert {"exact": "mcp-session-id"} in patterns and {"exact": "mcp-name"} in patterns
    names = [f["name"] for f in hcm(doc)["http_filters"]]
    assert names.index("envoy.filters.http.ext_proc") < names.index("envoy.filters.http.lua") \
        < names.index("envoy.filters.http.router")
    assert filters(doc)["envoy.filters.http.lua"]["disabled"] is True
    mappers = hcm(doc)["local_reply_config"]["mappers"]
    assert "and_filter" in mappers[0]["filter"] and len(mappers) == 6  # + ext_authz HTTP's five


def test_off_renders_nothing_of_it() -> None:
    """Without an aggregate: section the config has no /mcp route, Lua, inner listener or
    aggregator cluster, and the per-server routes are the same as with it."""
    off, on = rendered(without_aggregate()), rendered(aggregate_config(virtual=False))
    assert "aggregator" not in clusters(off) and "envoy.filters.http.lua" not in filters(off)
    assert [listener["name"] for listener in off["static_resources"]["listeners"]] == ["mcp_gateway_https"]
    assert not [n for n in routes(off) if "aggregate" in n]
    for name, route in routes(off).items():
        assert routes(on)[name] == route
    authz = filters(off)["envoy.filters.http.ext_authz"]["typed_config"]["http_service"]
    assert authz["authorization_response"]["allowed_upstream_headers"]["patterns"] == [{"prefix": "x-"}]


@pytest.mark.parametrize(("transport", "ext_proc", "virtual"), [
    ("http", True, True), ("grpc", True, False), ("http", False, False), ("grpc", False, True)])
def test_rendered_variants_pass_envoy_validate(transport: str, ext_proc: bool, virtual: bool,
                                               certs: Certs, tmp_path: Path) -> None:  # noqa: F811
    """The real Envoy accepts the aggregate endpoint in every transport / ext_proc / virtual mix."""
    config = with_certs(aggregate_config(virtual=virtual, transport=transport), certs)
    validate_text(render(config, RenderOptions(ext_proc=ext_proc)), tmp_path)


# ------------------------------------------------------- the Lua filter through a real Envoy

STANDIN_ENVOY = """
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: main
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm}
          stat_prefix: lua
          local_reply_config: {{mappers: [{mapper}]}}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /down}}
                route: {{cluster: down, timeout: 10s}}
                typed_per_filter_config: {{envoy.filters.http.lua: {lua_on}}}
              - match: {{prefix: /}}
                route: {{cluster: upstream, timeout: 10s}}
                typed_per_filter_config: {{envoy.filters.http.lua: {lua_on}}}
          http_filters:
          - {lua}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - {upstream}
  - {down}
"""


def _cluster(name: str, port: int) -> str:
    return json.dumps({
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}})


@dataclasses.dataclass
class LuaStack:
    url: str
    seen: list[tuple[bytes, dict[str, str]]]


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    request.app[SEEN].append((body, dict(request.headers)))
    return web.Response(body=body, content_type="application/json")


async def _stream(request: web.Request) -> web.StreamResponse:
    """Writes the chunks the test posted (JSON list of strings) as one SSE answer, each on its own."""
    chunks: list[str] = json.loads(await request.read())
    resp = web.StreamResponse(headers={"content-type": request.query.get("type", "text/event-stream")})
    await resp.prepare(request)
    for chunk in chunks:
        await resp.write(chunk.encode())
        await asyncio.sleep(0)  # yield so each part is flushed on its own
    await resp.write_eof()
    return resp


SEEN = web.AppKey("seen", list[tuple[bytes, dict[str, str]]])


async def _wait_ready(admin_file: Path, proc: subprocess.Popen[bytes], log: Path) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while loop.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"envoy exited: {log.read_text()[-3000:]}")
            admin = admin_file.read_text().strip() if admin_file.exists() else ""
            if admin:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://{admin}/listeners?format=json") as resp:
                        data = await resp.json()
                    addr = data["listener_statuses"][0]["local_address"]["socket_address"]
                    async with http.get(f"http://{admin}/ready") as ready:
                        if ready.status == 200 and addr.get("port_value"):
                            return f"http://127.0.0.1:{addr['port_value']}"
            await asyncio.sleep(0.05)  # polling interval, bounded by the deadline
    raise AssertionError(f"envoy not ready in {READY_TIMEOUT}s: {log.read_text()[-3000:]}")


@pytest.fixture
async def lua_stack(tmp_path: Path) -> AsyncIterator[LuaStack]:
    """A real Envoy with the rendered Lua filter and local-reply mapper before a stand-in upstream
    (and a cluster nobody listens on)."""
    doc = rendered(aggregate_config(virtual=False))
    lua_filter = filters(doc)["envoy.filters.http.lua"]
    lua_filter = {k: v for k, v in lua_filter.items() if k != "disabled"}
    lua_on = routes(doc)["files_aggregate_mcp"]["typed_per_filter_config"]["envoy.filters.http.lua"]
    mapper = hcm(doc)["local_reply_config"]["mappers"][0]

    app = web.Application()
    app[SEEN] = []
    app.router.add_post("/echo", _echo)
    app.router.add_post("/stream", _stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    (dead_port,) = free_ports(1)
    config = tmp_path / "envoy.yaml"
    config.write_text(STANDIN_ENVOY.format(
        hcm="type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
            ".HttpConnectionManager",
        mapper=json.dumps(mapper), lua_on=json.dumps(lua_on), lua=json.dumps(lua_filter),
        upstream=_cluster("upstream", runner.addresses[0][1]), down=_cluster("down", dead_port)),
        encoding="utf-8")
    admin_file, log = tmp_path / "admin.txt", tmp_path / "envoy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(find_envoy()), "-c", str(config), "--use-dynamic-base-id", "--admin-address-path",
             str(admin_file), "--log-level", "warn", "--concurrency", "1"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        yield LuaStack(await _wait_ready(admin_file, proc, log), app[SEEN])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        await runner.cleanup()


async def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as http, \
            http.post(url, data=body, headers={"content-type": "application/json", **headers}) as resp:
        return resp.status, resp.headers.get("content-type", ""), await resp.read()


def _rewrite(body: bytes, exposed: str, real: str, nth: int) -> dict[str, str]:
    """ext_authz's instruction: replace the nth occurrence of the JSON string ``exposed``."""
    literal = json.dumps(exposed).encode()
    at = -1
    for _ in range(nth):
        at = body.index(literal, at + 1)
    return {ROUTE_HEADER: "files", REWRITE_AT_HEADER: str(at), REWRITE_LEN_HEADER: str(len(literal)),
            REWRITE_TO_HEADER: json.dumps(real), ID_JSON_HEADER: "7"}


async def test_request_rewrite_changes_only_the_checked_bytes(lua_stack: LuaStack) -> None:
    """The name at the checked offset is replaced; an argument holding the same text before it is
    left intact; Content-Length follows; the instruction headers do not reach the upstream."""
    body = (b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"arguments":'
            b'{"path":"files__read_file"},"name":"files__read_file"}}')
    status, _, echoed = await _post(lua_stack.url + "/echo", body,
                                    _rewrite(body, "files__read_file", "read_file", 2))
    assert status == 200
    assert json.loads(echoed)["params"] == {"arguments": {"path": "files__read_file"}, "name": "read_file"}
    received, headers = lua_stack.seen[-1]
    assert int(headers["Content-Length"]) == len(received)
    lowered = {k.lower() for k in headers}
    assert not lowered & {REWRITE_AT_HEADER, REWRITE_LEN_HEADER, REWRITE_TO_HEADER, ID_JSON_HEADER}


async def test_an_instruction_outside_the_body_is_refused(lua_stack: LuaStack) -> None:
    """An offset past the body's end never forwards anything: 400, the upstream not called."""
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"files__x"}}'
    before = len(lua_stack.seen)
    headers = {**_rewrite(body, "files__x", "x", 1), REWRITE_AT_HEADER: str(len(body))}
    status, _, answer = await _post(lua_stack.url + "/echo", body, headers)
    assert status == 400 and json.loads(answer)["error"]["code"] == -32600
    assert len(lua_stack.seen) == before


def _event(message: dict[str, Any]) -> str:
    return f"event: message\ndata: {json.dumps(message, separators=(',', ':'))}\n\n"


async def test_sse_request_ids_get_the_server_prefix_across_chunks(lua_stack: LuaStack) -> None:
    """Server-to-client requests get "<server>__n:<int>" / "<server>__s:<str>" ids, also when the
    event arrives in pieces; notifications, results and "method"/"id" keys inside tool output
    are left alone."""
    note = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
    ask_int = {"jsonrpc": "2.0", "id": 3, "method": "elicitation/create",
               "params": {"message": "ok?", "requestedSchema": {"type": "object", "properties": {}}}}
    ask_str = {"params": {"id": 99, "method": "nested"}, "method": "sampling/createMessage",
               "id": "srv-1", "jsonrpc": "2.0"}
    result = {"jsonrpc": "2.0", "id": 7, "result": {
        "content": [{"type": "text", "text": '{"method":"x","id":1}'}],
        "structuredContent": {"method": "m", "id": 5}}}
    text = _event(note) + _event(ask_int) + _event(ask_str) + _event(result)
    cut1 = text.index('"id":3') + 3  # inside the int id's event
    cut2 = text.index("srv-1") + 2   # inside the string id itself
    chunks = [text[:cut1], text[cut1:cut2], text[cut2:]]
    status, kind, answer = await _post(lua_stack.url + "/stream", json.dumps(chunks).encode(),
                                       {ROUTE_HEADER: "files", ID_JSON_HEADER: "7"})
    assert status == 200 and kind.startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in answer.decode().split("\n") if line.startswith("data: ")]
    assert events == [note, {**ask_int, "id": "files__n:3"}, {**ask_str, "id": "files__s:srv-1"}, result]
    assert answer.count(b"\n\n") == 4


@pytest.mark.parametrize("size", [1, 3, 17])
async def test_sse_events_cut_into_small_pieces(lua_stack: LuaStack, size: int) -> None:
    """Events with CRLF line ends cut into pieces of a few bytes (every cut position, including
    inside the blank line) come out whole, ids prefixed, in order."""
    asks = [{"jsonrpc": "2.0", "id": i, "method": "roots/list"} for i in range(3)]
    text = "".join(_event(a).replace("\n", "\r\n") for a in asks)
    chunks = [text[i:i + size] for i in range(0, len(text), size)]
    _, _, answer = await _post(lua_stack.url + "/stream", json.dumps(chunks).encode(),
                               {ROUTE_HEADER: "files"})
    events = [json.loads(line[6:]) for line in answer.decode().split("\r\n") if line.startswith("data: ")]
    assert events == [{**a, "id": f"files__n:{a['id']}"} for a in asks]
    assert answer.count(b"\r\n\r\n") == 3


async def test_json_answers_and_unrouted_requests_are_left_alone(lua_stack: LuaStack) -> None:
    """A JSON answer (which carries no server request) and a request without x-mcp-route pass
    byte for byte."""
    message = _event({"jsonrpc": "2.0", "id": 3, "method": "elicitation/create"})
    chunks = json.dumps([message]).encode()
    _, _, as_json = await _post(lua_stack.url + "/stream?type=application/json", chunks,
                                {ROUTE_HEADER: "files"})
    assert as_json == message.encode()
    _, _, unrouted = await _post(lua_stack.url + "/stream", chunks, {})
    assert unrouted == message.encode()


async def test_a_down_server_gets_a_json_rpc_error_naming_it(lua_stack: LuaStack) -> None:
    """A routed call whose server refuses connections: 200 with a JSON-RPC error carrying the
    client's id (string kept a string) and the server's name."""
    status, kind, answer = await _post(lua_stack.url + "/down", b'{"jsonrpc":"2.0","id":"a1"}',
                                       {ROUTE_HEADER: "down", ID_JSON_HEADER: '"a1"'})
    assert status == 200 and kind == "application/json"
    error = json.loads(answer)
    assert error["id"] == "a1" and error["error"]["code"] == -32603
    assert error["error"]["data"] == {"server": "down"} and "down" in error["error"]["message"]


def test_free_ports_for_inner_listener_do_not_clash() -> None:
    """An inner listener on the aggregator's own port is refused at load time."""
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["aggregate"]["inner_listener"] = {"port": 9301}
    with pytest.raises(ValueError, match="aggregate.inner_listener and aggregate.instances"):
        parse_config(raw, base_dir=REPO)
    assert Instance("127.0.0.1", 9301) in aggregate_config().aggregate.instances
