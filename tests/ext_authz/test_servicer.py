"""The Authorization servicer fed captured Envoy CheckRequests, in-process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb

from ext_authz.decision_log import LOGGER_NAME
from ext_authz.jwks import JwksClient
from ext_authz.jwt import TokenVerifier
from ext_authz.ratelimit import MemoryRateLimiter
from ext_authz.servicer import AuthorizationServicer
from ext_authz.settings import Settings
from gateway.errors import FORBIDDEN, HEADER_MISMATCH, PARSE_ERROR, RATE_LIMITED, UNAUTHORIZED
from gateway.tokens import SigningKey
from tests.ext_authz.conftest import (
    ISSUER,
    JwksServer,
    StubEngine,
    check_request,
    make_settings,
    token_for,
)

PRM_FILES = "https://gw.example.test/.well-known/oauth-protected-resource/mcp/files"
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@dataclass
class Harness:
    servicer: AuthorizationServicer
    engine: StubEngine
    jwks: JwksClient

    async def check(self, req: pb.CheckRequest) -> pb.CheckResponse:
        return await self.servicer.Check(req, None)


def build(settings: Settings, session: aiohttp.ClientSession, engine: StubEngine) -> Harness:
    issuer = settings.issuers[0]
    jwks = JwksClient(issuer.jwks_url, session, cooldown=30, timeout=2, max_bytes=65536)
    verifier = TokenVerifier({ISSUER: (issuer, jwks)}, settings.auth)
    return Harness(AuthorizationServicer(settings, verifier, MemoryRateLimiter(), engine), engine, jwks)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def authz(jwks_server: JwksServer, session: aiohttp.ClientSession) -> Harness:
    return build(make_settings(jwks_server.url), session, StubEngine(deny_tools={"delete_file"}))


@pytest.fixture
def token(rsa_key: SigningKey) -> str:
    return token_for(rsa_key)


def denial(resp: pb.CheckResponse) -> tuple[int, dict[str, str], dict[str, Any]]:
    assert resp.HasField("denied_response"), resp
    d = resp.denied_response
    headers = {h.header.key: h.header.value for h in d.headers}
    return d.status.code, headers, orjson.loads(d.body)


def upstream(resp: pb.CheckResponse) -> tuple[dict[str, str], list[str]]:
    assert resp.HasField("ok_response") and resp.status.code == 0, resp
    ok = resp.ok_response
    assert all(h.append_action == OVERWRITE for h in ok.headers)
    return {h.header.key: h.header.value for h in ok.headers}, list(ok.headers_to_remove)


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
    assert all(token not in r.getMessage() for r in caplog.records)


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
    # Another user has a bucket of their own.
    upstream(await authz.check(check_request("post_tools_call_files", token_for(rsa_key, sub="bob"))))


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
