"""Shared fixtures: signing keys, a real aiohttp JWKS server, a tiny real MCP server (catalog
refresh), configs, CheckRequest fixtures and a tiny stand-in policy engine (the real one lives in
gateway.policy)."""

from __future__ import annotations

import copy
import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf import json_format

from ext_authz.catalog import CatalogGate
from ext_authz.jwt import TokenVerifier
from ext_authz.ratelimit import MemoryRateLimiter
from ext_authz.servicer import AuthorizationServicer
from ext_authz.settings import Settings
from gateway.config import GatewayConfig, parse_config
from gateway.jwks import JwksClient
from gateway.telemetry import AuditWriter
from gatewayctl.tokens import SigningKey, generate_key, mint_token
from tests.gateway.catalog import mcp_stub
from tests.ports import free_port

ISSUER = "https://idp.example.test"
PUBLIC_URL = "https://gw.example.test"
FIXTURES = Path(__file__).parent.parent / "fixtures" / "check_requests"
TOKEN_PLACEHOLDER = "__TOKEN__"
# Where make_config puts the catalog database and audit files: the running test's tmp_path.
_STATE: dict[str, Path] = {}


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path) -> Iterator[None]:
    _STATE["dir"] = tmp_path
    yield
    _STATE.pop("dir", None)


def resource(server: str) -> str:
    return f"{PUBLIC_URL}/mcp/{server}"


@pytest.fixture(scope="session")
def rsa_key() -> SigningKey:
    return generate_key("RSA", kid="rsa-1")


@pytest.fixture(scope="session")
def ec_key() -> SigningKey:
    return generate_key("EC", kid="ec-1")


def token_for(key: SigningKey, server: str = "files", **kw: Any) -> str:
    args: dict[str, Any] = {"issuer": ISSUER, "audience": resource(server), "sub": "alice",
                            "roles": ["analyst"], "scopes": ["tools:call:files/read_file"],
                            "tenant": "acme", "ttl": 600}
    args.update(kw)
    return mint_token(key, **args)


