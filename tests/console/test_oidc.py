"""OpenID Connect sign-in (authorization code + PKCE S256) against a real stand-in identity
provider on loopback: its token endpoint refuses a code without the right verifier, so a
successful sign-in proves the console sent it."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.console.app import make_app
from gatewayctl.tokens import SigningKey
from tests.console.conftest import CONSOLE_AUD, COOKIE, ISSUER, Console, _cookie, console_settings, token
from tests.ext_authz.conftest import JwksServer

CLIENT_ID = "mcp-console"
OIDC_COOKIE = "__Host-mcp-console-oidc"


@dataclass
class IdP:
    """Authorizes whoever ``user_roles`` says, at once; its token endpoint checks PKCE S256,
    the client, the redirect URI and the resource, as a real one does."""

    key: SigningKey
    user_roles: list[str] = field(default_factory=lambda: ["admin"])
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    refuse_tokens: bool = False
    url: str = ""

    async def authorize(self, request: web.Request) -> web.Response:
        q = request.query
        assert q["response_type"] == "code" and q["client_id"] == CLIENT_ID
        assert q["code_challenge_method"] == "S256" and q["resource"] == CONSOLE_AUD
        code = secrets.token_urlsafe(16)
        self.codes[code] = {"challenge": q["code_challenge"], "redirect_uri": q["redirect_uri"]}
        raise web.HTTPFound(f"{q['redirect_uri']}?code={code}&state={q['state']}")

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant = self.codes.pop(str(form.get("code")), None)
        verifier = str(form.get("code_verifier", ""))
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
        if self.refuse_tokens or grant is None or digest != grant["challenge"] or \
                form.get("redirect_uri") != grant["redirect_uri"] or form.get("client_id") != CLIENT_ID \
                or form.get("resource") != CONSOLE_AUD:
            return web.json_response({"error": "invalid_grant"}, status=400)
        return web.json_response({"access_token": token(self.key, roles=self.user_roles, sub="oidc-user"),
                                  "token_type": "Bearer", "expires_in": 600})


@pytest.fixture
async def idp(signing_key: SigningKey) -> AsyncIterator[IdP]:
    provider = IdP(signing_key)
    app = web.Application()
    app.router.add_get("/authorize", provider.authorize)
    app.router.add_post("/token", provider.token)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    provider.url = str(server.make_url("")).rstrip("/")
    try:
        yield provider
    finally:
        await server.close()


@pytest.fixture
async def oidc_console(tmp_path: Path, jwks: JwksServer, signing_key: SigningKey, idp: IdP,
                       policy_copy: Path) -> AsyncIterator[Console]:
    settings = console_settings(tmp_path, jwks.url, policy_dir=policy_copy, oidc={
        "issuer": ISSUER, "client_id": CLIENT_ID, "authorization_endpoint": f"{idp.url}/authorize",
        "token_endpoint": f"{idp.url}/token"})
    server = TestServer(make_app(settings), host="127.0.0.1", port=0)
    await server.start_server()
    http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    try:
        yield Console(server, http, settings, signing_key)
    finally:
        await http.close()
        await server.close()


async def _authorize(c: Console) -> tuple[str, dict[str, Any]]:
    """Start a sign-in and let the identity provider answer: (state cookie, callback query)."""
    async with c.http.get(c.url("/console/oidc/start"), allow_redirects=False) as resp:
        assert resp.status == 303
        cookie = next(h for h in resp.headers.getall("Set-Cookie") if h.startswith(OIDC_COOKIE + "="))
        assert "SameSite=Lax" in cookie and "Secure" in cookie and "HttpOnly" in cookie
        state = cookie.split(";")[0].split("=", 1)[1]
        location = resp.headers["Location"]
    query = parse_qs(urlsplit(location).query)
    assert query["code_challenge_method"] == ["S256"] and query["state"] == [state]
    assert query["redirect_uri"] == ["https://gw.example.test/console/oidc/callback"]
    async with c.http.get(location, allow_redirects=False) as resp:  # the provider's login page
        back = resp.headers["Location"]
    return state, {k: v[0] for k, v in parse_qs(urlsplit(back).query).items()}


async def test_sign_in_with_code_and_pkce(oidc_console: Console) -> None:
    """The code flow signs in: the callback sets the session cookie and moves on by a page of
    the console's own (the redirect chain from the provider is cross-site)."""
    c = oidc_console
    state, params = await _authorize(c)
    async with c.http.get(c.url("/console/oidc/callback"), params=params,
                          headers={"Cookie": f"{OIDC_COOKIE}={state}"}) as resp:
        assert resp.status == 200, await resp.text()
        assert 'http-equiv="refresh"' in await resp.text()
        sid = _cookie(resp, COOKIE)
    async with c.http.get(c.url("/console/overview"), headers={"Cookie": f"{COOKIE}={sid}"}) as resp:
        assert resp.status == 200 and "oidc-user" in await resp.text()


async def test_callback_needs_the_browser_that_started_it(oidc_console: Console) -> None:
    """A callback without the starting browser's state cookie is refused, and a state is used
    once: a replayed callback is refused too."""
    c = oidc_console
    state, params = await _authorize(c)
    async with c.http.get(c.url("/console/oidc/callback"), params=params) as resp:
        assert resp.status == 400 and "state_mismatch" in await resp.text()
    async with c.http.get(c.url("/console/oidc/callback"), params=params,
                          headers={"Cookie": f"{OIDC_COOKIE}={state}"}) as resp:
        assert resp.status == 200
    async with c.http.get(c.url("/console/oidc/callback"), params=params,
                          headers={"Cookie": f"{OIDC_COOKIE}={state}"}) as resp:
        assert resp.status == 400 and "state_expired" in await resp.text()


async def test_a_refused_code_or_role_does_not_sign_in(oidc_console: Console, idp: IdP) -> None:
    """A token endpoint refusal fails the sign-in (400); a viewer's token is refused by the
    console policy (403); neither sets a session cookie."""
    c = oidc_console
    idp.refuse_tokens = True
    state, params = await _authorize(c)
    async with c.http.get(c.url("/console/oidc/callback"), params=params,
                          headers={"Cookie": f"{OIDC_COOKIE}={state}"}) as resp:
        assert resp.status == 400 and "token_exchange_failed" in await resp.text()
        assert not any(h.startswith(COOKIE + "=") for h in resp.headers.getall("Set-Cookie", []))
    idp.refuse_tokens = False
    idp.user_roles = ["viewer"]
    state, params = await _authorize(c)
    async with c.http.get(c.url("/console/oidc/callback"), params=params,
                          headers={"Cookie": f"{OIDC_COOKIE}={state}"}) as resp:
        assert resp.status == 403 and "console_role_required" in await resp.text()
        assert not any(h.startswith(COOKIE + "=") for h in resp.headers.getall("Set-Cookie", []))
