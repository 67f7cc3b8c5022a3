"""The console's security properties over real HTTP: headers, cookie flags, CSRF, same-origin
POSTs, role refusal, and the policy asked again on every request."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from gateway.catalog import Catalog
from tests.console.conftest import COOKIE, ORIGIN, Console, _cookie, _csrf, token


async def test_pages_carry_a_strict_csp_and_refuse_framing(console: Console) -> None:
    """Every page forbids inline script, foreign origins and framing."""
    async with console.http.get(console.url("/console/login")) as resp:
        assert resp.status == 200
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Cache-Control"] == "no-store"
        assert "<script>" not in await resp.text()


async def test_sign_in_sets_a_host_only_secure_strict_cookie(console: Console,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Signing in sets __Host-mcp-console: Secure; HttpOnly; SameSite=Strict; Path=/, and the
    token appears in no header and no log line."""
    caplog.set_level(logging.DEBUG)
    async with console.http.get(console.url("/console/login")) as resp:
        login_cookie = _cookie(resp, "__Host-mcp-console-login")
        csrf = _csrf(await resp.text())
    bearer = token(console.key, roles=["admin"])
    async with console.http.post(console.url("/console/login"), allow_redirects=False,
                                 data={"csrf": csrf, "token": bearer},
                                 headers={"Origin": ORIGIN,
                                          "Cookie": f"__Host-mcp-console-login={login_cookie}"}) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/console/overview"
        cookie = next(h for h in resp.headers.getall("Set-Cookie") if h.startswith(COOKIE + "="))
        flags = {f.strip() for f in cookie.split(";")[1:]}
        assert {"Secure", "HttpOnly", "SameSite=Strict", "Path=/"} <= flags
        assert not any(f.lower().startswith("domain") for f in flags)
        assert all(bearer not in v for v in resp.headers.values())
    assert bearer not in caplog.text and bearer.split(".")[2] not in caplog.text


async def test_viewer_token_is_refused(console: Console) -> None:
    """A valid token whose roles the console policy does not name gets 403 and no session."""
    async with console.http.get(console.url("/console/login")) as resp:
        login_cookie = _cookie(resp, "__Host-mcp-console-login")
        csrf = _csrf(await resp.text())
    async with console.http.post(console.url("/console/login"), allow_redirects=False,
                                 data={"csrf": csrf, "token": token(console.key, roles=["viewer"])},
                                 headers={"Origin": ORIGIN,
                                          "Cookie": f"__Host-mcp-console-login={login_cookie}"}) as resp:
        assert resp.status == 403
        assert "console_role_required" in await resp.text()
        assert not any(h.startswith(COOKIE + "=") for h in resp.headers.getall("Set-Cookie", []))


async def test_token_for_another_audience_is_refused(console: Console) -> None:
    """A token minted for an MCP server, not for the console, does not sign in."""
    async with console.http.get(console.url("/console/login")) as resp:
        login_cookie = _cookie(resp, "__Host-mcp-console-login")
        csrf = _csrf(await resp.text())
    bearer = token(console.key, roles=["admin"], aud="https://gw.example.test/mcp/files")
    async with console.http.post(console.url("/console/login"), allow_redirects=False,
                                 data={"csrf": csrf, "token": bearer},
                                 headers={"Origin": ORIGIN,
                                          "Cookie": f"__Host-mcp-console-login={login_cookie}"}) as resp:
        assert resp.status == 401
        assert "invalid_audience" in await resp.text()


async def test_sign_in_without_its_own_cookie_is_refused(console: Console) -> None:
    """The sign-in form is CSRF-protected too (double submit): a forged form gets 403."""
    async with console.http.post(console.url("/console/login"), allow_redirects=False,
                                 data={"csrf": "forged", "token": token(console.key, roles=["admin"])},
                                 headers={"Origin": ORIGIN}) as resp:
        assert resp.status == 403
        assert "csrf_failed" in await resp.text()


