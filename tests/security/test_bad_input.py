"""Hostile input through the real stack (Envoy + ext_authz + ext_proc + MCP servers, TLS on
loopback): every case gets a deliberate HTTP status and JSON-RPC error code, never reaches a
server where it should not, and leaves the gateway and the servers serving.

Expected outcomes follow the design: bad tokens 401 (-32001; a query token 400), bad JSON 400
(-32700), bad JSON-RPC 400 (-32600), Mcp-Method mismatch 400 (-32020), policy refusals 403
(-32003), ambiguous HTTP refused by Envoy itself (400/413/415, no JSON-RPC body), tool-level
refusals by the servers 200 with ``isError`` (or a JSON-RPC error) and nothing leaked.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from gatewayctl import devstack, tokens
from tests.reliability.stack import (
    ISSUER,
    META,
    Gateway,
    call_body,
    call_headers,
    gateway,
)

pytestmark = pytest.mark.timeout(120)

SECRET = "TOP-SECRET-OUTSIDE-THE-SANDBOX"
PARSE, INVALID, FORBIDDEN, UNAUTHORIZED, MISMATCH = -32700, -32600, -32003, -32001, -32020
UNSUPPORTED_VERSION = -32022
TOOL_ERROR = "tool_error"  # 200 with result.isError, or any JSON-RPC error from the server
NO_RPC = None  # refused by Envoy before any JSON-RPC processing: no JSON-RPC body to check


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("badinput")
    root, outside = tmp / "files-root", tmp / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET, encoding="utf-8")
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "secret-link.txt").symlink_to(outside / "secret.txt")
    servers = {
        "files": {"module": "mcp_servers.files",
                  "args": ["--root", str(root), "--seed-demo", "--allow-write"]},
        "database": {"module": "mcp_servers.database",
                     "args": ["--sqlite-path", str(tmp / "demo.sqlite3"), "--seed-demo"]},
    }
    with gateway(tmp, servers) as running:
        yield running


# ------------------------------------------------------------------------------ requests

@dataclass(frozen=True)
class Request:
    body: bytes
    headers: dict[str, str]
    path: str = "/mcp/counter"
    method: str = "POST"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(gw: Gateway, server: str = "counter", **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {"iss": ISSUER, "sub": "alice", "aud": gw.url(server), "iat": now,
                           "exp": now + 600, "scope": f"tools:call:{server}/*",
                           "roles": ["admin"], "tenant": "acme", "jti": f"j{now}{id(changes)}"}
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def signed(gw: Gateway, payload: dict[str, Any], **headers: Any) -> str:
    key = devstack.signing_key(gw.config)
    return jwt.encode(payload, key.private_key, algorithm=key.alg,
                      headers={"kid": key.kid, "typ": "at+jwt", **headers})


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join((b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()),
                     b64(signature)))


def hs_confusion(gw: Gateway) -> str:
    """HS256 keyed with the issuer's public key: a verifier that lets the token pick the
    algorithm would accept it."""
    key = devstack.signing_key(gw.config)
    public = key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "kid": key.kid, "typ": "at+jwt"}
    signing_input = ".".join((b64(json.dumps(header).encode()),
                              b64(json.dumps(claims(gw)).encode())))
    mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def embedded_jwk(gw: Gateway) -> str:
    """Signed by an attacker key that the token carries itself in its ``jwk`` header."""
    rogue = tokens.generate_key("EC")
    return jwt.encode(claims(gw), rogue.private_key, algorithm=rogue.alg,
                      headers={"kid": devstack.signing_key(gw.config).kid,
                               "jwk": rogue.public_jwk()})


def good_token(gw: Gateway, *roles: str) -> str:
    return gw.token(*roles)


def bump(gw: Gateway, token: str | None, *, rid: Any = 1, tool: str = "bump",
         extra_headers: dict[str, str] | None = None, path: str = "/mcp/counter") -> Request:
    body = json.dumps(call_body(tool, {"id": "bad-input"} if tool == "bump" else {}, rid))
    return Request(body.encode(), {**call_headers(token, tool), **(extra_headers or {})}, path)


def raw(gw: Gateway, body: bytes | str, *, method: str = "tools/call", name: str | None = "bump",
        extra: dict[str, str] | None = None, token: str | None = None) -> Request:
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    return Request(data, {**call_headers(token or good_token(gw), name, method), **(extra or {})})


def call_text(tool: str = "bump", rid: str = "1", args: str = '{"id":"x"}') -> str:
    meta = json.dumps(META)
    return (f'{{"jsonrpc":"2.0","id":{rid},"method":"tools/call","params":{{"name":"{tool}",'
            f'"arguments":{args},"_meta":{meta}}}}}')


def tool_call(gw: Gateway, server: str, tool: str, arguments: dict[str, Any]) -> Request:
    body = json.dumps(call_body(tool, arguments, 1)).encode()
    return Request(body, call_headers(good_token(gw), tool), f"/mcp/{server}")


def initialize(gw: Gateway, extra: dict[str, str]) -> Request:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "bad-input", "version": "1"}}}
    headers = {"content-type": "application/json",
               "accept": "application/json, text/event-stream",
               "authorization": f"Bearer {good_token(gw)}", **extra}
    return Request(json.dumps(body).encode(), headers)


# --------------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    build: Callable[[Gateway], Request]
    status: int
    rpc: int | str | None
    marks: tuple[Any, ...] = field(default=())


def deep(n: int) -> str:
    return call_text(args='{"id":"x","deep":' + "[" * n + "]" * n + "}")


CASES: dict[str, Case] = {
    # --- JWT
    "jwt_alg_none": Case(lambda g: bump(g, unsigned(
        {"alg": "none", "kid": devstack.signing_key(g.config).kid, "typ": "at+jwt"}, claims(g))),
        401, UNAUTHORIZED),
    "jwt_hs256_keyed_with_rsa_public_key": Case(lambda g: bump(g, hs_confusion(g)), 401, UNAUTHORIZED),
    "jwt_wrong_issuer": Case(lambda g: bump(g, signed(g, claims(g, iss="https://evil.example"))),
                             401, UNAUTHORIZED),
    "jwt_wrong_audience": Case(lambda g: bump(g, signed(g, claims(g, aud=g.url("files")))),
                               401, UNAUTHORIZED),
    "jwt_expired": Case(lambda g: bump(g, signed(g, claims(g, exp=int(time.time()) - 3600,
                                                          iat=int(time.time()) - 7200))),
                        401, UNAUTHORIZED),
    "jwt_nbf_in_future": Case(lambda g: bump(g, signed(g, claims(g, nbf=int(time.time()) + 3600))),
                              401, UNAUTHORIZED),
    "jwt_missing_sub": Case(lambda g: bump(g, signed(g, claims(g, sub=None))), 401, UNAUTHORIZED),
    "jwt_missing_exp": Case(lambda g: bump(g, signed(g, claims(g, exp=None))), 401, UNAUTHORIZED),
    "jwt_crit_header": Case(lambda g: bump(g, signed(g, claims(g), crit=["exp"])), 401, UNAUTHORIZED),
    "jwt_kid_path_traversal": Case(lambda g: bump(g, signed(g, claims(g),
                                                            kid="../../../../etc/passwd")),
                                   401, UNAUTHORIZED),
    "jwt_jku_header": Case(lambda g: bump(g, signed(g, claims(g), jku="http://127.0.0.1:1/jwks.json")),
                           401, UNAUTHORIZED),
    "jwt_x5u_header": Case(lambda g: bump(g, signed(g, claims(g), x5u="http://127.0.0.1:1/cert.pem")),
                           401, UNAUTHORIZED),
    "jwt_embedded_jwk_header": Case(lambda g: bump(g, embedded_jwk(g)), 401, UNAUTHORIZED),
    "jwt_oversized": Case(lambda g: bump(g, signed(g, claims(g, pad="A" * 9000))), 401, UNAUTHORIZED),
    "jwt_token_in_query": Case(lambda g: bump(g, None, path=f"/mcp/counter?access_token={good_token(g)}"),
                               400, UNAUTHORIZED),
    # --- JSON-RPC
    "json_invalid": Case(lambda g: raw(g, '{"jsonrpc": "2.0", "id": 1,'), 400, PARSE),
    "rpc_wrong_version": Case(lambda g: raw(g, call_text().replace('"2.0"', '"1.0"')), 400, INVALID),
    "rpc_not_an_object": Case(lambda g: raw(g, '"tools/call"'), 400, INVALID),
    "rpc_params_not_object": Case(lambda g: raw(
        g, '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":[1,2]}'), 400, INVALID),
    "rpc_empty_batch": Case(lambda g: raw(g, "[]"), 400, INVALID),
    "rpc_batch": Case(lambda g: raw(g, f"[{call_text()},{call_text(rid='2')}]"), 400, INVALID),
    "json_duplicate_method_key": Case(lambda g: raw(g, call_text().replace(
        '"method":"tools/call"', '"method":"tools/list","method":"tools/call"')), 400, PARSE),
    "json_100k_deep_nesting": Case(lambda g: raw(g, deep(100_000)), 400, PARSE),
    "rpc_huge_id": Case(lambda g: raw(g, call_text(rid="1" + "0" * 30)), 400, PARSE),
    "rpc_nan_id": Case(lambda g: raw(g, call_text(rid="NaN")), 400, PARSE),
    "rpc_float_id": Case(lambda g: raw(g, call_text(rid="1.5")), 400, INVALID),
    "json_invalid_utf8": Case(lambda g: raw(g, call_text(args='{"id":"\xff"}').encode("latin-1")),
                              400, PARSE),
    "json_utf16": Case(lambda g: raw(g, call_text().encode("utf-16-le")), 400, PARSE),
    "json_bom": Case(lambda g: raw(g, b"\xef\xbb\xbf" + call_text().encode()), 400, PARSE),
    "json_lone_surrogate": Case(lambda g: raw(g, call_text(args='{"id":"\\ud800"}')), 400, PARSE),
    "json_escaped_method_is_still_tools_call": Case(lambda g: raw(
        g, call_text().replace('"tools/call"', '"\\u0074ools/call"'),
        token=good_token(g, "viewer")), 403, FORBIDDEN),
    "json_escaped_tool_name_is_still_the_tool": Case(lambda g: raw(
        g, call_text(tool="\\u0062ump"), token=good_token(g, "viewer")), 403, FORBIDDEN),
    "body_over_max_request_bytes": Case(lambda g: raw(
        g, call_text(args='{"id":"' + "x" * (1024 * 1024 + 10) + '"}')), 413, NO_RPC),
    "body_gzip_encoded": Case(lambda g: raw(g, gzip.compress(call_text().encode()),
                                            extra={"content-encoding": "gzip"}), 415, INVALID),
    "mcp_method_header_mismatch": Case(lambda g: raw(g, call_text(), method="tools/list", name=None),
                                       400, MISMATCH),
    "mcp_name_header_mismatch": Case(lambda g: raw(g, call_text(), name="whoami"), 400, MISMATCH),
    # --- HTTP
    "header_name_with_underscore": Case(lambda g: bump(g, good_token(g),
                                                       extra_headers={"x_mcp_user": "mallory"}),
                                        400, NO_RPC),
    "path_escaped_slash": Case(lambda g: bump(g, good_token(g), path="/mcp%2Fcounter"), 400, NO_RPC),
    "path_dot_dot_normalised_before_authz": Case(lambda g: bump(
        g, g.token_for("files"), path="/mcp/files/../counter"), 401, UNAUTHORIZED),
    "path_double_slash_normalised_before_authz": Case(lambda g: bump(
        g, g.token_for("files"), path="//mcp//counter"), 401, UNAUTHORIZED),
    "origin_not_allowed": Case(lambda g: bump(g, good_token(g),
                                              extra_headers={"origin": "https://evil.example"}),
                               403, INVALID),
    "host_not_allowed": Case(lambda g: bump(g, good_token(g), extra_headers={"host": "evil.example"}),
                             421, INVALID),
    "protocol_version_unsupported": Case(lambda g: bump(
        g, good_token(g), extra_headers={"mcp-protocol-version": "1999-01-01"}), 400, UNSUPPORTED_VERSION),
    # --- servers
    "files_traversal": Case(lambda g: tool_call(g, "files", "read_file", {"path": "../outside/secret.txt"}),
                            403, FORBIDDEN),
    "files_absolute_path": Case(lambda g: tool_call(g, "files", "read_file",
                                                    {"path": "/etc/passwd"}), 403, FORBIDDEN),
    "files_symlink_dir_escape": Case(lambda g: tool_call(g, "files", "read_file",
                                                         {"path": "link/secret.txt"}), 200, TOOL_ERROR),
    "files_symlink_file_escape": Case(lambda g: tool_call(g, "files", "read_file",
                                                          {"path": "secret-link.txt"}), 200, TOOL_ERROR),
    "files_write_through_symlink": Case(lambda g: tool_call(
        g, "files", "write_file", {"path": "link/planted.txt", "content": "x"}), 200, TOOL_ERROR),
    "database_delete": Case(lambda g: tool_call(g, "database", "query",
                                                {"sql": "DELETE FROM products"}), 403, FORBIDDEN),
    "database_drop_after_select": Case(lambda g: tool_call(
        g, "database", "query", {"sql": "SELECT 1; DROP TABLE products"}), 403, FORBIDDEN),
    "database_write_in_cte": Case(lambda g: tool_call(g, "database", "query", {
        "sql": "WITH x AS (SELECT 1) UPDATE products SET name = 'pwned'"}), 403, FORBIDDEN),
    "database_attach": Case(lambda g: tool_call(g, "database", "query", {
        "sql": "ATTACH DATABASE '/tmp/pwn.sqlite3' AS pwn"}), 403, FORBIDDEN),
}


def send(gw: Gateway, req: Request) -> tuple[int, dict[str, str], bytes]:
    conn = gw.connection()
    try:
        conn.putrequest(req.method, req.path, skip_host="host" in req.headers,
                        skip_accept_encoding=True)
        for name, value in {**req.headers, "content-length": str(len(req.body))}.items():
            conn.putheader(name, value)
        conn.endheaders(req.body)
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def rpc_error_code(body: bytes) -> int | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        code = doc["error"].get("code")
        return code if isinstance(code, int) else None
    return None


def is_tool_error(body: bytes) -> bool:
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    if not isinstance(doc, dict):
        return False
    return "error" in doc or bool(doc.get("result", {}).get("isError"))


def assert_serving(gw: Gateway) -> None:
    status, _, body = send(gw, bump(gw, good_token(gw)))
    assert status == 200 and b'"result"' in body, body[:300]
    for server, tool, args in (("files", "list_directory", {"path": "."}),
                               ("database", "list_tables", {})):
        status, _, body = send(gw, tool_call(gw, server, tool, args))
        assert status == 200 and b'"isError":true' not in body, body[:300]


@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks) for n, c in CASES.items()])
def test_bad_input_is_refused_and_everything_keeps_serving(gw: Gateway, name: str) -> None:
    """Each hostile request gets its designed HTTP status and JSON-RPC error, leaks nothing from
    outside the sandbox, and the gateway and every server still answer afterwards."""
    case = CASES[name]
    status, _, body = send(gw, case.build(gw))
    assert SECRET.encode() not in body
    assert (status, rpc_error_code(body) if case.rpc != TOOL_ERROR else is_tool_error(body)) == \
        (case.status, case.rpc if case.rpc != TOOL_ERROR else True), body[:400]
    assert_serving(gw)


def whoami(gw: Gateway, extra: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """whoami's answer, and the headers the counter server received for that request."""
    status, headers, body = send(gw, bump(gw, good_token(gw), tool="whoami", extra_headers=extra))
    assert status == 200, body[:300]
    request_id = headers["x-request-id"]
    seen = [h for h in gw.header_lines() if h["request_id"] == request_id]
    assert len(seen) == 1
    return json.loads(body)["result"]["structuredContent"], seen[0]["headers"]


