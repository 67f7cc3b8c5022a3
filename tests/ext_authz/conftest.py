"""Shared fixtures: signing keys, a real aiohttp JWKS server, configs, CheckRequest fixtures and a
tiny stand-in policy engine (the real one lives in gateway.policy)."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf import json_format

from ext_authz.settings import Settings
from gateway.config import GatewayConfig, parse_config
from gateway.tokens import SigningKey, generate_key, mint_token

ISSUER = "https://idp.example.test"
PUBLIC_URL = "https://gw.example.test"
FIXTURES = Path(__file__).parent.parent / "fixtures" / "check_requests"
TOKEN_PLACEHOLDER = "__TOKEN__"


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


def make_config(jwks_url: str, **sections: Any) -> GatewayConfig:
    raw: dict[str, Any] = {
        "public_url": PUBLIC_URL,
        "tls": {"cert_file": "server.pem", "key_file": "server.key"},
        "issuers": [{"issuer": ISSUER, "jwks_url": jwks_url}],
        "auth": {"leeway_seconds": 5, "max_token_bytes": 4096, "jwks_cooldown_seconds": 30},
        "ext_authz": {"instances": [{"port": 9101}]},
        "ext_proc": {"instances": [{"port": 9111}]},
        "servers": {"files": {"module": "m", "instances": [{"port": 9201}]},
                    "database": {"module": "m", "instances": [{"port": 9211}]}},
    }
    raw.update(sections)
    return parse_config(raw, base_dir=Path("/tmp"))


def make_settings(jwks_url: str, **sections: Any) -> Settings:
    return Settings.from_config(make_config(jwks_url, **sections), port=0, host="127.0.0.1")


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
