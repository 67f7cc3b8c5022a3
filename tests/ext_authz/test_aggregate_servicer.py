"""The aggregate endpoints through the servicer, fed captured Envoy CheckRequests: a call on
``/mcp`` is governed with the real server and tool exactly as on ``/mcp/<server>``, routed by
headers only ext_authz sets, and its sealed session id is checked like any session."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as pb

from ext_authz.http_front import answer, read_request
from ext_authz.response import Verdict
from ext_authz.sessions import MemorySessionStore, SessionBinder
from ext_authz.settings import Settings
from gateway.aggregate.session_token import (
    AggregateSession,
    SessionSealer,
    late_join_key,
)
from gateway.aggregate.views import aggregate_view, virtual_view
from gateway.errors import INVALID_PARAMS, PARSE_ERROR, RATE_LIMITED, SESSION_NOT_FOUND
from gateway.wire import (
    AGGREGATE_HEADERS,
    AGGREGATOR_ROUTE,
    ID_JSON_HEADER,
    REMOVE_HEADER,
    REWRITE_AT_HEADER,
    REWRITE_LEN_HEADER,
    REWRITE_TO_HEADER,
    ROUTE_HEADER,
    VIEW_HEADER,
)
from gatewayctl.tokens import SigningKey
from tests.ext_authz.conftest import (
    ISSUER,
    PUBLIC_URL,
    Harness,
    JwksServer,
    StubEngine,
    build,
    check_request,
    denial,
    make_settings,
    token_for,
    upstream,
)

KEY_OLD, KEY = bytes([7]) * 32, bytes([9]) * 32
SERVERS = ("files", "database")
AUDIENCES = [f"{PUBLIC_URL}/mcp/files", f"{PUBLIC_URL}/mcp/database", f"{PUBLIC_URL}/mcp",
             f"{PUBLIC_URL}/mcp/ro"]
UPSTREAM_SID = "up-files-1"
ARGS = {"path": "/srv/files/reports/q3.txt"}


def aggregate_settings(jwks_url: str, keys: tuple[bytes, ...] = (KEY,), **sections: Any) -> Settings:
    settings = make_settings(jwks_url, issuers=[{"issuer": ISSUER, "jwks_url": jwks_url,
                                                 "audiences": AUDIENCES}], **sections)
    views = {"": aggregate_view(SERVERS), "ro": virtual_view("ro", ["files/read_*"], SERVERS)}
    return dataclasses.replace(settings, views=views, session_keys=keys)


@pytest.fixture
def authz(jwks_server: JwksServer, session: aiohttp.ClientSession) -> Harness:
    return build(aggregate_settings(jwks_server.url), session, StubEngine(deny_tools={"delete_file"}))


@pytest.fixture
def agg_token(rsa_key: SigningKey) -> str:
    return token_for(rsa_key, audience=f"{PUBLIC_URL}/mcp")


def sealed(sub: str = "alice", *, view: str = "", ups: dict[str, str] | None = None,
           key: bytes = KEY, tenant: str | None = "acme") -> str:
    return SessionSealer([key]).seal(AggregateSession(
        issuer=ISSUER, subject=sub, tenant=tenant, view=view, protocol_version="2025-11-25",
        upstream={"files": UPSTREAM_SID} if ups is None else ups, issued_at=1))


def call(name: str, args: dict[str, Any] | None = None, rid: Any = 7) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call",
                         "params": {"name": name, "arguments": ARGS if args is None else args}})


def on_mcp(token: str, body: bytes, *, path: str = "/mcp", sid: str | None = None,
           headers: dict[str, str] | None = None) -> pb.CheckRequest:
    """The captured tools/call CheckRequest, sent to an aggregate path."""
    extra = dict(headers or {})
    req = check_request("post_tools_call_files", token, headers=extra, body=body, path=path)
    http_headers = req.attributes.request.http.headers
    if sid is None:
        del http_headers["mcp-session-id"]
    else:
        http_headers["mcp-session-id"] = sid
    return req


def rewritten(req: pb.CheckRequest, headers: dict[str, str]) -> dict[str, Any]:
    """The body as Envoy's Lua filter forwards it, from the rewrite headers."""
    body = req.attributes.request.http.raw_body
    at, length = int(headers[REWRITE_AT_HEADER]), int(headers[REWRITE_LEN_HEADER])
    out: dict[str, Any] = orjson.loads(body[:at] + headers[REWRITE_TO_HEADER].encode() + body[at + length:])
    return out