async def test_pages_need_a_session(console: Console) -> None:
    """Without a session a page redirects to sign-in and a JSON feed answers 401."""
    async with console.http.get(console.url("/console/catalog"), allow_redirects=False) as resp:
        assert resp.status == 303 and resp.headers["Location"] == "/console/login"
    async with console.http.get(console.url("/console/api/overview"),
                                headers={"Cookie": f"{COOKIE}=made-up"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "not_signed_in"


async def test_cross_site_post_is_refused(console: Console) -> None:
    """An approval posted from another origin is refused (403 cross_origin) even with the
    victim's cookie and CSRF token, and the catalog is unchanged."""
    sid, csrf = await console.sign_in(["admin"])
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {}):
        async with console.http.post(console.url("/console/catalog/approve"), allow_redirects=False,
                                     data={"csrf": csrf, "server": "files", "name": "write_file",
                                           "kind": "tool"},
                                     headers={**headers, "Cookie": f"{COOKIE}={sid}"}) as resp:
            assert resp.status == 403, headers
            assert "cross_origin" in await resp.text()
    with Catalog(console.settings.catalog_path) as catalog:
        entry = catalog.get("files", "write_file")
        assert entry is not None and entry.state == "quarantined"


async def test_post_without_the_csrf_token_is_refused(console: Console) -> None:
    """A same-origin POST without the session's CSRF token is refused."""
    sid, _ = await console.sign_in(["admin"])
    async with console.http.post(console.url("/console/catalog/approve"), allow_redirects=False,
                                 data={"csrf": "wrong", "server": "files", "name": "write_file",
                                       "kind": "tool"},
                                 headers={"Origin": ORIGIN, "Cookie": f"{COOKIE}={sid}"}) as resp:
        assert resp.status == 403
        assert "csrf_failed" in await resp.text()


async def test_approval_is_audited_with_the_console_user(console: Console) -> None:
    """Approving a quarantined tool goes through Catalog.approve with actor console:<sub>."""
    sid, csrf = await console.sign_in(["security"], sub="sec-officer")
    with Catalog(console.settings.catalog_path) as catalog:
        shown = catalog.get("files", "write_file")
        assert shown is not None
    async with console.http.post(console.url("/console/catalog/approve"), allow_redirects=False,
                                 data={"csrf": csrf, "server": "files", "name": "write_file",
                                       "kind": "tool", "hash": shown.hash},
                                 headers={"Origin": ORIGIN, "Cookie": f"{COOKIE}={sid}"}) as resp:
        assert resp.status == 303, await resp.text()
    with Catalog(console.settings.catalog_path) as catalog:
        entry = catalog.get("files", "write_file")
        assert entry is not None and entry.state == "approved"
        events = catalog.audit_events("files", "write_file")
    assert events[-1]["event"] == "approved" and events[-1]["actor"] == "console:sec-officer"


async def test_a_policy_change_revokes_open_sessions(console: Console, policy_copy: Path) -> None:
    """Removing a role from policies/console.rego refuses that role's open session on its next
    request, once the bundle reloads."""
    sid, _ = await console.sign_in(["security"])
    rego = policy_copy / "console.rego"
    rego.write_text(rego.read_text().replace('console_roles := {"admin", "security"}',
                                             'console_roles := {"admin"}'))
    status = 200
    # The console checks the folder at most once a second: poll with a deadline.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while status == 200 and loop.time() < deadline:
        async with console.http.get(console.url("/console/overview"),
                                    headers={"Cookie": f"{COOKIE}={sid}"}) as resp:
            status = resp.status
        if status == 200:
            await asyncio.sleep(0.2)
    assert status == 403


async def test_ready_answers_without_a_session(console: Console) -> None:
    """Envoy's health check /ready needs no session; nothing else outside /console exists."""
    async with console.http.get(console.url("/ready")) as resp:
        assert resp.status == 200
    async with console.http.get(console.url("/other"), allow_redirects=False) as resp:
        assert resp.status == 404
