"""Fixtures of the console's tests: a real JWKS server, signing keys, a console app on a real
loopback server (aiohttp's TestServer), a catalog with a quarantined tool and an audit trail."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.catalog import Catalog
from gateway.config import parse_config
from gateway.console.app import make_app
from gateway.console.settings import ConsoleSettings
from gatewayctl.tokens import SigningKey, generate_key, mint_token
from tests.ext_authz.conftest import JwksServer

REPO = Path(__file__).resolve().parents[2]
ISSUER = "https://idp.example.test"
PUBLIC_URL = "https://gw.example.test"
CONSOLE_AUD = f"{PUBLIC_URL}/console"
ORIGIN = "https://gw.example.test"
COOKIE = "__Host-mcp-console"

QUIET_TOOL = {"name": "read_file", "description": "Read a file", "inputSchema": {"type": "object"}}
CHANGED_TOOL = {"name": "write_file", "description": "Write a file",
                "inputSchema": {"type": "object"}}


@pytest.fixture(scope="session")
def signing_key() -> SigningKey:
    return generate_key("EC", kid="console-test")


def token(key: SigningKey, *, roles: list[str], sub: str = "alice", aud: str = CONSOLE_AUD,
          ttl: int = 600) -> str:
    return mint_token(key, issuer=ISSUER, audience=aud, sub=sub, roles=roles, tenant="acme", ttl=ttl)


@pytest.fixture
async def jwks(signing_key: SigningKey) -> AsyncIterator[JwksServer]:
    server = JwksServer()
    server.set_keys([signing_key])
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def seed_catalog(path: Path) -> None:
    """files: read_file approved, write_file quarantined (its definition changed after approval)."""
    with Catalog(path) as catalog:
        catalog.refresh("files", [QUIET_TOOL, CHANGED_TOOL])
        catalog.refresh("files", [QUIET_TOOL, {**CHANGED_TOOL, "description": "Write ANY file"}])


def console_settings(tmp_path: Path, jwks_url: str, *, policy_dir: Path | None = None,
                     admin_port: int = 1, oidc: dict[str, Any] | None = None) -> ConsoleSettings:
    raw: dict[str, Any] = {
        "public_url": PUBLIC_URL,
        "tls": {"cert_file": str(tmp_path / "tls.pem"), "key_file": str(tmp_path / "tls.key")},
        "admin": {"port": admin_port},
        "issuers": [{"issuer": ISSUER, "jwks_url": jwks_url}],
        "policy": {"dir": str(policy_dir or REPO / "policies")},
        "ext_authz": {"instances": [{"port": 1101}]},
        "ext_proc": {"instances": [{"port": 1111}]},
        "servers": {"files": {"module": "mcp_servers.files", "instances": [{"port": 1201}]},
                    "database": {"module": "mcp_servers.database", "instances": [{"port": 1211}]}},
        "catalog": {"path": str(tmp_path / "catalog.sqlite")},
        "audit": {"dir": str(tmp_path / "audit")},
        "state_dir": str(tmp_path),
        "console": {"instances": [{"port": 1401}], **({"oidc": oidc} if oidc else {})},
    }
    cfg = parse_config(raw, base_dir=tmp_path)
    return ConsoleSettings.from_config(cfg)


@dataclass
class Console:
    server: TestServer
    http: aiohttp.ClientSession
    settings: ConsoleSettings
    key: SigningKey

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def sign_in(self, roles: list[str], sub: str = "alice") -> tuple[str, str]:
        """(session id, CSRF token) after signing in with a token of ``roles``."""
        async with self.http.get(self.url("/console/login")) as resp:
            login_cookie = _cookie(resp, "__Host-mcp-console-login")
            csrf = _csrf(await resp.text())
        async with self.http.post(self.url("/console/login"), allow_redirects=False,
                                  data={"csrf": csrf, "token": token(self.key, roles=roles, sub=sub)},
                                  headers={"Origin": ORIGIN,
                                           "Cookie": f"__Host-mcp-console-login={login_cookie}"}) as resp:
            assert resp.status == 303, await resp.text()
            sid = _cookie(resp, COOKIE)
        async with self.http.get(self.url("/console/overview"),
                                 headers={"Cookie": f"{COOKIE}={sid}"}) as resp:
            assert resp.status == 200
            return sid, _csrf(await resp.text())


def _cookie(resp: aiohttp.ClientResponse, name: str) -> str:
    for header in resp.headers.getall("Set-Cookie", []):
        if header.startswith(name + "="):
            return header.split(";", 1)[0].split("=", 1)[1]
    raise AssertionError(f"no {name} cookie in {resp.headers.getall('Set-Cookie', [])}")


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html) or \
        re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


@pytest.fixture
def policy_copy(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(REPO / "policies", target)
    return target


@pytest.fixture
async def console(tmp_path: Path, jwks: JwksServer, signing_key: SigningKey,
                  policy_copy: Path) -> AsyncIterator[Console]:
    settings = console_settings(tmp_path, jwks.url, policy_dir=policy_copy)
    seed_catalog(Path(settings.catalog_path))
    server = TestServer(make_app(replace(settings)), host="127.0.0.1", port=0)
    await server.start_server()
    http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    try:
        yield Console(server, http, settings, signing_key)
    finally:
        await http.close()
        await server.close()
