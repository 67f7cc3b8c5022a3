from __future__ import annotations

import asyncio
import base64
import socket
from collections import Counter, deque
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from mcp_servers.integration.breaker import OPEN, CircuitBreaker
from mcp_servers.integration.client import (
    BackendClient,
    BackendCredentialError,
    BackendTimeout,
    BackendUnavailable,
    BackendUnreachable,
    ClientSettings,
)
from mcp_servers.integration.credentials import ApiKey, OAuthClientCredentials
from mcp_servers.integration.openapi import HttpRequest


class Backend:
    """A scriptable backend: queued statuses per route, a call counter, a token endpoint."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.script: dict[str, deque[int]] = {}
        self.seen: list[dict[str, str]] = []
        self.release = asyncio.Event()
        self.token_fetches = 0
        self.valid_token = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/items", self.items)
        app.router.add_get("/slow", self.slow)
        app.router.add_post("/token", self.token)
        app.router.add_get("/protected", self.protected)
        return app

    async def items(self, request: web.Request) -> web.Response:
        key = f"{request.method} /items"
        self.calls[key] += 1
        self.seen.append(dict(request.headers))
        queue = self.script.get(key)
        status = queue.popleft() if queue else 200
        return web.json_response({"items": [1, 2], "q": dict(request.query)}, status=status)

    async def slow(self, request: web.Request) -> web.Response:
        self.calls["GET /slow"] += 1
        try:
            await asyncio.wait_for(self.release.wait(), 10)
        except TimeoutError:
            pass
        return web.json_response({})

    async def token(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(b"conn:s3cret").decode()
        form = await request.post()
        if request.headers.get("Authorization") != expected or form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "invalid_client"}, status=401)
        self.token_fetches += 1
        self.valid_token = f"tok-{self.token_fetches}"
        return web.json_response({"access_token": self.valid_token, "token_type": "Bearer",
                                  "expires_in": 3600})

    async def protected(self, request: web.Request) -> web.Response:
        self.calls["GET /protected"] += 1
        if request.headers.get("Authorization") != f"Bearer {self.valid_token}":
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"ok": True})


@pytest.fixture
async def backend() -> AsyncIterator[tuple[Backend, str]]:
    b = Backend()
    runner = web.AppRunner(b.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield b, f"http://{host}:{port}"
    b.release.set()
    await runner.cleanup()


def _client(url: str, **kw: Any) -> BackendClient:
    creds = kw.pop("credentials", ApiKey("k1"))
    breaker = kw.pop("breaker", None)
    settings = ClientSettings(name="test", base_url=url, backoff_base=0.001, backoff_cap=0.002, **kw)
    return BackendClient(settings, creds, breaker=breaker)


def _get(path: str = "/items", **query: str) -> HttpRequest:
    return HttpRequest("GET", path, tuple(query.items()), {}, None, False)


def _post() -> HttpRequest:
    return HttpRequest("POST", "/items", (), {}, {"a": 1}, True)


async def test_idempotent_get_is_retried_on_503(backend: tuple[Backend, str]) -> None:
    """A GET answered 503, 502 then 200 succeeds on the third attempt."""
    b, url = backend
    b.script["GET /items"] = deque([503, 502])
    c = _client(url, cache_ttl=0)
    await c.start()
    try:
        resp = await c.request(_get())
    finally:
        await c.close()
    assert resp.status == 200 and resp.attempts == 3 and b.calls["GET /items"] == 3


async def test_post_5xx_is_never_retried(backend: tuple[Backend, str]) -> None:
    """A POST answered 503 is returned as is after exactly one backend call."""
    b, url = backend
    b.script["POST /items"] = deque([503, 503])
    c = _client(url)
    await c.start()
    try:
        resp = await c.request(_post())
    finally:
        await c.close()
    assert resp.status == 503 and b.calls["POST /items"] == 1


async def test_get_answers_are_cached_until_a_write(backend: tuple[Backend, str]) -> None:
    """Repeated GETs (any query order) hit the backend once; a successful POST clears the cache."""
    b, url = backend
    c = _client(url, cache_ttl=60)
    await c.start()
    try:
        first = await c.request(_get(a="1", b="2"))
        again = await c.request(HttpRequest("GET", "/items", (("b", "2"), ("a", "1")), {}, None, False))
        assert not first.cached and again.cached and b.calls["GET /items"] == 1
        await c.request(_post())
        await c.request(_get(a="1", b="2"))
    finally:
        await c.close()
    assert b.calls["GET /items"] == 2


async def test_connector_credentials_replace_request_credentials(backend: tuple[Backend, str]) -> None:
    """Header arguments named like credentials are dropped; the backend sees only the connector's key."""
    b, url = backend
    c = _client(url, cache_ttl=0)
    await c.start()
    try:
        headers = {"X-API-Key": "evil", "Authorization": "Bearer client", "X-Trace": "t"}
        await c.request(HttpRequest("GET", "/items", (), headers, None, False))
    finally:
        await c.close()
    seen = b.seen[-1]
    assert seen["X-API-Key"] == "k1" and "Authorization" not in seen and seen["X-Trace"] == "t"