def test_client_identity_headers_are_replaced_by_the_token_identity(gw: Gateway) -> None:
    """x-mcp-* headers a client sends never reach the server: it sees the token's identity."""
    forged = {"x-mcp-user": "mallory", "x-mcp-tenant": "evil", "x-mcp-roles": "admin,root",
              "x-mcp-client-id": "forged", "x-mcp-tool": "other", "x-mcp-decision-id": "forged",
              "x-mcp-inspect": "0"}
    ident, seen = whoami(gw, forged)
    assert ident == {"user": "alice", "tenant": "acme", "client_id": None, "roles": ["admin"]}
    assert "authorization" not in seen
    assert not set(forged.items()) & set(seen.items())


def test_spoofed_x_forwarded_for_is_not_trusted(gw: Gateway) -> None:
    """A client's X-Forwarded-For is not the client address: Envoy appends the real peer and
    reports the connection's address as the external address."""
    _, seen = whoami(gw, {"x-forwarded-for": "203.0.113.9"})
    assert seen["x-envoy-external-address"] == "127.0.0.1"
    assert not seen["x-forwarded-for"].rstrip().endswith("203.0.113.9")


def test_session_id_reused_by_another_user_is_404(gw: Gateway) -> None:
    """A session created by alice is unknown (404) to bob, even with a valid token of his own."""
    status, headers, body = send(gw, initialize(gw, {"mcp-protocol-version": "2025-11-25"}))
    assert status == 200, body[:300]
    session = headers["mcp-session-id"]
    bob = devstack.mint(gw.config, sub="bob", roles=("admin",), tenant="acme", ttl=600)
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    req = Request(json.dumps(ping).encode(), {
        "content-type": "application/json", "accept": "application/json, text/event-stream",
        "authorization": f"Bearer {bob}", "mcp-protocol-version": "2025-11-25",
        "mcp-session-id": session})
    status, _, body = send(gw, req)
    assert status == 404, body[:300]
    assert_serving(gw)
