"""One tool call through the gateway (Envoy, https), as the caller: the step's transport.

Protocol 2026-07-28 (stateless: one POST per call, no session), with the delegated token of
:mod:`mcp_servers.workflow.delegation` as the bearer. Every outcome is a :class:`StepOutcome` or a
:class:`StepError` with a stable ``reason``; ``retryable`` says whether an idempotent step may try
again (the call may not have reached the tool: connection failures, 429, 502-504, timeouts).

``outcome_unknown`` says that the call was sent and nothing tells whether it took effect: no
answer in time, an answer that is not the call's JSON-RPC response (cut off, over the size limit,
not JSON), a 5xx without a JSON-RPC error, an SSE stream that ended first, a connection reset
after sending. Only a failure to connect, a refusal (401/403/429, 4xx) or a JSON-RPC error / tool
error are known not to have (or to have failed to) run.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from gateway.errors import GatewayError
from gateway.jsonrpc import validate_message
from gateway.mcp import META_CLIENT_CAPABILITIES, META_PROTOCOL_VERSION, MODERN_VERSION
from gateway.sse import SseError, SseParser

MAX_ANSWER_BYTES = 4 * 1024 * 1024
MAX_TEXT = 500

# Stable reasons of a failed step (the client's error and the run record name them).
REFUSED = "refused"  # the gateway refused the call (policy, scope, catalog, rate limit)
TOOL_ERROR = "tool_error"  # the tool answered isError
RPC_ERROR = "rpc_error"  # the server answered a JSON-RPC error
UNAVAILABLE = "unavailable"  # no answer (connection, 5xx, 429)
TIMEOUT = "timeout"
BAD_ANSWER = "bad_answer"
BAD_ARGUMENTS = "bad_arguments"  # a reference had no value
BAD_OUTPUT = "bad_output"  # the step's output does not match its output_schema
DECLINED = "declined"  # an approval was declined or cancelled
INTERRUPTED = "interrupted"  # the server stopped during the run


UNKNOWN_NOTE = " (the call was sent: it may have taken effect)"


class StepError(Exception):
    def __init__(self, reason: str, message: str, *, retryable: bool = False,
                 detail: dict[str, Any] | None = None, outcome_unknown: bool = False) -> None:
        if outcome_unknown:
            message = message[:MAX_TEXT - len(UNKNOWN_NOTE)] + UNKNOWN_NOTE
        super().__init__(message)
        self.reason = reason
        self.message = message[:MAX_TEXT]
        self.retryable = retryable
        self.detail = detail or {}
        # The call was sent and may have taken effect (module docstring).
        self.outcome_unknown = outcome_unknown


@dataclass(frozen=True, slots=True)
class StepOutcome:
    output: Any  # structuredContent, else the JSON of a single text block, else {"text": ...}


def output_of(result: dict[str, Any]) -> Any:
    structured = result.get("structuredContent")
    if isinstance(structured, dict):
        return structured
    texts = [c.get("text", "") for c in result.get("content", [])
             if isinstance(c, dict) and c.get("type") == "text"]
    joined = "\n".join(t for t in texts if isinstance(t, str))
    if len(texts) == 1:
        try:
            return orjson.loads(joined)
        except orjson.JSONDecodeError:
            pass
    return {"text": joined}


def _error_text(result: dict[str, Any]) -> str:
    texts = [c.get("text", "") for c in result.get("content", []) if isinstance(c, dict)]
    return " ".join(t for t in texts if isinstance(t, str)) or "the tool reported an error"


MAX_CONNECT_TEXT = 300


def parse_connect(text: str) -> tuple[str, int]:
    """``host:port`` or ``https://host[:port]`` (443 by default): where the gateway is reached
    when its public URL's host does not lead there (docker compose: Envoy's service name).
    Anything else (another scheme, a path, credentials, no port) is a ValueError."""
    if not text or len(text) > MAX_CONNECT_TEXT or any(c.isspace() for c in text):
        raise ValueError(f"expected host:port or https://host[:port], got {text[:80]!r}")
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme != "https":
            raise ValueError(f"only https:// (the gateway's TLS listener), got {text!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username \
                or parts.password:
            raise ValueError(f"only a host and a port, got {text!r}")
        host, default_port = parts.hostname, 443
        try:
            port = parts.port or default_port
        except ValueError:
            raise ValueError(f"bad port in {text!r}") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"expected host:port or https://host[:port], got {text!r}")
        host, port = host.removeprefix("[").removesuffix("]"), int(port_text)
    if not host or not 1 <= port <= 65535:
        raise ValueError(f"expected host:port or https://host[:port], got {text!r}")
    return host, port


class ConnectResolver(AbstractResolver):
    """Resolves the public host (and only it: any other name is refused) to ``connect``'s
    addresses. The URL keeps the public host, so the Host header, the TLS server name and the
    certificate check are the public name's; only the TCP connection goes elsewhere."""

    def __init__(self, public_host: str, connect: tuple[str, int]) -> None:
        self.public_host = public_host
        self.connect = connect
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host.rstrip(".").lower() != self.public_host:
            raise OSError(f"{host} is not the gateway's public host ({self.public_host})")
        target, target_port = self.connect
        try:
            ip = ipaddress.ip_address(target)
        except ValueError:
            found = await self._inner.resolve(target, target_port, family)
            return [{**r, "hostname": host, "port": target_port} for r in found]
        return [{"hostname": host, "host": str(ip), "port": target_port,
                 "family": socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        await self._inner.close()


class GatewayClient:
    """Calls ``<gateway>/mcp/<server>``; one connection pool per process. With ``connect``
    (host, port) the TCP connections go there, the requests still naming the gateway's URL."""

    def __init__(self, gateway_url: str, ssl_context: ssl.SSLContext | None,
                 connect: tuple[str, int] | None = None) -> None:
        self.base = gateway_url.rstrip("/")
        self._ssl = ssl_context
        self._connect = connect
        self._http: aiohttp.ClientSession | None = None
        self._resolver: ConnectResolver | None = None
        self._ids = itertools.count(1)
        if connect is not None:
            host = urlsplit(self.base).hostname
            if host is None or _is_ip(host):
                raise ValueError(f"{gateway_url}: a separate connect address needs a host name "
                                 "in the gateway's URL")

    async def open(self) -> None:
        if self._connect is not None:
            host = urlsplit(self.base).hostname
            assert host is not None
            self._resolver = ConnectResolver(host.lower(), self._connect)
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            ssl=self._ssl or True, resolver=self._resolver))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._resolver is not None:
            await self._resolver.close()

    async def call(self, server: str, tool: str, arguments: dict[str, Any], token: str,
                   *, timeout_seconds: float) -> StepOutcome:
        assert self._http is not None, "open() first"
        rid = next(self._ids)
        body = {"jsonrpc": "2.0", "id": rid, "method": "tools/call",
                "params": {"name": tool, "arguments": arguments,
                           "_meta": {META_PROTOCOL_VERSION: MODERN_VERSION,
                                     META_CLIENT_CAPABILITIES: {}}}}
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                   "Accept": "application/json, text/event-stream",
                   "MCP-Protocol-Version": MODERN_VERSION, "Mcp-Method": "tools/call",
                   "Mcp-Name": tool}
        try:
            async with self._http.post(f"{self.base}/mcp/{server}", data=orjson.dumps(body),
                                       headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=timeout_seconds)) as resp:
                message = await self._answer(resp, rid)
                status = resp.status
        except TimeoutError:
            raise StepError(TIMEOUT, f"no answer within {timeout_seconds:g} s", retryable=True,
                            outcome_unknown=True) from None
        except aiohttp.ClientConnectorError as exc:
            # No connection was made: nothing was sent.
            raise StepError(UNAVAILABLE, f"the gateway is unreachable ({type(exc).__name__})",
                            retryable=True) from None
        except aiohttp.ClientError as exc:
            # Connected, then reset, closed or cut off: the request may have been delivered.
            raise StepError(UNAVAILABLE, f"the connection to the gateway failed "
                            f"({type(exc).__name__})", retryable=True,
                            outcome_unknown=True) from None
        error = message.get("error") if message is not None else None
        if status in (401, 403) or (status == 429 and isinstance(error, dict)):
            reason = error.get("data", {}).get("reason") if isinstance(error, dict) \
                and isinstance(error.get("data"), dict) else None
            text = error.get("message") if isinstance(error, dict) else None
            raise StepError(REFUSED, f"the gateway refused the call (HTTP {status}"
                            f"{', ' + str(reason) if reason else ''}): {text or ''}".rstrip(": "),
                            retryable=status == 429,
                            detail={"http_status": status, "reason": reason})
        if message is None:
            # A 4xx without a JSON-RPC error was refused on the way (Envoy: no route, too large);
            # a 2xx or a 5xx (502/504: the server did not answer in time or reset) may have run.
            raise StepError(UNAVAILABLE if status >= 500 else BAD_ANSWER,
                            f"HTTP {status} without a JSON-RPC answer", retryable=status in (502, 503, 504),
                            outcome_unknown=not 400 <= status < 500)
        if isinstance(error, dict):
            retry = status in (502, 503, 504)
            raise StepError(UNAVAILABLE if retry else RPC_ERROR,
                            f"{error.get('code')}: {error.get('message')}", retryable=retry,
                            detail={"code": error.get("code"), "http_status": status})
        result = message.get("result")
        if not isinstance(result, dict):
            raise StepError(BAD_ANSWER, "the answer has no result", outcome_unknown=True)
        if result.get("isError") is True:
            raise StepError(TOOL_ERROR, _error_text(result))
        return StepOutcome(output_of(result))

    @staticmethod
    async def _answer(resp: aiohttp.ClientResponse, rid: int) -> dict[str, Any] | None:
        ctype = resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype == "application/json":
            # The whole body, to the end of the stream (it may come in many chunks), bounded.
            if resp.content_length is not None and resp.content_length > MAX_ANSWER_BYTES:
                raise StepError(BAD_ANSWER, "answer over the size limit", outcome_unknown=True)
            raw = bytearray()
            async for chunk in resp.content.iter_any():
                raw += chunk
                if len(raw) > MAX_ANSWER_BYTES:
                    raise StepError(BAD_ANSWER, "answer over the size limit", outcome_unknown=True)
            try:
                msg = validate_message(orjson.loads(raw))
            except (orjson.JSONDecodeError, GatewayError):
                return None
            return msg.raw if msg.kind == "response" else None
        if ctype == "text/event-stream":
            parser = SseParser(max_buffer=MAX_ANSWER_BYTES)
            try:
                async for chunk in resp.content.iter_any():
                    for event in parser.feed(chunk):
                        if not event.data:
                            continue
                        try:
                            msg = validate_message(orjson.loads(event.data))
                        except (orjson.JSONDecodeError, GatewayError):
                            raise StepError(BAD_ANSWER, "an SSE event is not JSON-RPC",
                                            outcome_unknown=True) from None
                        if msg.kind == "response" and msg.raw.get("id") == rid:
                            return msg.raw
            except SseError as exc:
                raise StepError(BAD_ANSWER, exc.message, outcome_unknown=True) from None
            raise StepError(UNAVAILABLE, "the SSE answer ended without a response", retryable=False,
                            outcome_unknown=True)
        await resp.read()
        return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
