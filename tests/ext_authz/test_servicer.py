"""The Authorization servicer fed captured Envoy CheckRequests, in-process."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf import json_format
from prometheus_client import REGISTRY

from ext_authz import servicer as servicer_module
from ext_authz.decision_log import LOGGER_NAME
from ext_authz.jwt import TokenVerifier
from ext_authz.servicer import AuthorizationServicer, new_decision_id
from gateway.errors import FORBIDDEN, HEADER_MISMATCH, PARSE_ERROR, RATE_LIMITED, UNAUTHORIZED
from gateway.jwks import JwksClient
from gateway.policy import facts as facts_module
from gateway.policy.sql import sql_facts
from gateway.telemetry import AuditWriter, args_digest, configure_logging, iter_audit
from gatewayctl.tokens import SigningKey
from tests.ext_authz.conftest import (
    ISSUER,
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

PRM_FILES = "https://gw.example.test/.well-known/oauth-protected-resource/mcp/files"


@pytest.fixture
def authz(jwks_server: JwksServer, session: aiohttp.ClientSession) -> Harness:
    return build(make_settings(jwks_server.url), session, StubEngine(deny_tools={"delete_file"}))


@pytest.fixture
def token(rsa_key: SigningKey) -> str:
    return token_for(rsa_key)


async def test_allowed_tools_call_sets_identity_and_strips_token(authz: Harness, token: str) -> None:
    """An allowed call overwrites identity headers, removes the token and unset identity headers."""
    headers, removed = upstream(await authz.check(check_request("post_tools_call_files", token)))
    assert headers["x-mcp-user"] == "alice"  # the client's own "x-mcp-user: mallory" is replaced
    assert headers["x-mcp-tenant"] == "acme"
    assert headers["x-mcp-roles"] == "analyst"
    assert headers["x-mcp-tool"] == "read_file"
    assert len(headers["x-mcp-decision-id"]) == 32
    assert "authorization" in removed and "x-mcp-client-id" in removed
    assert not set(headers) & set(removed)


async def test_policy_input_shape(authz: Harness, token: str) -> None:
    """The policy sees request attributes without credentials, the parsed body, mcp, token, server."""
    await authz.check(check_request("post_tools_call_files", token))
    doc = authz.engine.inputs[-1]
    http = doc["attributes"]["request"]["http"]
    assert http["method"] == "POST" and http["path"] == "/mcp/files"
    assert "authorization" not in http["headers"] and http["headers"]["x-mcp-user"] == "mallory"
    assert doc["attributes"]["source"]["address"] == "127.0.0.1"
    assert doc["parsed_body"]["params"]["arguments"] == {"path": "/srv/files/reports/q3.txt"}
    assert doc["mcp"]["method"] == "tools/call" and doc["mcp"]["tool"] == "read_file"
    assert doc["mcp"]["session_id"] == "3f1c2d9e8b7a4c56" and doc["mcp"]["id"] == 7
    assert doc["token"]["sub"] == "alice" and doc["token"]["scope"] == "tools:call:files/read_file"
    assert doc["server"] == {"name": "files", "resource": "https://gw.example.test/mcp/files"}
    assert isinstance(doc["now"], int)


async def test_missing_token_is_401_without_error_code(authz: Harness) -> None:
    """No token: 401, a challenge naming the PRM URL without error=, a JSON-RPC error echoing the id."""
    status, headers, body = denial(await authz.check(check_request("post_tools_list_no_token")))
    assert status == 401
    assert headers["www-authenticate"] == f'Bearer resource_metadata="{PRM_FILES}"'
    assert headers["content-type"] == "application/json"
    assert body["id"] == "a-1" and body["error"]["code"] == UNAUTHORIZED
    assert body["error"]["data"]["reason"] == "missing_token"


async def test_invalid_token_is_401_invalid_token(authz: Harness, rsa_key: SigningKey) -> None:
    """An expired token: 401 with error="invalid_token" and the request id echoed."""
    req = check_request("post_tools_call_files", token_for(rsa_key, ttl=-600))
    status, headers, body = denial(await authz.check(req))
    assert status == 401
    assert headers["www-authenticate"] == \
        f'Bearer resource_metadata="{PRM_FILES}", error="invalid_token"'
    assert body["id"] == 7 and body["error"]["data"]["reason"] == "token_expired"
    assert not authz.engine.inputs


async def test_token_for_other_server_is_401(authz: Harness, rsa_key: SigningKey) -> None:
    """A token whose audience is another MCP server is refused (RFC 8707)."""
    req = check_request("post_tools_call_files", token_for(rsa_key, server="database"))
    status, _, body = denial(await authz.check(req))
    assert status == 401 and body["error"]["data"]["reason"] == "invalid_audience"


async def test_token_in_query_string_refused(authz: Harness, token: str) -> None:
    """access_token in the URL is refused, even next to a valid Authorization header."""
    for req in (check_request("post_token_in_query"), check_request("post_token_in_query", token)):
        status, headers, body = denial(await authz.check(req))
        assert status == 400
        assert 'error="invalid_request"' in headers["www-authenticate"]
        assert body["id"] == 3 and body["error"]["data"]["reason"] == "token_in_query"


async def test_get_stream_is_authenticated_with_no_message(authz: Harness, token: str) -> None:
    """GET (SSE) is authenticated and decided with mcp.method null and the session id."""
    headers, _ = upstream(await authz.check(check_request("get_sse_stream", token)))
    assert headers["x-mcp-user"] == "alice" and "x-mcp-tool" not in headers
    mcp = authz.engine.inputs[-1]["mcp"]
    assert mcp["method"] is None and mcp["session_id"] == "3f1c2d9e8b7a4c56"
    assert authz.engine.inputs[-1]["parsed_body"] is None
    status, _, body = denial(await authz.check(check_request("get_sse_stream")))
    assert status == 401 and body["id"] is None


@pytest.mark.parametrize("name", ["get_sse_stream", "delete_session"])
@pytest.mark.parametrize("body", [
    b'{"jsonrpc":"2.0","id":5,"method":"ping"}',
    b'{"jsonrpc":"2.0","method":"notifications/initialized"}',
    b"not json",
])
async def test_a_bodied_get_or_delete_is_400_not_decided_as_its_body(
        authz: Harness, token: str, name: str, body: bytes) -> None:
    """A GET or DELETE carrying a message is refused (400 invalid_request) before the policy: it
    would otherwise be authorised as that message and not as the stream or end it is."""
    before = len(authz.engine.inputs)
    status, _, doc = denial(await authz.check(check_request(name, token, body=body)))
    assert status == 400 and doc["error"]["data"]["reason"] == "invalid_request"
    assert len(authz.engine.inputs) == before


async def test_sql_facts_are_built_off_the_event_loop(
        authz: Harness, rsa_key: SigningKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SQL parse (tens of ms within its bounds) runs on a worker thread, never on the loop
    that serves other checks; the policy still gets its facts."""
    threads: list[threading.Thread] = []
    real = sql_facts

    def recording(sql: Any) -> dict[str, Any]:
        threads.append(threading.current_thread())
        return real(sql)

    monkeypatch.setattr(facts_module, "sql_facts", recording)
    token = token_for(rsa_key, server="database", scopes=["tools:call:database/query"])
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "query", "arguments": {"sql": "select id from orders"}}}).encode()
    await authz.check(check_request("post_tools_call_files", token, body=body,
                                    path="/mcp/database"))
    assert threads and all(t is not threading.main_thread() for t in threads)
    assert authz.engine.inputs[-1]["mcp"]["facts"]["sql"]["tables"] == ["orders"]


