"""How Python components of the gateway reach an MCP server: one description per endpoint.

Envoy routes client traffic; a few gateway components talk to the servers themselves: ext_authz
and ``mcp-gateway catalog`` fetch tool listings, and the dev stack checks health. They all build
an :class:`UpstreamTarget` here from the server's config entry, so a ``url`` server is reached
with the URL, TLS settings, Host header and static headers Envoy uses, and a ``module`` or
``command`` server (or its stdio bridge) at ``http://host:port/mcp``.

Static header values name secrets (``Bearer ${KEY}``); they are resolved from the environment
here, and a secret that is not set is an error naming the server and the header, never an empty
or placeholder credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from gateway import inner_tls
from gateway.config import ServerConfig
from gateway.errors import GatewayError
from gateway.jsonrpc import loads_strict
from gateway.mcp import (
    LATEST_HANDSHAKE_VERSION,
    META_CLIENT_CAPABILITIES,
    META_PROTOCOL_VERSION,
    MODERN_VERSION,
)
from gateway.sse import SseParser

_REF_OPEN = "${"
MAX_BODY = 16 * 1024 * 1024
PROBE_CLIENT_INFO = {"name": "mcp-gateway-health", "version": "0.1.0"}


class UpstreamError(GatewayError):
    """An upstream cannot be described (a secret missing, a TLS file unreadable)."""

    code = "upstream_config_error"
    http_status = 500


class ProbeFailed(GatewayError):
    """A health probe did not get the answer it needs; the message says what it got."""

    code = "upstream_unhealthy"
    http_status = 503


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """One endpoint of one MCP server, as an HTTP client must call it."""

    server: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)  # Host and static headers
    ssl: ssl.SSLContext | None = None
    server_hostname: str | None = None  # SNI and the certificate's name, when not the URL's host
    # inner_tls: the client certificate behind ``ssl``, re-read when its files changed.
    inner: inner_tls.ReloadingTls | None = None

    def request_kwargs(self) -> dict[str, Any]:
        """What aiohttp's request methods need besides the URL and headers."""
        out: dict[str, Any] = {}
        if self.inner is not None:
            self.inner.check()  # a rotated certificate for the next connection (a stat and a hash)
        if self.ssl is not None:
            out["ssl"] = self.ssl
        if self.server_hostname is not None:
            out["server_hostname"] = self.server_hostname
        return out