async def test_call_is_routed_to_the_real_server_with_a_checked_rewrite(
        authz: Harness, agg_token: str) -> None:
    """files__read_file on /mcp: routed to files, the body rewritten to read_file, the
    upstream's own session id, identity headers for read_file, the token removed."""
    req = on_mcp(agg_token, call("files__read_file"), sid=sealed())
    headers, removed = upstream(await authz.check(req))
    assert headers[ROUTE_HEADER] == "files" and headers["x-mcp-tool"] == "read_file"
    assert rewritten(req, headers) == orjson.loads(call("read_file"))
    assert headers[ID_JSON_HEADER] == "7" and headers["mcp-session-id"] == UPSTREAM_SID
    assert headers["x-mcp-user"] == "alice"
    assert "authorization" in removed and not set(headers) & set(removed)
    doc = authz.engine.inputs[-1]
    assert doc["server"] == {"name": "files", "resource": f"{PUBLIC_URL}/mcp/files"}
    assert doc["mcp"]["via"] == "aggregate" and doc["mcp"]["exposed_name"] == "files__read_file"


def _comparable(doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc["mcp"].pop("via")
    doc["mcp"].pop("exposed_name")
    doc.pop("now")
    return doc


def _http_check(authz: Harness, req: pb.CheckRequest) -> Callable[[], Any]:
    """The same request through Envoy's HTTP mode (http_front.read_request -> decide)."""
    http = req.attributes.request.http
    headers = [(k, v) for k, v in http.headers.items() if not k.startswith(":")]
    headers.append(("x-request-id", http.id))

    async def run() -> Verdict:
        request = read_request(http.method, http.path, headers, http.raw_body)
        request = dataclasses.replace(request, id=http.id, host=http.host, scheme=http.scheme,
                                      source_address="127.0.0.1")
        return await authz.servicer.decide(request, {})
    return run


@pytest.mark.parametrize("transport", ["grpc", "http"])
@pytest.mark.parametrize("modern", [False, True])
async def test_policy_input_is_the_per_server_one_except_via(
        authz: Harness, rsa_key: SigningKey, transport: str, modern: bool) -> None:
    """The policy decides on the same document for files__read_file on /mcp as for read_file
    on /mcp/files (path, body, Mcp-Name, session id, server, session owner), except ``via``
    and ``exposed_name``: one rule governs both."""
    # One token (for /mcp, accepted on /mcp/files too), so that even input.token is equal.
    agg = token_for(rsa_key, audience=f"{PUBLIC_URL}/mcp")
    extra = {"mcp-method": "tools/call"}
    direct = check_request("post_tools_call_files", agg, body=call("read_file"),
                           headers={**extra, "mcp-name": "read_file",
                                    "mcp-session-id": UPSTREAM_SID})
    via_mcp = on_mcp(agg, call("files__read_file"), sid=sealed(),
                     headers={**extra, "mcp-name": "files__read_file"})
    if modern:  # 2026-07-28: no sessions, Mcp-Name required
        for req in (direct, via_mcp):
            del req.attributes.request.http.headers["mcp-session-id"]
            req.attributes.request.http.headers["mcp-protocol-version"] = "2026-07-28"
    for req in (direct, via_mcp):
        if transport == "grpc":
            upstream(await authz.check(req))
        else:
            verdict = await _http_check(authz, req)()
            assert verdict.ok, verdict
    first, second = authz.engine.inputs[-2:]
    assert first["mcp"]["via"] == "direct" and first["mcp"]["exposed_name"] is None
    assert second["mcp"]["via"] == "aggregate"
    assert _comparable(first) == _comparable(second)
    assert second["attributes"]["request"]["http"]["path"] == "/mcp/files"
    assert second["parsed_body"]["params"]["name"] == "read_file"


async def test_http_transport_sets_routing_and_keeps_the_token_for_the_aggregator(
        authz: Harness, agg_token: str) -> None:
    """Over Envoy's HTTP mode: the fast path's headers are set and the token removed; a
    request for the aggregator keeps the token (it calls Envoy again with it)."""
    req = on_mcp(agg_token, call("files__read_file"), sid=sealed())
    resp = answer(await _http_check(authz, req)())
    assert resp.status == 200 and resp.headers[ROUTE_HEADER] == "files"
    assert resp.headers["mcp-session-id"] == UPSTREAM_SID
    assert "authorization" in resp.headers[REMOVE_HEADER].split(",")
    listing = on_mcp(agg_token, orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
                     sid=sealed())
    resp = answer(await _http_check(authz, listing)())
    removed = resp.headers[REMOVE_HEADER].split(",")
    assert resp.headers[ROUTE_HEADER] == AGGREGATOR_ROUTE and "authorization" not in removed
    assert set(removed) >= {REWRITE_AT_HEADER, REWRITE_LEN_HEADER, REWRITE_TO_HEADER, ID_JSON_HEADER}


@pytest.mark.parametrize("body", [
    call("files__read_file"),
    orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
])
async def test_client_supplied_route_and_rewrite_headers_are_overwritten(
        authz: Harness, agg_token: str, body: bytes) -> None:
    """A client's x-mcp-route never routes, and its rewrite headers never reach Envoy's Lua."""
    forged = {ROUTE_HEADER: "database", REWRITE_AT_HEADER: "0", REWRITE_LEN_HEADER: "1",
              REWRITE_TO_HEADER: '"x"', ID_JSON_HEADER: "1"}
    req = on_mcp(agg_token, body, sid=sealed(), headers=forged)
    headers, removed = upstream(await authz.check(req))
    assert headers[ROUTE_HEADER] in ("files", AGGREGATOR_ROUTE)
    for name in AGGREGATE_HEADERS:
        assert name in removed or headers[name] != forged[name]


async def test_decoy_argument_survives_and_escaped_name_is_refused(
        authz: Harness, agg_token: str) -> None:
    """An argument equal to the exposed name, before it, reaches the server unchanged; an
    escaped name is -32602 with a clear message; duplicate keys are a parse error."""
    body = (b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"arguments":'
            b'{"path":"files__read_file"},"name":"files__read_file"}}')
    req = on_mcp(agg_token, body, sid=sealed())
    headers, _ = upstream(await authz.check(req))
    assert rewritten(req, headers)["params"] == {"arguments": {"path": "files__read_file"},
                                                 "name": "read_file"}
    assert authz.engine.inputs[-1]["mcp"]["arguments"] == {"path": "files__read_file"}
    escaped = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"files__read\\u005ffile"}}'
    status, _, err = denial(await authz.check(on_mcp(agg_token, escaped, sid=sealed())))
    assert status == 400 and err["error"]["code"] == INVALID_PARAMS and err["id"] == 7
    assert "plain JSON string" in err["error"]["message"]
    dup = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"files__read_file",' \
          b'"name":"database__drop"}}'
    status, _, err = denial(await authz.check(on_mcp(agg_token, dup, sid=sealed())))
    assert status == 400 and err["error"]["code"] == PARSE_ERROR