async def test_sql_parses_beyond_the_queue_are_refused_while_others_are_answered(
        authz: Harness, rsa_key: SigningKey, token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every SQL parse place taken, one more SQL request is 503 sql_parser_busy at once,
    a request without SQL is still decided, and the held parses finish afterwards."""
    release = threading.Event()
    started = threading.Event()

    def held(sql: Any) -> dict[str, Any]:
        started.set()
        release.wait(30)
        return {"understood": False, "tables": [], "functions": []}

    monkeypatch.setattr(facts_module, "sql_facts", held)
    sql_token = token_for(rsa_key, server="database", scopes=["tools:call:database/query"])
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "query", "arguments": {"sql": "select 1"}}}).encode()

    def sql_check() -> Any:
        return authz.check(check_request("post_tools_call_files", sql_token, body=body,
                                         path="/mcp/database"))

    held_checks = [asyncio.create_task(sql_check()) for _ in range(servicer_module.MAX_SQL_QUEUE)]
    try:
        assert await asyncio.to_thread(started.wait, 30)
        async with asyncio.timeout(30):  # every place taken: one parsing, the rest queued
            while authz.servicer._sql_queued < servicer_module.MAX_SQL_QUEUE:
                await asyncio.sleep(0.005)
        status, headers, doc = denial(await sql_check())
        assert status == 503 and doc["error"]["data"]["reason"] == "sql_parser_busy"
        assert headers["retry-after"] == "1"
        upstream(await authz.check(check_request("post_tools_call_files", token)))
    finally:
        release.set()
        await asyncio.gather(*held_checks)


async def test_delete_session_is_authenticated(authz: Harness, token: str) -> None:
    """DELETE (session end) needs a token too."""
    upstream(await authz.check(check_request("delete_session", token)))
    status, _, _ = denial(await authz.check(check_request("delete_session")))
    assert status == 401


async def test_notification_allowed(authz: Harness, token: str) -> None:
    """A notification is decided with kind "notification"."""
    upstream(await authz.check(check_request("post_notification", token)))
    assert authz.engine.inputs[-1]["mcp"]["kind"] == "notification"


async def test_duplicate_keys_are_400_parse_error(authz: Harness, token: str) -> None:
    """{"method":"tools/list","method":"tools/call"} is refused before the policy sees it."""
    status, _, body = denial(await authz.check(check_request("post_duplicate_method_key", token)))
    assert status == 400 and body["error"]["code"] == PARSE_ERROR and body["id"] == 9
    assert not authz.engine.inputs


async def test_invalid_json_is_400_with_null_id(authz: Harness, token: str) -> None:
    """Unparseable bodies are 400 with a null id."""
    req = check_request("post_tools_call_files", token, body=b'{"jsonrpc": "2.0", "id": 1,')
    status, _, body = denial(await authz.check(req))
    assert status == 400 and body["error"]["code"] == PARSE_ERROR and body["id"] is None


async def test_partial_body_is_413(authz: Harness, token: str) -> None:
    """A body Envoy truncated (allow_partial_message) is refused, never decided on."""
    req = check_request("post_tools_call_files", token, headers={"x-envoy-auth-partial-body": "true"})
    status, _, body = denial(await authz.check(req))
    assert status == 413 and body["error"]["data"]["reason"] == "payload_too_large"


async def test_2026_headers_must_match_body(authz: Harness, rsa_key: SigningKey) -> None:
    """2026-07-28 requests pass with matching Mcp-Method/Mcp-Name and are 400 on a mismatch."""
    token = token_for(rsa_key, server="database")
    headers, _ = upstream(await authz.check(check_request("post_tools_call_database_2026", token)))
    assert headers["x-mcp-tool"] == "query"
    req = check_request("post_tools_call_database_2026", token, headers={"mcp-name": "drop_table"})
    status, _, body = denial(await authz.check(req))
    assert status == 400 and body["error"]["code"] == HEADER_MISMATCH and body["id"] == 42


async def test_policy_denial_is_403_with_insufficient_scope(
        jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: SigningKey) -> None:
    """A denied call is 403 + JSON-RPC error, with an insufficient_scope challenge when named."""
    engine = StubEngine(deny_tools={"read_file"}, missing_scope="tools:call:files/read_file")
    authz = build(make_settings(jwks_server.url), session, engine)
    status, headers, body = denial(await authz.check(check_request("post_tools_call_files",
                                                                   token_for(rsa_key))))
    assert status == 403
    assert headers["www-authenticate"] == (
        f'Bearer resource_metadata="{PRM_FILES}", error="insufficient_scope", '
        'scope="tools:call:files/read_file"')
    assert body["id"] == 7 and body["error"]["code"] == FORBIDDEN
    assert body["error"]["data"]["reason"] == "tool_not_allowed"
    assert "tool_not_allowed" in body["error"]["message"]


async def test_dry_run_allows_and_logs_the_denial(
        jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: SigningKey,
        caplog: pytest.LogCaptureFixture) -> None:
    """Dry-run: a denying policy is logged as such but the request goes through."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    settings = make_settings(jwks_server.url, policy={"dry_run": True})
    authz = build(settings, session, StubEngine(deny_tools={"read_file"}))
    upstream(await authz.check(check_request("post_tools_call_files", token_for(rsa_key))))
    line = orjson.loads(caplog.records[-1].getMessage())
    assert line["allow"] is True and line["dry_run"] is True and line["policy_allow"] is False
    assert line["reason"] == "dry_run:tool_not_allowed"


async def test_decision_log_line(authz: Harness, token: str, caplog: pytest.LogCaptureFixture) -> None:
    """One JSON line per decision with ids, subject, method, tool, outcome; never the token."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    headers, _ = upstream(await authz.check(check_request("post_tools_call_files", token)))
    denial(await authz.check(check_request("post_tools_list_no_token")))
    records = [r for r in caplog.records if r.name == LOGGER_NAME]
    assert len(records) == 2
    first, second = (orjson.loads(r.getMessage()) for r in records)
    assert first["decision_id"] == headers["x-mcp-decision-id"]
    assert first["request_id"] == "673e035f-618a-4067-b8fc-d852dcbabfb1"
    assert (first["sub"], first["method"], first["tool"], first["server"]) == \
        ("alice", "tools/call", "read_file", "files")
    assert first["allow"] is True and first["http_status"] == 200 and first["latency_ms"] >= 0
    assert second["allow"] is False and second["reason"] == "missing_token"
    assert second["http_status"] == 401
    # The bundle that decided and what it obliged; no policy ran for the unauthenticated one.
    assert first["policy_revision"] == "stub-1" and first["obligations"] is None
    assert second["policy_revision"] is None
    assert all(token not in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.INFO and r.funcName == "log_decision" for r in records)


def test_decision_ids_are_unique_uuid4() -> None:
    """Decision ids are random version 4 UUIDs in hex, distinct across refills of the id pool."""
    ids = [new_decision_id() for _ in range(3 * 256 + 7)]
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(hex=value)
        assert parsed.hex == value and parsed.version == 4 and parsed.variant == uuid.RFC_4122


async def test_rate_limit_per_user_is_429(jwks_server: JwksServer, session: aiohttp.ClientSession,
                                          rsa_key: SigningKey) -> None:
    """Past the per-user burst: 429 with Retry-After and a JSON-RPC error; policy not consulted."""
    settings = make_settings(jwks_server.url, rate_limits={
        "per_user": {"rate_per_second": 0.01, "burst": 2}})
    authz = build(settings, session, StubEngine())
    req = check_request("post_tools_call_files", token_for(rsa_key))
    upstream(await authz.check(req))
    upstream(await authz.check(req))
    status, headers, body = denial(await authz.check(req))
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert body["error"]["code"] == RATE_LIMITED and body["error"]["data"]["limit"] == "user"
    assert len(authz.engine.inputs) == 2
    # Another user has a bucket of their own (and a session of their own: sessions are bound).
    upstream(await authz.check(check_request("post_tools_call_files", token_for(rsa_key, sub="bob"),
                                             headers={"mcp-session-id": "bob-session"})))


async def test_rate_limit_per_tool(jwks_server: JwksServer, session: aiohttp.ClientSession,
                                   rsa_key: SigningKey) -> None:
    """The per-tool bucket is shared by all users of the tool and ignores other methods."""
    settings = make_settings(jwks_server.url, rate_limits={
        "per_user": None, "per_tool": {"rate_per_second": 0.01, "burst": 1}})
    authz = build(settings, session, StubEngine())
    upstream(await authz.check(check_request("post_tools_call_files", token_for(rsa_key))))
    req = check_request("post_tools_call_files", token_for(rsa_key, sub="bob"))
    status, _, body = denial(await authz.check(req))
    assert status == 429 and body["error"]["data"]["limit"] == "tool"
    upstream(await authz.check(check_request("post_notification", token_for(rsa_key))))


async def test_engine_failure_fails_closed_and_service_lives(
        jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: SigningKey,
        caplog: pytest.LogCaptureFixture) -> None:
    """An exception inside the check is a 500 denial; the next request is served normally."""
    engine = StubEngine(raise_on_decide=True)
    authz = build(make_settings(jwks_server.url), session, engine)
    req = check_request("post_tools_call_files", token_for(rsa_key))
    status, _, body = denial(await authz.check(req))
    assert status == 500 and body["error"]["data"]["reason"] == "internal_error"
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    engine.raise_on_decide = False
    upstream(await authz.check(req))


async def test_unknown_server_is_404(authz: Harness, token: str) -> None:
    """Paths outside /mcp/<configured server> are refused."""
    for path in ("/mcp/nope", "/admin", "/mcp/"):
        status, _, body = denial(await authz.check(check_request("post_tools_call_files", token,
                                                                 path=path)))
        assert status == 404 and body["error"]["data"]["reason"] == "unknown_server"


async def test_jwks_down_is_503(session: aiohttp.ClientSession, rsa_key: SigningKey) -> None:
    """When the issuer's keys cannot be fetched, requests are refused with 503 (fail closed)."""
    down = JwksServer()
    await down.start()
    url = down.url
    await down.stop()
    authz = build(make_settings(url), session, StubEngine())
    status, headers, body = denial(await authz.check(check_request("post_tools_call_files",
                                                                   token_for(rsa_key))))
    assert status == 503 and headers["retry-after"] == "1"
    assert body["error"]["data"]["reason"] == "jwks_unavailable"


async def test_header_map_and_string_body_forms(authz: Harness, token: str) -> None:
    """Envoy's header_map (encode_raw_headers) and the string body field are read too."""
    req = check_request("post_tools_call_files", token)
    http = req.attributes.request.http
    raw = http.raw_body
    for key, value in sorted(http.headers.items()):
        hv = http.header_map.headers.add()
        hv.key = key
        hv.raw_value = value.encode()
    http.ClearField("headers")
    http.ClearField("raw_body")
    http.body = raw.decode()
    headers, _ = upstream(await authz.check(req))
    assert headers["x-mcp-tool"] == "read_file" and headers["x-mcp-user"] == "alice"


async def test_obligations_go_to_dynamic_metadata(
        jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: SigningKey) -> None:
    """Policy obligations travel to later filters (ext_proc) as dynamic metadata."""
    engine = StubEngine(obligations={"mask_pii": True})
    authz = build(make_settings(jwks_server.url), session, engine)
    resp = await authz.check(check_request("post_tools_call_files", token_for(rsa_key)))
    upstream(resp)
    assert resp.dynamic_metadata["obligations"]["mask_pii"] is True


async def test_rate_limit_store_down_is_503(jwks_server: JwksServer, session: aiohttp.ClientSession,
                                            rsa_key: SigningKey) -> None:
    """Redis unreachable: requests are refused with 503 + Retry-After (fail closed), not crashed."""
    import socket

    from ext_authz.ratelimit import RedisRateLimiter

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    settings = make_settings(jwks_server.url, rate_limits={
        "backend": "redis", "redis_url": f"redis://127.0.0.1:{dead}/0"})
    issuer = settings.issuers[0]
    jwks = JwksClient(issuer.jwks_url, session, cooldown=30, timeout=2, max_bytes=65536)
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{dead}/0", timeout=0.2)
    servicer = AuthorizationServicer(settings, TokenVerifier({ISSUER: (issuer, jwks)}, settings.auth),
                                     limiter, StubEngine())
    try:
        resp = await servicer.Check(check_request("post_tools_call_files", token_for(rsa_key)), None)
        status, headers, body = denial(resp)
        assert status == 503 and headers["retry-after"] == "1"
        assert body["error"]["data"]["reason"] == "rate_limit_unavailable"
    finally:
        await limiter.close()


# --- issue 5: what ext_proc needs ---------------------------------------------------------------

def _metadata(resp: pb.CheckResponse) -> dict[str, Any]:
    return json_format.MessageToDict(resp.dynamic_metadata)


async def test_ext_proc_metadata_and_inspect_header(
        jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: SigningKey) -> None:
    """An allowed call whose policy masks PII carries the ext_proc metadata and x-mcp-inspect."""
    engine = StubEngine(obligations={"mask_pii": ["email", "card"]})
    authz = build(make_settings(jwks_server.url), session, engine)
    token = token_for(rsa_key, roles=["analyst", "auditor"], extra_claims={"client_id": "vscode"})
    resp = await authz.check(check_request("post_tools_call_files", token))
    headers, _ = upstream(resp)
    assert headers["x-mcp-inspect"] == "1"
    md = _metadata(resp)
    assert isinstance(md.pop("scope"), str) and isinstance(md.pop("iss"), str)
    assert md == {
        "mcp_method": "tools/call", "server": "files", "tool": "read_file", "sub": "alice",
        "tenant": "acme", "roles": ["analyst", "auditor"], "mask": ["email", "card"],
        "decision_id": headers["x-mcp-decision-id"],
        "request_id": "673e035f-618a-4067-b8fc-d852dcbabfb1",
        "obligations": {"mask_pii": ["email", "card"]},
    }


async def test_inspect_header_only_where_needed(authz: Harness, token: str) -> None:
    """Lists and GET streams are always inspected; a call with nothing to mask is not, and a
    client-sent x-mcp-inspect never survives."""
    listed = await authz.check(check_request("post_tools_list_no_token", token))
    headers, _ = upstream(listed)
    assert headers["x-mcp-inspect"] == "1" and _metadata(listed)["mcp_method"] == "tools/list"
    assert _metadata(listed)["mask"] == [] and _metadata(listed)["tool"] is None
    req = check_request("post_tools_call_files", token, headers={"x-mcp-inspect": "1"})
    headers, removed = upstream(await authz.check(req))
    assert "x-mcp-inspect" not in headers and "x-mcp-inspect" in removed
    # A GET stream replays earlier answers (Last-Event-ID): always inspected, never by method.
    streamed = await authz.check(check_request("get_sse_stream", token))
    headers, removed = upstream(streamed)
    assert headers["x-mcp-inspect"] == "1" and _metadata(streamed)["mcp_method"] is None


# --- issue 6: logs, metrics, audit ---------------------------------------------------------------

class _LoggingEngine(StubEngine):
    async def decide(self, policy_input: dict[str, Any]) -> Any:
        logging.getLogger("tests.policy").warning("deciding")
        return await super().decide(policy_input)


async def test_every_log_line_of_a_check_carries_its_ids(
        jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: SigningKey) -> None:
    """Log lines written during a check, by any module, carry request_id, decision_id, sub, tool."""
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging("ext_authz", "INFO", stream=stream)
    try:
        authz = build(make_settings(jwks_server.url), session, _LoggingEngine())
        headers, _ = upstream(await authz.check(check_request("post_tools_call_files",
                                                              token_for(rsa_key))))
        logging.getLogger("tests.policy").warning("after the check")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    deciding = next(x for x in lines if x["message"] == "deciding")
    assert deciding["service"] == "ext_authz"
    assert deciding["request_id"] == "673e035f-618a-4067-b8fc-d852dcbabfb1"
    assert deciding["decision_id"] == headers["x-mcp-decision-id"]
    assert (deciding["sub"], deciding["tenant"], deciding["server"], deciding["method"],
            deciding["tool"]) == ("alice", "acme", "files", "tools/call", "read_file")
    jwks_line = next(x for x in lines if x["logger"] == "gateway.jwks")
    assert jwks_line["decision_id"] == headers["x-mcp-decision-id"]
    after = next(x for x in lines if x["message"] == "after the check")
    assert "decision_id" not in after and "request_id" not in after


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_metrics_move(jwks_server: JwksServer, session: aiohttp.ClientSession,
                            rsa_key: SigningKey) -> None:
    """Requests by decision, decision latency, JWKS fetches and rate-limit rejections are counted."""
    settings = make_settings(jwks_server.url, rate_limits={
        "per_user": {"rate_per_second": 0.01, "burst": 1}})
    authz = build(settings, session, StubEngine())
    labels = {"server": "files", "method": "tools/call", "tool": "read_file"}
    before = (_sample("mcp_gateway_requests_total", **labels, decision="allow"),
              _sample("mcp_gateway_requests_total", **labels, decision="rate_limited"),
              _sample("mcp_gateway_decision_duration_seconds_count", decision="allow"),
              _sample("mcp_gateway_jwks_fetches_total", issuer=ISSUER, outcome="ok"),
              _sample("mcp_gateway_rate_limit_rejections_total", scope="user"))
    req = check_request("post_tools_call_files", token_for(rsa_key))
    upstream(await authz.check(req))
    denial(await authz.check(req))
    after = (_sample("mcp_gateway_requests_total", **labels, decision="allow"),
             _sample("mcp_gateway_requests_total", **labels, decision="rate_limited"),
             _sample("mcp_gateway_decision_duration_seconds_count", decision="allow"),
             _sample("mcp_gateway_jwks_fetches_total", issuer=ISSUER, outcome="ok"),
             _sample("mcp_gateway_rate_limit_rejections_total", scope="user"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1, 1]


class _CountingWriter(AuditWriter):
    """Counts fsyncs (the seam AuditWriter offers), optionally failing them like a bad disk."""

    def __init__(self, *args: Any, fail: bool = False, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.synced = 0
        self.fail = fail

    def _sync(self, fd: int) -> None:
        if self.fail:
            raise OSError(errno.EIO, "injected I/O error")
        super()._sync(fd)
        self.synced += 1


@pytest.fixture
async def audit(tmp_path: Path) -> AsyncIterator[_CountingWriter]:
    writer = _CountingWriter(tmp_path / "audit" / "ext_authz-1.jsonl", timeout=5)
    await writer.start()
    try:
        yield writer
    finally:
        await writer.close()


async def test_audit_entry_is_on_disk_before_the_answer(
        jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: SigningKey,
        audit: _CountingWriter) -> None:
    """tools/call (allowed or denied) is audited and fsync'ed before Check returns; lists are not."""
    authz = build(make_settings(jwks_server.url), session, StubEngine(deny_tools={"delete_file"}),
                  audit=audit)
    token = token_for(rsa_key, extra_claims={"client_id": "vscode"})
    headers, _ = upstream(await authz.check(check_request("post_tools_call_files", token)))
    assert audit.synced >= 1
    entries = list(iter_audit(audit.path))  # read while the writer is still open
    assert len(entries) == 1
    e = entries[0]
    assert (e["method"], e["server"], e["target"]) == ("tools/call", "files", "read_file")
    assert (e["sub"], e["client_id"], e["tenant"]) == ("alice", "vscode", "acme")
    assert (e["decision"], e["status"], e["reason"]) == ("allow", "allowed", "allowed")
    assert e["decision_id"] == headers["x-mcp-decision-id"]
    assert e["request_id"] == "673e035f-618a-4067-b8fc-d852dcbabfb1"
    assert e["args_digest"] == args_digest({"path": "/srv/files/reports/q3.txt"})
    assert e["service"] == "ext_authz" and e["latency_ms"] >= 0
    assert token not in audit.path.read_text() and "q3.txt" not in audit.path.read_text()

    body = orjson.dumps({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                         "params": {"name": "delete_file", "arguments": {"path": "x"}}})
    denial(await authz.check(check_request("post_tools_call_files", token, body=body)))
    upstream(await authz.check(check_request("post_tools_list_no_token", token)))
    denial(await authz.check(check_request("post_tools_call_files")))  # no token: no "who"
    entries = list(iter_audit(audit.path))
    assert len(entries) == 2
    assert (entries[1]["target"], entries[1]["status"], entries[1]["reason"]) == \
        ("delete_file", "denied", "tool_not_allowed")


async def test_audit_failure_fails_closed(
        jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: SigningKey,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """When the entry cannot be written the call is refused with 503, never allowed."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    writer = _CountingWriter(tmp_path / "bad.jsonl", fail=True, timeout=5)
    await writer.start()
    try:
        authz = build(make_settings(jwks_server.url), session, StubEngine(), audit=writer)
        req = check_request("post_tools_call_files", token_for(rsa_key))
        for _ in range(2):  # the failed write, then the writer that refuses everything after it
            status, headers, body = denial(await authz.check(req))
            assert status == 503 and headers["retry-after"] == "1"
            assert body["error"]["data"]["reason"] == "audit_unavailable" and body["id"] == 7
        line = orjson.loads([r for r in caplog.records if r.name == LOGGER_NAME][-1].getMessage())
        assert line["allow"] is False and line["reason"] == "audit_unavailable"
        upstream(await authz.check(check_request("post_tools_list_no_token", token_for(rsa_key))))
    finally:
        await writer.close()
