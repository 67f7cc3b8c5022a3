"""The HTTP client of one backend: pooled session, credentials, timeouts, retries, breaker, cache."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.telemetry.tracing import inject_headers
from mcp_servers.integration.breaker import CircuitBreaker
from mcp_servers.integration.cache import TTLCache
from mcp_servers.integration.credentials import (
    CredentialError,
    Credentials,
    NoCredentials,
    OAuthClientCredentials,
)
from mcp_servers.integration.openapi import RESERVED_HEADERS, HttpRequest

logger = logging.getLogger(__name__)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRYABLE_STATUSES = frozenset({502, 503, 504})
# Connection-level failures: the request may not have reached the backend, or the answer was lost.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
)


@dataclass(frozen=True)
class ClientSettings:
    name: str
    base_url: str
    connect_timeout: float = 3.0
    total_timeout: float = 10.0
    max_attempts: int = 3
    backoff_base: float = 0.1
    backoff_cap: float = 2.0
    failure_threshold: int = 5
    cooldown: float = 10.0
    cache_ttl: float = 10.0
    cache_max_entries: int = 1024
    max_connections: int = 100
    max_response_bytes: int = 5 * 1024 * 1024

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"backend base URL must be an absolute http(s) URL, got {self.base_url!r}")
        if self.max_attempts < 1 or self.total_timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("max_attempts must be >= 1 and timeouts > 0")


@dataclass(frozen=True)
class BackendResponse:
    status: int
    reason: str
    body: Any  # parsed JSON, or text when the answer was not JSON
    is_json: bool
    headers: dict[str, str] = field(default_factory=dict)
    attempts: int = 1
    cached: bool = False


class BackendError(Exception):
    """The call produced no HTTP answer; ``str()`` is an actionable message for the tool result."""

    code = "backend_error"


class BackendUnavailable(BackendError):
    """Failing fast: the circuit is open."""

    code = "circuit_open"

    def __init__(self, message: str, retry_in: float) -> None:
        super().__init__(message)
        self.retry_in = retry_in


class BackendTimeout(BackendError):
    code = "backend_timeout"


class BackendUnreachable(BackendError):
    code = "backend_unreachable"


class BackendCredentialError(BackendError):
    code = "credential_error"


class _Retry(Exception):
    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


class BackendClient:
    def __init__(self, settings: ClientSettings, credentials: Credentials | None = None,
                 breaker: CircuitBreaker | None = None,
                 cache: TTLCache[BackendResponse] | None = None) -> None:
        self.settings = settings
        self.credentials: Credentials = credentials or NoCredentials()
        self.breaker = breaker or CircuitBreaker(settings.failure_threshold, settings.cooldown)
        self.cache: TTLCache[BackendResponse] = cache or TTLCache(settings.cache_ttl,
                                                                  settings.cache_max_entries)
        self._session: aiohttp.ClientSession | None = None
        self._base = settings.base_url.rstrip("/")
        # Headers a tool argument must not set, whatever the OpenAPI document declares.
        self._blocked_headers = RESERVED_HEADERS | self.credentials.header_names

    async def start(self) -> None:
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.settings.max_connections),
            timeout=aiohttp.ClientTimeout(total=self.settings.total_timeout,
                                          sock_connect=self.settings.connect_timeout),
            # Cookies set for one caller must never ride along with another caller's request.
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": "mcp-gateway-integration/0.1"},
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"backend client {self.settings.name!r} used before start()")
        return self._session

    def url_for(self, req: HttpRequest) -> str:
        url = self._base + req.path
        if req.query:
            url += "?" + urllib.parse.urlencode(sorted(req.query))
        return url

    async def request(self, req: HttpRequest) -> BackendResponse:
        url = self.url_for(req)
        cacheable = req.method == "GET" and self.cache.enabled
        if cacheable:
            hit = self.cache.get(url)
            if hit is not None:
                return BackendResponse(hit.status, hit.reason, hit.body, hit.is_json, hit.headers, 0, True)
        rejection = self.breaker.acquire()
        if rejection is not None:
            when = ("a recovery probe is in flight" if rejection.retry_in <= 0
                    else f"the next attempt is allowed in {rejection.retry_in:.1f} s")
            raise BackendUnavailable(
                f"Backend '{self.settings.name}' is unavailable: the circuit is open after "
                f"{rejection.failures} consecutive failures (last: {rejection.last_error}); calls fail fast "
                f"and {when}. Try again later.", rejection.retry_in)
        verdict = False
        try:
            try:
                resp = await self._send_with_retries(req, url)
            except BackendCredentialError:
                raise
            except BackendError as e:
                self.breaker.record_failure(str(e))
                verdict = True
                raise
            if resp.status >= 500:
                self.breaker.record_failure(f"HTTP {resp.status}")
            else:
                self.breaker.record_success()
            verdict = True
        finally:
            if not verdict:
                self.breaker.release()
        if cacheable and resp.status == 200:
            self.cache.put(url, resp)
        elif req.method != "GET" and 200 <= resp.status < 300:
            # A successful write may change what any cached read would return.
            self.cache.clear()
        return resp

    async def _send_with_retries(self, req: HttpRequest, url: str) -> BackendResponse:
        idempotent = req.method in IDEMPOTENT_METHODS
        attempts = self.settings.max_attempts if idempotent else 1
        reauthenticated = False
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = await self._send_once(req, url, attempt)
            except _Retry as r:
                if attempt >= attempts:
                    raise BackendUnreachable(
                        f"Backend '{self.settings.name}' could not be reached for {req.method} {req.path} "
                        f"({r.error}; {attempt} attempt{'s' if attempt > 1 else ''}). "
                        "Check that the backend is running; retry later.") from None
                await self._backoff(attempt)
                continue
            if (resp.status == 401 and not reauthenticated
                    and isinstance(self.credentials, OAuthClientCredentials)):
                # The cached token may have been revoked early: fetch a fresh one once. A 401 means
                # the backend did not act on the request, so this is safe even for POST.
                self.credentials.invalidate()
                reauthenticated = True
                attempt -= 1
                continue
            if resp.status in RETRYABLE_STATUSES and attempt < attempts:
                logger.info("backend %s answered %d to %s %s; retrying (attempt %d of %d)",
                            self.settings.name, resp.status, req.method, req.path, attempt, attempts)
                await self._backoff(attempt)
                continue
            return resp

    async def _backoff(self, attempt: int) -> None:
        # Full jitter: spreads retries of many callers over the whole window.
        ceiling = min(self.settings.backoff_cap, self.settings.backoff_base * 2 ** (attempt - 1))
        await asyncio.sleep(random.uniform(0, ceiling))  # noqa: S311 (jitter, not security)

    async def _send_once(self, req: HttpRequest, url: str, attempt: int) -> BackendResponse:
        headers = {k: v for k, v in req.headers.items() if k.lower() not in self._blocked_headers}
        headers["Accept"] = "application/json"
        # The backend call joins the request's trace (the MCP server's span is the parent).
        inject_headers(headers)
        try:
            headers.update(await self.credentials.headers(self.session))
        except CredentialError as e:
            raise BackendCredentialError(
                f"The connector could not obtain its credentials for backend '{self.settings.name}': {e}. "
                "This is a connector configuration problem, not a problem with the arguments.") from None
        data: bytes | None = None
        if req.has_body:
            headers["Content-Type"] = "application/json"
            data = json.dumps(req.json_body).encode()
        try:
            async with self.session.request(req.method, url, headers=headers, data=data,
                                            allow_redirects=False) as resp:
                raw = await resp.content.read(self.settings.max_response_bytes + 1)
                if len(raw) > self.settings.max_response_bytes:
                    raise BackendError(
                        f"Backend '{self.settings.name}' answered {req.method} {req.path} with more than "
                        f"{self.settings.max_response_bytes} bytes; narrow the request (filters, paging).")
                status, reason = resp.status, resp.reason or ""
                ctype = resp.headers.get("Content-Type", "")
                kept = {k: resp.headers[k] for k in ("Content-Type", "Retry-After", "Location")
                        if k in resp.headers}
        except aiohttp.ConnectionTimeoutError:
            raise _Retry("connect timeout") from None
        except TimeoutError:
            raise BackendTimeout(
                f"Backend '{self.settings.name}' did not answer {req.method} {req.path} within "
                f"{self.settings.total_timeout:g} s; it may be overloaded. Narrow the request or retry "
                "later.") from None
        except _CONNECTION_ERRORS as e:
            raise _Retry(_describe(e)) from None
        text = raw.decode("utf-8", errors="replace")
        if "json" in ctype.lower() and text:
            try:
                return BackendResponse(status, reason, json.loads(text), True, kept, attempt)
            except ValueError:
                pass
        return BackendResponse(status, reason, text, False, kept, attempt)


def _describe(e: BaseException) -> str:
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"connection to {e.host}:{e.port} failed: {e.os_error.strerror or e.os_error}"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "the backend closed the connection"
    return f"{type(e).__name__}: {e}"