@pytest.mark.parametrize(("path", "name"), [("/mcp", "nosuch__read_file"), ("/mcp/ro", "files__write_file")])
async def test_unknown_server_or_tool_outside_the_view_is_invalid_params(
        authz: Harness, agg_token: str, path: str, name: str) -> None:
    """An unknown server prefix, or a tool outside a virtual server: -32602 naming the name."""
    sid = sealed(view="ro" if path == "/mcp/ro" else "")
    status, _, err = denial(await authz.check(on_mcp(agg_token, call(name), path=path, sid=sid)))
    assert status == 400 and err["error"]["code"] == INVALID_PARAMS
    assert name in err["error"]["message"] and err["error"]["data"]["name"] == name
    assert authz.engine.inputs == []


async def test_virtual_server_routes_its_tools_with_its_via(authz: Harness, rsa_key: SigningKey) -> None:
    """/mcp/ro accepts its own token (and /mcp's), and the policy sees via virtual:ro."""
    for audience in (f"{PUBLIC_URL}/mcp/ro", f"{PUBLIC_URL}/mcp"):
        token = token_for(rsa_key, audience=audience)
        headers, _ = upstream(await authz.check(on_mcp(token, call("files__read_file"),
                                                       path="/mcp/ro", sid=sealed(view="ro"))))
        assert headers[ROUTE_HEADER] == "files"
        assert authz.engine.inputs[-1]["mcp"]["via"] == "virtual:ro"


def _altered(sid: str) -> str:
    i = len(sid) // 2
    return sid[:i] + ("A" if sid[i] != "A" else "B") + sid[i + 1:]