async def test_slow_backend_times_out_without_retry(backend: tuple[Backend, str]) -> None:
    """A backend slower than the total timeout yields BackendTimeout after one call."""
    b, url = backend
    c = _client(url, total_timeout=0.2)
    await c.start()
    try:
        with pytest.raises(BackendTimeout, match="did not answer"):
            await c.request(_get("/slow"))
    finally:
        await c.close()
    assert b.calls["GET /slow"] == 1


async def test_unreachable_backend_opens_the_circuit_and_fails_fast() -> None:
    """Refused connections are retried, then counted; at the threshold calls fail fast with a retry time."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clock = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, cooldown=30, clock=lambda: clock[0])
    c = _client(f"http://127.0.0.1:{port}", breaker=breaker)
    await c.start()
    try:
        for _ in range(2):
            with pytest.raises(BackendUnreachable, match="3 attempts"):
                await c.request(_get())
        assert breaker.state == OPEN
        clock[0] += 10
        with pytest.raises(BackendUnavailable, match="unavailable") as exc:
            await c.request(_get())
        assert exc.value.retry_in == pytest.approx(20)
    finally:
        await c.close()


async def test_half_open_probe_recovers(backend: tuple[Backend, str]) -> None:
    """After the cool-down one probe reaches the backend and its success closes the circuit."""
    b, url = backend
    clock = [0.0]
    breaker = CircuitBreaker(failure_threshold=1, cooldown=5, clock=lambda: clock[0])
    b.script["POST /items"] = deque([500])
    c = _client(url, breaker=breaker, cache_ttl=0)
    await c.start()
    try:
        assert (await c.request(_post())).status == 500
        with pytest.raises(BackendUnavailable):
            await c.request(_get())
        assert b.calls["GET /items"] == 0
        clock[0] += 5
        assert (await c.request(_get())).status == 200
        assert (await c.request(_get())).status == 200
    finally:
        await c.close()
    assert b.calls["GET /items"] == 2


async def test_oauth_token_is_cached_and_refreshed_once_on_401(backend: tuple[Backend, str]) -> None:
    """The client-credentials token is fetched once; a revoked token is replaced once on 401."""
    b, url = backend
    creds = OAuthClientCredentials(f"{url}/token", "conn", "s3cret")
    c = _client(url, credentials=creds, cache_ttl=0)
    await c.start()
    try:
        assert (await c.request(_get("/protected"))).status == 200
        assert (await c.request(_get("/protected"))).status == 200
        assert b.token_fetches == 1
        b.valid_token = "rotated-server-side"
        resp = await c.request(_get("/protected"))
    finally:
        await c.close()
    assert b.token_fetches == 2 and resp.status == 200


async def test_bad_client_secret_is_a_credential_error(backend: tuple[Backend, str]) -> None:
    """A token endpoint refusing the client gives a credential error naming the endpoint's answer."""
    b, url = backend
    c = _client(url, credentials=OAuthClientCredentials(f"{url}/token", "conn", "wrong"))
    await c.start()
    try:
        with pytest.raises(BackendCredentialError, match="401: invalid_client"):
            await c.request(_get("/protected"))
    finally:
        await c.close()
    assert b.calls["GET /protected"] == 0 and c.breaker.state != OPEN


def test_settings_reject_a_relative_base_url() -> None:
    """A base URL that is not absolute http(s) is refused at start-up."""
    with pytest.raises(ValueError, match="absolute"):
        ClientSettings(name="x", base_url="/api")
