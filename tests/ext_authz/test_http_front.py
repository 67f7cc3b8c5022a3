"""ext_authz over Envoy's HTTP mode: the pure translation (read_request, answer) and the aiohttp
front served for real on loopback, alone and as started by ``start_service``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb

from ext_authz.app import SERVICE_NAME, Service, start_service
from ext_authz.http_front import (
    CARRIER_STATUS,
    HEALTH_PATH,
    MAX_HEADER_BYTES,
    PATH_PREFIX,
    HttpService,
    answer,
    context_text,
    read_request,
)
from ext_authz.request import HttpRequest
from ext_authz.response import Verdict, ext_proc_metadata
from ext_proc.metadata import CONTEXT_KEY, NAMESPACE, CallerContext, parse_caller_context
from gateway.caller import Caller
from gateway.config import Instance
from gateway.errors import UNAUTHORIZED
from gateway.service import GrpcSettings
from gateway.wire import CONTEXT_HEADER, GATEWAY_HEADERS, REMOVE_HEADER, STATUS_HEADER
from gatewayctl.tokens import SigningKey
from tests.ext_authz.conftest import (
    PUBLIC_URL,
    JwksServer,
    McpServer,
    StubEngine,
    check_request,
    make_settings,
    token_for,
)

TIMEOUT = aiohttp.ClientTimeout(total=10)
PRM_FILES = f"{PUBLIC_URL}/.well-known/oauth-protected-resource/mcp/files"
# Tokens up to this size reach the verifier; bigger ones are refused by it (token_too_large).
MAX_TOKEN_BYTES = 32 * 1024
MAX_REQUEST_BYTES = 4096
# aiohttp refuses a header field longer than this unless the server raises its limit.
AIOHTTP_DEFAULT_FIELD_LIMIT = 8190


def caller_context(text: str) -> CallerContext:
    """What ext_proc reads from the metadata Envoy files from the context header."""
    req = ext_proc_pb.ProcessingRequest()
    req.metadata_context.filter_metadata[NAMESPACE].update({CONTEXT_KEY: text})
    return parse_caller_context(req.metadata_context.filter_metadata)


def struct_context(metadata: dict[str, Any]) -> CallerContext:
    """What ext_proc reads from the same metadata sent as a struct (the gRPC transport)."""
    req = ext_proc_pb.ProcessingRequest()
    req.metadata_context.filter_metadata[NAMESPACE].update(metadata)
    return parse_caller_context(req.metadata_context.filter_metadata)


def sample_metadata(**claims: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "roles": ["analyst"], "tenant": "acme",
                            "scope": "tools:call:files/read_file"}
    base.update(claims)
    return ext_proc_metadata(method="tools/call", server="files", tool="read_file",
                             caller=Caller.from_claims(base), resource="https://gw/mcp/files",
                             mask=["email"], decision_id="d" * 32, request_id="r-1",
                             obligations={"mask_pii": ["email"], "note": "kept"})


# ------------------------------------------------------------------------------- read_request

def test_read_request_lowercases_and_joins_headers() -> None:
    """Names are lower-cased, repeats joined with "," in arrival order, method/path/body kept."""
    req = read_request("POST", "/mcp/files", [
        ("Content-Type", "application/json"), ("Accept", "application/json"),
        ("ACCEPT", "text/event-stream"), ("Host", "gw.example.test"), ("X-Custom", "a"),
        ("x-custom", "b"), ("x-custom", "c")], b'{"jsonrpc":"2.0"}')
    assert req.headers == {"content-type": "application/json",
                           "accept": "application/json,text/event-stream",
                           "host": "gw.example.test", "x-custom": "a,b,c"}
    assert (req.method, req.path, req.body, req.host) == \
        ("POST", "/mcp/files", b'{"jsonrpc":"2.0"}', "gw.example.test")


def test_read_request_source_id_and_scheme_from_envoy_headers() -> None:
    """The client address is the last x-forwarded-for entry (Envoy's), x-request-id is the id,
    x-forwarded-proto the scheme."""
    req = read_request("GET", "/mcp/files", [
        ("X-Forwarded-For", "10.9.9.9, 203.0.113.5"), ("x-forwarded-for", " 198.51.100.7 "),
        ("X-Request-Id", "rid-42"), ("X-Forwarded-Proto", "http")], b"")
    assert req.source_address == "198.51.100.7"
    assert req.headers["x-forwarded-for"] == "10.9.9.9, 203.0.113.5, 198.51.100.7 "
    assert req.id == "rid-42" and req.scheme == "http"


def test_read_request_defaults_without_envoy_headers() -> None:
    """Without those headers: no address, no id, scheme https (Envoy's listener is TLS)."""
    req = read_request("DELETE", "/mcp/files", [], b"")
    assert (req.source_address, req.id, req.scheme, req.host, req.headers) == ("", "", "https", "", {})


# -------------------------------------------------------------------------------------- answer

def _removed(resp: web.Response) -> list[str]:
    value: str = resp.headers[REMOVE_HEADER]
    return value.split(",")


def test_allow_sets_headers_and_removes_token_and_unset_gateway_headers() -> None:
    """200 carries the upstream headers; the removal list is the token plus every gateway-owned
    header the verdict does not set, and never a header it sets."""
    upstream = {"x-mcp-user": "alice", "x-mcp-tool": "read_file", "x-mcp-decision-id": "d" * 32,
                "x-policy-flag": "on"}
    verdict = Verdict.allow(upstream)
    resp = answer(verdict)
    assert resp.status == 200 and not resp.body
    for name, value in upstream.items():
        assert resp.headers[name] == value
    removed = _removed(resp)
    assert removed == verdict.removed_headers()
    assert set(removed) == {"authorization"} | (set(GATEWAY_HEADERS) - set(upstream))
    assert "x-mcp-tenant" in removed and "x-mcp-inspect" in removed
    assert not set(removed) & set(upstream)
    assert CONTEXT_HEADER not in resp.headers and STATUS_HEADER not in resp.headers


def test_allow_with_every_gateway_header_removes_only_the_token() -> None:
    """A verdict that sets every gateway-owned header still removes the client's token."""
    resp = answer(Verdict.allow({h: "1" for h in GATEWAY_HEADERS}))
    assert _removed(resp) == ["authorization"]


def test_allow_carries_the_caller_context_as_json() -> None:
    """The caller context travels as JSON text that parses back to the metadata, and ext_proc
    reads it as the same CallerContext as the struct form."""
    metadata = sample_metadata()
    resp = answer(Verdict.allow({"x-mcp-user": "alice"}, metadata))
    text = resp.headers[CONTEXT_HEADER]
    assert orjson.loads(text) == metadata
    assert caller_context(text) == struct_context(metadata)
    assert caller_context(text).mask == ("email",) and caller_context(text).caller.sub == "alice"


def test_non_ascii_context_is_an_ascii_header_that_parses_back() -> None:
    """Non-ASCII claim values become \\u escapes: the header is ASCII and parses back equal."""
    metadata = sample_metadata(sub="zoë", tenant="東京", roles=["анализ", "ok"])
    text = answer(Verdict.allow({"x-mcp-user": "zo%C3%AB"}, metadata)).headers[CONTEXT_HEADER]
    assert text.isascii() and text.isprintable()
    assert "\\u00eb" in text
    assert json.loads(text) == metadata == orjson.loads(text)
    ctx = caller_context(text)
    assert ctx.caller == Caller("zoë", tenant="東京", roles=("анализ", "ok"),
                                scope="tools:call:files/read_file")
    assert context_text({"a": "plain"}) == '{"a":"plain"}'


@pytest.mark.parametrize(("status", "headers"), [
    (401, {"www-authenticate": f'Bearer resource_metadata="{PRM_FILES}"'}),
    (403, {"www-authenticate": 'Bearer error="insufficient_scope", scope="tools:call:files/x"'}),
    (429, {"retry-after": "3"}),
])
def test_client_denials_pass_through(status: int, headers: dict[str, str]) -> None:
    """A 4xx denial is answered with its own status, JSON-RPC body and headers."""
    body = b'{"jsonrpc":"2.0","id":7,"error":{"code":-32001,"message":"no"}}'
    resp = answer(Verdict.deny(status, body, headers))
    assert resp.status == status and resp.body == body
    assert resp.headers["content-type"] == "application/json"
    for name, value in headers.items():
        assert resp.headers[name] == value
    assert STATUS_HEADER not in resp.headers and REMOVE_HEADER not in resp.headers
    assert CONTEXT_HEADER not in resp.headers


@pytest.mark.parametrize("status", [500, 501, 502, 503, 504])
def test_service_errors_travel_as_400_with_the_real_status(status: int) -> None:
    """A 5xx (which Envoy would take for a failure) goes as 400 with the status in x-mcp-status,
    the same body and headers."""
    body = b'{"jsonrpc":"2.0","id":1,"error":{"code":-32603,"message":"unavailable"}}'
    resp = answer(Verdict.deny(status, body, {"retry-after": "1"}))
    assert resp.status == CARRIER_STATUS == 400
    assert resp.headers[STATUS_HEADER] == str(status)
    assert resp.body == body and resp.headers["retry-after"] == "1"
    assert resp.headers["content-type"] == "application/json"


@pytest.mark.parametrize("status", [505, 507, 599])
def test_other_5xx_are_carried_as_503(status: int) -> None:
    """A 5xx that Envoy's mappers cannot restore is carried as 503."""
    resp = answer(Verdict.deny(status, b"{}"))
    assert resp.status == 400 and resp.headers[STATUS_HEADER] == "503"


# ------------------------------------------------------------------ HttpService alone, on HTTP

class FakeCore:
    """Records what the front hands to the decision core and answers a fixed verdict."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.calls: list[tuple[HttpRequest, dict[str, str]]] = []

    async def decide(self, req: HttpRequest, trace_headers: dict[str, str]) -> Verdict:
        self.calls.append((req, trace_headers))
        return self.verdict


@pytest.fixture
async def front() -> AsyncIterator[HttpService]:
    settings = GrpcSettings("ext_authz", SERVICE_NAME, Instance("127.0.0.1", 0))
    service = await HttpService.open(settings, max_body=MAX_REQUEST_BYTES)
    try:
        yield service
    finally:
        await service.close()


async def test_front_is_not_serving_until_told(front: HttpService) -> None:
    """Before set_serving: health 503, checks a real 503 (Envoy retries elsewhere); then 200."""
    decide = FakeCore(Verdict.allow({"x-mcp-user": "alice"}))
    base = f"http://127.0.0.1:{front.port}"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.get(base + HEALTH_PATH) as resp:
            assert resp.status == 503 and (await resp.json())["status"] == "not_serving"
        front.register(decide)
        await front.start()
        async with http.post(base + "/check/mcp/files", data=b"{}") as resp:
            assert resp.status == 503 and resp.headers["retry-after"] == "1"
            assert STATUS_HEADER not in resp.headers
        assert not decide.calls
        await front.set_serving()
        async with http.get(base + HEALTH_PATH) as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "serving"
        async with http.post(base + "/check/mcp/files", data=b"{}") as resp:
            assert resp.status == 200
    assert len(decide.calls) == 1


async def test_front_hands_the_checked_request_to_the_core(front: HttpService) -> None:
    """The path loses /check, the query stays, headers and body arrive, trace headers are
    passed on; the verdict becomes the HTTP answer."""
    decide = FakeCore(Verdict.allow({"x-mcp-user": "alice"}, sample_metadata()))
    front.register(decide)
    await front.start()
    await front.set_serving()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http, http.post(
            f"http://127.0.0.1:{front.port}/check/mcp/files?x=1", data=b'{"a":1}',
            headers={"X-Forwarded-For": "198.51.100.7", "traceparent": traceparent,
                     "X-Request-Id": "rid-1", "content-type": "application/json"}) as resp:
        assert resp.status == 200
        assert resp.headers["x-mcp-user"] == "alice"
        assert resp.headers[REMOVE_HEADER].split(",")[0] == "authorization"
        assert caller_context(resp.headers[CONTEXT_HEADER]).decision_id == "d" * 32
    ((req, trace),) = decide.calls
    assert req.method == "POST" and req.path == "/mcp/files?x=1" and req.body == b'{"a":1}'
    assert req.source_address == "198.51.100.7" and req.id == "rid-1"
    assert req.headers["content-type"] == "application/json"
    assert trace == {"traceparent": traceparent}


async def test_front_carries_a_5xx_verdict_over_the_wire(front: HttpService) -> None:
    """On the wire, the core's 503 arrives as 400 + x-mcp-status, with its body and Retry-After."""
    body = b'{"jsonrpc":"2.0","id":1,"error":{"code":-32603,"message":"x"}}'
    front.register(FakeCore(Verdict.deny(503, body, {"retry-after": "1"})))
    await front.set_serving()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http, \
            http.post(f"http://127.0.0.1:{front.port}/check/mcp/files", data=b"{}") as resp:
        assert resp.status == 400 and resp.headers[STATUS_HEADER] == "503"
        assert resp.headers["retry-after"] == "1" and await resp.read() == body


async def test_front_refuses_bodies_without_length_or_too_large(front: HttpService) -> None:
    """A chunked body (no Content-Length) is 411 and one over max_body 413, before the core."""
    decide = FakeCore(Verdict.allow({}))
    front.register(decide)
    await front.set_serving()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"{}"

    url = f"http://127.0.0.1:{front.port}/check/mcp/files"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.post(url, data=chunks()) as resp:
            assert resp.status == 411
        async with http.post(url, data=b"x" * (MAX_REQUEST_BYTES + 1)) as resp:
            assert resp.status == 413 and (await resp.json()) == {"error": "too_large"}
        async with http.post(url, data=b"x" * MAX_REQUEST_BYTES) as resp:
            assert resp.status == 200
    assert [len(req.body) for req, _ in decide.calls] == [MAX_REQUEST_BYTES]


# ------------------------------------------------------------- start_service with transport http

def envoy_request(name: str, token: str | None = None) -> tuple[str, str, dict[str, str], bytes]:
    """A captured check as Envoy's HTTP mode sends it: prefixed path, plain headers, the body."""
    http = check_request(name, token).attributes.request.http
    headers = {k: v for k, v in http.headers.items()
               if not k.startswith(":") and k != "content-length"}
    headers["x-forwarded-for"] = "198.51.100.7"
    return http.method, PATH_PREFIX + http.path, headers, http.raw_body


@pytest.fixture
async def http_service(jwks_server: JwksServer, mcp_server: McpServer
                       ) -> AsyncIterator[tuple[Service, StubEngine]]:
    engine = StubEngine(deny_tools={"delete_file"})
    settings = make_settings(
        jwks_server.url, files_port=mcp_server.port, max_request_bytes=MAX_REQUEST_BYTES,
        ext_authz={"instances": [{"port": 9101}], "transport": "http"},
        auth={"leeway_seconds": 5, "max_token_bytes": MAX_TOKEN_BYTES, "jwks_cooldown_seconds": 30})
    assert settings.transport == "http"
    svc = await start_service(settings, engine)
    try:
        yield svc, engine
    finally:
        await svc.stop(grace=None)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        yield http


async def test_service_serves_health_over_http(http_service: tuple[Service, StubEngine],
                                               client: aiohttp.ClientSession) -> None:
    """start_service with transport http serves GET /-/health with 200 once started."""
    svc, engine = http_service
    assert isinstance(svc.rpc, HttpService) and engine.started
    async with client.get(f"http://127.0.0.1:{svc.port}{HEALTH_PATH}") as resp:
        assert resp.status == 200 and (await resp.json()) == {"status": "serving"}


async def test_service_allows_a_tools_call(http_service: tuple[Service, StubEngine],
                                           client: aiohttp.ClientSession,
                                           rsa_key: SigningKey) -> None:
    """A valid token and a tools/call body: 200 with identity headers, the token and the client's
    x-mcp-user removed-or-overwritten, and a caller context ext_proc can read."""
    svc, engine = http_service
    method, path, headers, body = envoy_request("post_tools_call_files", token_for(rsa_key))
    assert headers["x-mcp-user"] == "mallory"
    async with client.request(method, f"http://127.0.0.1:{svc.port}{path}", headers=headers,
                              data=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["x-mcp-user"] == "alice" and resp.headers["x-mcp-tenant"] == "acme"
        assert resp.headers["x-mcp-tool"] == "read_file" and resp.headers["x-mcp-roles"] == "analyst"
        decision_id = resp.headers["x-mcp-decision-id"]
        removed = resp.headers[REMOVE_HEADER].split(",")
        ctx = caller_context(resp.headers[CONTEXT_HEADER])
    assert "authorization" in removed and "x-mcp-client-id" in removed and "x-mcp-user" not in removed
    assert ctx.caller.sub == "alice" and ctx.tool == "read_file" and ctx.server == "files"
    assert ctx.decision_id == decision_id and ctx.request_id == headers["x-request-id"]
    doc = engine.inputs[-1]
    assert doc["attributes"]["source"]["address"] == "198.51.100.7"
    assert doc["mcp"]["method"] == "tools/call" and doc["mcp"]["id"] == 7


async def test_service_denies_without_token(http_service: tuple[Service, StubEngine],
                                            client: aiohttp.ClientSession) -> None:
    """No token: 401 with the Bearer challenge and a JSON-RPC error echoing the request id."""
    svc, _ = http_service
    method, path, headers, body = envoy_request("post_tools_list_no_token")
    async with client.request(method, f"http://127.0.0.1:{svc.port}{path}", headers=headers,
                              data=body) as resp:
        assert resp.status == 401
        assert resp.headers["www-authenticate"] == f'Bearer resource_metadata="{PRM_FILES}"'
        assert resp.headers["content-type"] == "application/json"
        assert REMOVE_HEADER not in resp.headers and CONTEXT_HEADER not in resp.headers
        doc = await resp.json()
    assert doc["id"] == "a-1" and doc["error"]["code"] == UNAUTHORIZED
    assert doc["error"]["data"]["reason"] == "missing_token"


async def test_service_unknown_paths_are_404(http_service: tuple[Service, StubEngine],
                                             client: aiohttp.ClientSession) -> None:
    """Paths outside /check/ are the front's 404; an unknown server under it is the core's 404."""
    svc, _ = http_service
    base = f"http://127.0.0.1:{svc.port}"
    for path in ("/nope", "/checkmcp/files", "/check", "/-/healthz"):
        async with client.post(base + path, data=b"{}") as resp:
            assert resp.status == 404, path
            assert (await resp.json()) == {"error": "not_found"}
    async with client.post(base + "/check/mcp/nope", data=b"{}") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["data"]["reason"] == "unknown_server"


async def test_service_refuses_a_body_over_max_request_bytes(
        http_service: tuple[Service, StubEngine], client: aiohttp.ClientSession,
        rsa_key: SigningKey) -> None:
    """A Content-Length over max_request_bytes is 413 without reaching the policy."""
    svc, engine = http_service
    method, path, headers, _ = envoy_request("post_tools_call_files", token_for(rsa_key))
    async with client.request(method, f"http://127.0.0.1:{svc.port}{path}", headers=headers,
                              data=b" " * (MAX_REQUEST_BYTES + 1)) as resp:
        assert resp.status == 413
    assert not engine.inputs


async def test_tokens_over_8_kib_reach_the_verifier(http_service: tuple[Service, StubEngine],
                                                    client: aiohttp.ClientSession,
                                                    rsa_key: SigningKey) -> None:
    """Header fields beyond aiohttp's 8 KiB default are read: a large valid token is verified
    and allowed, a larger one than auth.max_token_bytes gets the verifier's 401, not a bare 400."""
    svc, _ = http_service
    url = f"http://127.0.0.1:{svc.port}"
    big = token_for(rsa_key, extra_claims={"pad": "p" * 12_000})
    assert AIOHTTP_DEFAULT_FIELD_LIMIT < len(big) < MAX_TOKEN_BYTES
    method, path, headers, body = envoy_request("post_tools_call_files", big)
    async with client.request(method, url + path, headers=headers, data=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["x-mcp-user"] == "alice"
    huge = "h" * (MAX_TOKEN_BYTES + 1)
    assert len("authorization: Bearer " + huge) < MAX_HEADER_BYTES
    method, path, headers, body = envoy_request("post_tools_call_files", huge)
    async with client.request(method, url + path, headers=headers, data=body) as resp:
        assert resp.status == 401
        assert 'error="invalid_token"' in resp.headers["www-authenticate"]
        doc = await resp.json()
    assert doc["id"] == 7 and doc["error"]["code"] == UNAUTHORIZED
    assert doc["error"]["data"]["reason"] == "token_too_large"


async def test_service_stop_closes_the_port(http_service: tuple[Service, StubEngine],
                                            client: aiohttp.ClientSession) -> None:
    """After stop() the port refuses connections and the engine is closed."""
    svc, engine = http_service
    async with client.get(f"http://127.0.0.1:{svc.port}{HEALTH_PATH}") as resp:
        assert resp.status == 200
    await svc.stop(grace=None)
    assert engine.closed
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", svc.port), timeout=5)



def test_a_denial_never_answers_below_400() -> None:
    """Envoy allows on 200 alone: a denied verdict with a success status still denies (403)."""
    for status in (200, 204, 302):
        resp = answer(Verdict.deny(status, b'{"error":1}'))
        assert resp.status == 403 and resp.body == b'{"error":1}'


def test_the_peer_header_wins_over_forwarded_for() -> None:
    """The address Envoy adds (x-mcp-peer-address) is the source; X-F-F only without it."""
    req = read_request("POST", "/mcp/files", [("x-forwarded-for", "10.0.0.9, 10.1.1.1"),
                                              ("x-mcp-peer-address", "192.0.2.7")], b"")
    assert req.source_address == "192.0.2.7"