@pytest.mark.parametrize("case", ["altered", "other_owner", "other_view", "foreign_key", "garbage"])
async def test_session_that_is_not_the_callers_does_not_exist(
        authz: Harness, agg_token: str, case: str) -> None:
    """Altered, another subject's, another view's, another gateway's or no token at all: 404."""
    sid = {"altered": _altered(sealed()), "other_owner": sealed("bob"),
           "other_view": sealed(view="ro"), "foreign_key": sealed(key=bytes([1]) * 32),
           "garbage": "3f1c2d9e8b7a4c56"}[case]
    status, _, err = denial(await authz.check(on_mcp(agg_token, call("files__read_file"), sid=sid)))
    assert status == 404 and err["error"]["code"] == SESSION_NOT_FOUND
    assert authz.engine.inputs == []


async def test_ended_session_is_404_on_both_paths(authz: Harness, agg_token: str) -> None:
    """DELETE (for the aggregator) ends the aggregate id: calls and lists answer 404 after."""
    sid = sealed()
    upstream(await authz.check(on_mcp(agg_token, call("files__read_file"), sid=sid)))
    delete = check_request("delete_session", agg_token, path="/mcp",
                           headers={"mcp-session-id": sid})
    headers, removed = upstream(await authz.check(delete))
    assert headers[ROUTE_HEADER] == AGGREGATOR_ROUTE and "authorization" not in removed
    status, _, err = denial(await authz.check(on_mcp(agg_token, call("files__read_file"), sid=sid)))
    assert status == 404 and err["error"]["code"] == SESSION_NOT_FOUND
    listing = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    status, _, _ = denial(await authz.check(on_mcp(agg_token, listing, sid=sid)))
    assert status == 404


async def test_key_rotation_keeps_sessions(jwks_server: JwksServer, session: aiohttp.ClientSession,
                                           agg_token: str) -> None:
    """A ring with a new key first still opens ids sealed with the old one; without it, 404."""
    rotated = build(aggregate_settings(jwks_server.url, keys=(KEY, KEY_OLD)), session, StubEngine())
    upstream(await rotated.check(on_mcp(agg_token, call("files__read_file"), sid=sealed(key=KEY_OLD))))
    retired = build(aggregate_settings(jwks_server.url, keys=(KEY,)), session, StubEngine())
    status, _, _ = denial(await retired.check(on_mcp(agg_token, call("files__read_file"),
                                                     sid=sealed(key=KEY_OLD))))
    assert status == 404


@pytest.mark.parametrize(("rid", "upstream_id"), [("files__s:abc", "abc"), ("files__n:3", 3)])
async def test_answer_to_a_server_request_is_routed_with_its_own_id(
        authz: Harness, agg_token: str, rid: str, upstream_id: str | int) -> None:
    """The client's answer to files__s:abc goes to files with the id "abc"."""
    body = orjson.dumps({"jsonrpc": "2.0", "id": rid, "result": {"action": "accept", "content": {}}})
    req = on_mcp(agg_token, body, sid=sealed())
    headers, removed = upstream(await authz.check(req))
    assert headers[ROUTE_HEADER] == "files" and headers["mcp-session-id"] == UPSTREAM_SID
    assert rewritten(req, headers)["id"] == upstream_id and ID_JSON_HEADER in removed
    assert authz.engine.inputs[-1]["mcp"]["kind"] == "response"
    assert authz.engine.inputs[-1]["parsed_body"]["id"] == upstream_id