class JwksServer:
    """A real HTTP JWKS endpoint whose key set tests can change; counts fetches."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] = {"keys": []}
        self.fetches = 0
        self.status = 200
        self.url = ""
        self._runner: web.AppRunner | None = None

    def set_keys(self, keys: Iterable[SigningKey], extra: Iterable[dict[str, Any]] = ()) -> None:
        self.doc = {"keys": [k.public_jwk() for k in keys] + list(extra)}

    async def _handle(self, _: web.Request) -> web.Response:
        self.fetches += 1
        if self.status != 200:
            return web.Response(status=self.status)
        return web.json_response(self.doc)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks.json", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/jwks.json"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def jwks_server(rsa_key: SigningKey, ec_key: SigningKey) -> AsyncIterator[JwksServer]:
    server = JwksServer()
    server.set_keys([rsa_key, ec_key])
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@dataclass
class McpServer:
    """A real aiohttp MCP server (tests.gateway.catalog.mcp_stub) the catalog refresh reads."""

    stub: mcp_stub.Stub
    port: int


@pytest.fixture
async def mcp_server() -> AsyncIterator[McpServer]:
    stub = mcp_stub.Stub()
    runner, port = await mcp_stub.start(stub)
    try:
        yield McpServer(stub, port)
    finally:
        await runner.cleanup()


def make_config(jwks_url: str, *, files_port: int = 9201, **sections: Any) -> GatewayConfig:
    state = _STATE["dir"]
    raw: dict[str, Any] = {
        "public_url": PUBLIC_URL,
        "tls": {"cert_file": "server.pem", "key_file": "server.key"},
        "issuers": [{"issuer": ISSUER, "jwks_url": jwks_url}],
        "auth": {"leeway_seconds": 5, "max_token_bytes": 4096, "jwks_cooldown_seconds": 30},
        "ext_authz": {"transport": "grpc", "instances": [{"port": 9101}]},
        "ext_proc": {"instances": [{"port": 9111}]},
        "servers": {"files": {"module": "m", "instances": [{"port": files_port}]},
                    "database": {"module": "m", "instances": [{"port": 9211}]}},
        "audit": {"dir": str(state / "audit")},
        "catalog": {"path": str(state / "catalog.sqlite"), "refresh_seconds": 60},
    }
    raw.update(sections)
    return parse_config(raw, base_dir=Path("/tmp"))


def make_settings(jwks_url: str, *, files_port: int = 9201, **sections: Any) -> Settings:
    return Settings.from_config(make_config(jwks_url, files_port=files_port, **sections), port=0,
                                host="127.0.0.1")


def check_request(name: str, token: str | None = None, *,
                  headers: dict[str, str] | None = None, body: bytes | None = None,
                  path: str | None = None) -> pb.CheckRequest:
    """A captured Envoy CheckRequest, with the placeholder token replaced (or removed)."""
    doc = json.loads((FIXTURES / f"{name}.json").read_text())
    http = copy.deepcopy(doc)["attributes"]["request"]["http"]
    hdrs: dict[str, str] = http["headers"]
    if token is None:
        hdrs.pop("authorization", None)
    elif "authorization" in hdrs:
        hdrs["authorization"] = hdrs["authorization"].replace(TOKEN_PLACEHOLDER, token)
    else:
        hdrs["authorization"] = f"Bearer {token}"
    hdrs.update(headers or {})
    if path is not None:
        http["path"] = hdrs[":path"] = path
    doc["attributes"]["request"]["http"] = http
    msg = json_format.Parse(json.dumps(doc), pb.CheckRequest())
    if body is not None:
        msg.attributes.request.http.raw_body = body
    return msg


@dataclass(frozen=True)
class StubDecision:
    allow: bool
    reason: str = ""
    http_status: int = 403
    headers: dict[str, str] = field(default_factory=dict)
    obligations: dict[str, Any] = field(default_factory=dict)
    missing_scope: str | None = None
    error_code: str | None = None


class StubEngine:
    """Stand-in for gateway.policy: allows unless the tool is in ``deny_tools``."""

    def __init__(self, deny_tools: Iterable[str] = (), *, missing_scope: str | None = None,
                 obligations: dict[str, Any] | None = None, raise_on_decide: bool = False) -> None:
        self.deny_tools = set(deny_tools)
        self.missing_scope = missing_scope
        self.obligations = obligations or {}
        self.raise_on_decide = raise_on_decide
        self.inputs: list[dict[str, Any]] = []
        self.started = self.closed = False

    revision = "stub-1"

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def decide(self, policy_input: dict[str, Any]) -> StubDecision:
        self.inputs.append(policy_input)
        if self.raise_on_decide:
            raise RuntimeError("engine bug")
        tool = policy_input["mcp"]["tool"]
        if tool in self.deny_tools:
            return StubDecision(False, reason="tool_not_allowed", missing_scope=self.missing_scope)
        return StubDecision(True, reason="allowed", obligations=self.obligations)


OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@dataclass
class Harness:
    servicer: AuthorizationServicer
    engine: StubEngine
    jwks: JwksClient

    async def check(self, req: pb.CheckRequest) -> pb.CheckResponse:
        return await self.servicer.Check(req, None)


def build(settings: Settings, session: aiohttp.ClientSession, engine: StubEngine, *,
          catalog: CatalogGate | None = None, audit: AuditWriter | None = None) -> Harness:
    issuer = settings.issuers[0]
    jwks = JwksClient(issuer.jwks_url, session, cooldown=30, timeout=2, max_bytes=65536,
                      issuer=issuer.issuer)
    verifier = TokenVerifier({ISSUER: (issuer, jwks)}, settings.auth)
    servicer = AuthorizationServicer(settings, verifier, MemoryRateLimiter(), engine,
                                     catalog=catalog, audit=audit)
    return Harness(servicer, engine, jwks)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


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


# A real redis-server for the tests of the Redis backends (rate limits, session bindings).
@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make test installs it: apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)  # polling a readiness probe with a deadline, not waiting blindly
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