def resolve_headers(server: ServerConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """The server's static headers with every ``${NAME}`` replaced by the secret's value."""
    out: dict[str, str] = {}
    for name, template in server.headers:
        value = template
        while _REF_OPEN in value:
            start = value.index(_REF_OPEN)
            end = value.index("}", start)
            secret = value[start + 2:end]
            if not environ.get(secret):
                raise UpstreamError(f"servers.{server.name}.headers.{name}: the secret {secret} "
                                    f"is not set in the environment")
            value = value[:start] + environ[secret] + value[end + 1:]
        if any(c in value for c in "\r\n\0"):
            raise UpstreamError(f"servers.{server.name}.headers.{name}: the secret's value is "
                                f"not a one-line header value")
        out[name] = value
    return out


def ssl_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The client TLS context of an https ``url`` server (verification always on)."""
    if server.kind != "url" or not server.urls or server.urls[0].scheme != "https":
        return None
    tls = server.tls
    try:
        context = ssl.create_default_context(cafile=tls.ca_file if tls is not None else None)
        if tls is not None and tls.client_cert_file and tls.client_key_file:
            context.load_cert_chain(tls.client_cert_file, tls.client_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise UpstreamError(f"servers.{server.name}.tls: {exc}") from None
    return context


def targets(server: ServerConfig, environ: Mapping[str, str]) -> tuple[UpstreamTarget, ...]:
    """Every endpoint of ``server``. A module or command server is reached over TLS with this
    process's inner certificate when ``environ`` names one (inner_tls: the server requires it)."""
    if server.kind != "url":
        files = inner_tls.files_from_env(environ)
        client = inner_tls.ReloadingTls(files, server=False) if files is not None else None
        scheme = "https" if client is not None else "http"
        return tuple(UpstreamTarget(server.name, f"{scheme}://{_authority(i.host, i.port)}/mcp",
                                    ssl=client.context if client is not None else None,
                                    inner=client) for i in server.instances)
    headers = resolve_headers(server, environ)
    context = ssl_context(server)
    sni = server.tls.server_name if server.tls is not None else None
    out = []
    for u in server.urls:
        h = dict(headers)
        if server.host_header is not None:
            h["Host"] = server.host_header
        out.append(UpstreamTarget(server.name, u.url, h, context, sni))
    return tuple(out)


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def probe(http: aiohttp.ClientSession, target: UpstreamTarget, kind: str, *,
                health_path: str | None = None, seconds: float = 5.0) -> None:
    """Check one endpoint the way its config asks; raises ProbeFailed saying what it got.

    ``handshake``: initialize, notifications/initialized, ping and the end of the session (any
    MCP server); ``discover``: one stateless ``server/discover`` (2026-07-28 servers); ``tcp``: a
    connection; ``http``: GET ``health_path`` answering 2xx."""
    try:
        async with asyncio.timeout(seconds):
            if kind == "tcp":
                await _tcp(target)
            elif kind == "http":
                await _http(http, target, health_path or "/")
            elif kind == "discover":
                await _discover(http, target)
            else:
                await _handshake(http, target)
    except TimeoutError:
        raise ProbeFailed(f"{target.url}: no answer within {seconds:g} s") from None
    except aiohttp.ClientError as exc:
        raise ProbeFailed(f"{target.url}: {exc}") from None
    except OSError as exc:
        raise ProbeFailed(f"{target.url}: {exc.strerror or exc}") from None
    except ProbeFailed as exc:
        raise ProbeFailed(f"{target.url}: {exc.message}") from None
    except GatewayError as exc:  # an answer that is not JSON-RPC (gateway.jsonrpc's errors)
        raise ProbeFailed(f"{target.url}: {exc.message}") from None


async def _tcp(target: UpstreamTarget) -> None:
    url = URL(target.url)
    _, writer = await asyncio.open_connection(url.host, url.port)
    writer.close()  # closed before any await: a deadline or a reset cannot leave it open
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _http(http: aiohttp.ClientSession, target: UpstreamTarget, path: str) -> None:
    url = str(URL(target.url).with_path(path))
    async with http.get(url, headers=target.headers, **target.request_kwargs()) as resp:
        if not 200 <= resp.status < 300:
            raise ProbeFailed(f"GET {url} answered HTTP {resp.status}")


_JSON_HEADERS = {"Accept": "application/json, text/event-stream",
                 "Content-Type": "application/json"}


async def _post(http: aiohttp.ClientSession, target: UpstreamTarget, body: dict[str, Any],
                headers: Mapping[str, str]) -> tuple[int, dict[str, Any] | None, str | None]:
    """One JSON-RPC POST: the status, the response message (JSON or the first SSE event with
    an id) and the session id the server handed out."""
    async with http.post(target.url, json=body, headers={**target.headers, **_JSON_HEADERS,
                                                         **headers},
                         **target.request_kwargs()) as resp:
        message = await read_response(resp, body.get("id"))
        return resp.status, message, resp.headers.get("Mcp-Session-Id")


async def _handshake(http: aiohttp.ClientSession, target: UpstreamTarget) -> None:
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": LATEST_HANDSHAKE_VERSION, "capabilities": {},
                       "clientInfo": PROBE_CLIENT_INFO}}
    status, message, session = await _post(http, target, init, {})
    _expect_result("initialize", status, message)
    assert message is not None
    version = str(message["result"].get("protocolVersion", LATEST_HANDSHAKE_VERSION))
    headers = {"MCP-Protocol-Version": version}
    if session is not None:
        headers["Mcp-Session-Id"] = session
    try:
        status, _, _ = await _post(http, target, {"jsonrpc": "2.0",
                                                  "method": "notifications/initialized"}, headers)
        if status >= 400:
            raise ProbeFailed(f"{target.url}: notifications/initialized answered HTTP {status}")
        status, message, _ = await _post(http, target,
                                         {"jsonrpc": "2.0", "id": 2, "method": "ping"}, headers)
        _expect_result("ping", status, message)
    finally:
        if session is not None:
            async with http.delete(target.url, headers={**target.headers, **headers},
                                   **target.request_kwargs()):
                pass


async def _discover(http: aiohttp.ClientSession, target: UpstreamTarget) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "server/discover",
            "params": {"_meta": {META_PROTOCOL_VERSION: MODERN_VERSION,
                                 META_CLIENT_CAPABILITIES: {}}}}
    status, message, _ = await _post(http, target, body, {"MCP-Protocol-Version": MODERN_VERSION,
                                                          "Mcp-Method": "server/discover"})
    _expect_result("server/discover", status, message)


def _expect_result(method: str, status: int, message: dict[str, Any] | None) -> None:
    if message is not None and isinstance(message.get("result"), dict):
        return
    if message is not None and isinstance(message.get("error"), dict):
        err = message["error"]
        raise ProbeFailed(f"{method} answered JSON-RPC error {err.get('code')}: "
                          f"{err.get('message')} (HTTP {status})")
    raise ProbeFailed(f"{method} answered HTTP {status} without a JSON-RPC result")


async def read_response(resp: aiohttp.ClientResponse, rid: Any) -> dict[str, Any] | None:
    """The JSON-RPC response to request ``rid`` in an answer (JSON, or the first SSE event that
    carries it: server requests and notifications may come first); None for an answer with no
    JSON-RPC body (202, an HTTP error page). Bounded by :data:`MAX_BODY`."""
    ctype = resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if ctype == "application/json":
        raw = await resp.content.read(MAX_BODY + 1)
        if not raw:
            return None  # 202 to a notification, or an empty error answer
        message = loads_strict(raw, max_bytes=MAX_BODY)
        return message if isinstance(message, dict) else None
    if ctype != "text/event-stream":
        return None
    parser = SseParser(max_buffer=MAX_BODY)
    async for chunk in resp.content.iter_any():
        for event in parser.feed(chunk):
            if event.data is None:
                continue
            message = loads_strict(event.data.encode("utf-8"), max_bytes=MAX_BODY)
            if isinstance(message, dict) and message.get("id") == rid and "method" not in message:
                return message
    return None