async def test_mcp_name_is_rewritten_for_the_server(authz: Harness, rsa_key: SigningKey) -> None:
    """A 2026 client's Mcp-Name names the exposed tool; the server gets its own name."""
    token = token_for(rsa_key, audience=f"{PUBLIC_URL}/mcp")
    req = on_mcp(token, call("files__read_file"), headers={
        "mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call",
        "mcp-name": "files__read_file"})
    headers, _ = upstream(await authz.check(req))
    assert headers["mcp-name"] == "read_file" and "mcp-session-id" not in headers
    wrong = on_mcp(token, call("files__read_file"), headers={
        "mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "mcp-name": "read_file"})
    status, _, _ = denial(await authz.check(wrong))
    assert status == 400  # Mcp-Name must match what the client's body says


async def test_rate_limit_and_catalog_use_the_real_pair(
        jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: SigningKey) -> None:
    """The per-tool bucket of files/read_file is the same on /mcp and /mcp/files, and the
    catalog is asked about (files, read_file)."""
    settings = aggregate_settings(jwks_server.url, rate_limits={
        "per_user": None, "per_tool": {"rate_per_second": 0.01, "burst": 1}})
    asked: list[tuple[str, str, Any]] = []

    class Catalog:
        def check_call(self, server: str, tool: str, arguments: Any) -> None:
            asked.append((server, tool, arguments))

    authz = build(settings, session, StubEngine(), catalog=Catalog())  # type: ignore[arg-type]  # a recording stand-in
    token = token_for(rsa_key, audience=f"{PUBLIC_URL}/mcp")
    upstream(await authz.check(on_mcp(token, call("files__read_file"), sid=sealed())))
    assert asked == [("files", "read_file", ARGS)]
    direct = check_request("post_tools_call_files", token_for(rsa_key, sub="bob"))
    status, _, err = denial(await authz.check(direct))
    assert status == 429 and err["error"]["code"] == RATE_LIMITED


async def test_upstream_missing_from_the_session_uses_the_late_join_store(
        jwks_server: JwksServer, session: aiohttp.ClientSession, agg_token: str) -> None:
    """A server absent from the sealed id: its late-joined session id from the store, else a
    JSON-RPC error naming the server."""
    store = MemorySessionStore()
    authz = build(aggregate_settings(jwks_server.url), session, StubEngine())
    authz.servicer._sessions = SessionBinder(store)
    sid = sealed(ups={})
    status, _, err = denial(await authz.check(on_mcp(agg_token, call("files__read_file"), sid=sid)))
    assert status == 503 and err["error"]["data"]["server"] == "files"
    store.late_joins[late_join_key(sid, "files")] = "late-1"
    headers, _ = upstream(await authz.check(on_mcp(agg_token, call("files__read_file"), sid=sid)))
    assert headers["mcp-session-id"] == "late-1"


async def test_audiences(authz: Harness, rsa_key: SigningKey) -> None:
    """/mcp needs a /mcp token; /mcp/files takes its own or /mcp's; a virtual server's token
    works on /mcp/files only with x-mcp-view naming it, and only for the view's tools."""
    per_server = token_for(rsa_key)
    status, headers, _ = denial(await authz.check(on_mcp(per_server, call("files__read_file"))))
    assert status == 401 and "oauth-protected-resource/mcp\"" in headers["www-authenticate"]
    union = token_for(rsa_key, audience=f"{PUBLIC_URL}/mcp")
    upstream(await authz.check(check_request("post_tools_call_files", union)))
    ro = token_for(rsa_key, audience=f"{PUBLIC_URL}/mcp/ro")
    status, _, _ = denial(await authz.check(check_request("post_tools_call_files", ro)))
    assert status == 401
    upstream(await authz.check(check_request("post_tools_call_files", ro,
                                             headers={VIEW_HEADER: "ro", "mcp-session-id": "s-ro"})))
    write = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                          "params": {"name": "write_file", "arguments": {}}})
    status, _, err = denial(await authz.check(check_request(
        "post_tools_call_files", ro, body=write, headers={VIEW_HEADER: "ro", "mcp-session-id": "s-ro"})))
    assert status == 400 and err["error"]["code"] == INVALID_PARAMS
    db = check_request("post_tools_call_files", ro, path="/mcp/database",
                       headers={VIEW_HEADER: "ro", "mcp-session-id": "s-db"})
    status, _, _ = denial(await authz.check(db))
    assert status == 401  # the view holds no database tool


async def test_requests_for_the_aggregator_skip_the_policy(authz: Harness, agg_token: str) -> None:
    """initialize (no session yet) and lists go to the aggregator, undecided here: each of
    its calls to a server is decided on that server's route."""
    init = orjson.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    headers, removed = upstream(await authz.check(on_mcp(agg_token, init)))
    assert headers[ROUTE_HEADER] == AGGREGATOR_ROUTE and headers["x-mcp-user"] == "alice"
    assert "authorization" not in removed and "x-mcp-inspect" in removed
    assert authz.engine.inputs == []
    get = check_request("get_sse_stream", agg_token, path="/mcp", headers={"mcp-session-id": sealed()})
    headers, _ = upstream(await authz.check(get))
    assert headers[ROUTE_HEADER] == AGGREGATOR_ROUTE


async def test_aggregate_path_unserved_without_views(
        jwks_server: JwksServer, session: aiohttp.ClientSession, agg_token: str) -> None:
    """With the aggregate off, /mcp is an unknown path (404) as before."""
    plain = build(make_settings(jwks_server.url), session, StubEngine())
    status, _, _ = denial(await plain.check(on_mcp(agg_token, call("files__read_file"))))
    assert status == 404


def test_captured_request_is_json() -> None:
    """The helper builds CheckRequests whose body is the given JSON."""
    req = on_mcp("t", call("files__x"))
    assert json.loads(req.attributes.request.http.raw_body)["params"]["name"] == "files__x"
