"""MCP semantics on top of JSON-RPC: protocol versions, the request context, SEP-2243 headers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import HeaderMismatch, InvalidRequest
from gateway.jsonrpc import Message

# The protocol versions the gateway and its servers speak: the only place they are spelled.
# Before MCP-Protocol-Version existed clients did not send it; the spec says assume this one.
DEFAULT_NEGOTIATED_VERSION = "2025-03-26"
# Versions negotiated by initialize, with sessions; the latest is what a server offers.
HANDSHAKE_VERSIONS: tuple[str, ...] = ("2025-06-18", "2025-11-25")
LATEST_HANDSHAKE_VERSION = HANDSHAKE_VERSIONS[-1]
# From this version on, requests are stateless and carry their version in params._meta.
MODERN_VERSION = "2026-07-28"
PROTOCOL_VERSIONS: tuple[str, ...] = (*HANDSHAKE_VERSIONS, MODERN_VERSION)
LATEST_PROTOCOL_VERSION = PROTOCOL_VERSIONS[-1]
# What a client may put in MCP-Protocol-Version (SDK clients send the default on some requests).
SUPPORTED_HEADER_VERSIONS: tuple[str, ...] = (DEFAULT_NEGOTIATED_VERSION, *PROTOCOL_VERSIONS)
STATEFUL_VERSIONS = frozenset({DEFAULT_NEGOTIATED_VERSION, *HANDSHAKE_VERSIONS})
META_PROTOCOL_VERSION = "io.modelcontextprotocol/protocolVersion"
META_CLIENT_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"

# Which param names the target of a method (Mcp-Name header, policy input, audit).
NAME_PARAM: Mapping[str, str] = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    "resources/subscribe": "uri",
    "resources/unsubscribe": "uri",
}


@dataclass(frozen=True, slots=True)
class McpContext:
    """What a gateway component needs to know about one MCP message."""

    kind: str
    method: str | None
    id: str | int | None
    name: str | None = None  # tool / prompt name or resource URI
    tool: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    resource_uri: str | None = None
    prompt: str | None = None
    protocol_version: str | None = None
    session_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def as_policy_input(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "method": self.method,
            "id": self.id,
            "name": self.name,
            "tool": self.tool,
            "arguments": self.arguments,
            "resource_uri": self.resource_uri,
            "prompt": self.prompt,
            "protocol_version": self.protocol_version,
            "session_id": self.session_id,
        }


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # Envoy lower-cases header names; aiohttp's CIMultiDict is case-insensitive already.
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    return value


def extract_context(msg: Message, headers: Mapping[str, str]) -> McpContext:
    """Build the MCP context of a validated message; raise on bad params or header mismatch."""
    method = msg.method
    params = msg.params
    if "params" in msg.raw and not isinstance(msg.raw["params"], dict):
        raise InvalidRequest('"params" must be an object')
    meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
    header_version = _header(headers, "mcp-protocol-version")
    meta_version = meta.get(META_PROTOCOL_VERSION) if meta else None
    if method == "initialize" and isinstance(params.get("protocolVersion"), str):
        version: str | None = params["protocolVersion"]
    else:
        version = header_version or (meta_version if isinstance(meta_version, str) else None)
    name: str | None = None
    tool = prompt = uri = None
    arguments: dict[str, Any] = {}
    key = NAME_PARAM.get(method) if method is not None else None
    if key is not None:
        value = params.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f'"params.{key}" must be a string')
        name = value
        if method == "tools/call":
            tool = value
            args = params.get("arguments", {})
            if args is None:
                args = {}
            if not isinstance(args, dict):
                raise InvalidRequest('"params.arguments" must be an object')
            arguments = args
        elif method == "prompts/get":
            prompt = value
        else:
            uri = value
    check_sep2243_headers(method, name, headers, version)
    return McpContext(
        kind=msg.kind, method=method, id=msg.id, name=name, tool=tool, arguments=arguments,
        resource_uri=uri, prompt=prompt, protocol_version=version,
        session_id=_header(headers, "mcp-session-id"), meta=meta or {},
    )


def check_sep2243_headers(method: str | None, name: str | None, headers: Mapping[str, str],
                          version: str | None) -> None:
    """Mcp-Method / Mcp-Name must agree with the body; required from 2026-07-28 on."""
    method_header = _header(headers, "mcp-method")
    name_header = _header(headers, "mcp-name")
    modern = version is not None and version >= MODERN_VERSION
    if method is None:  # responses carry no method
        return
    if method_header is None:
        if modern:
            raise HeaderMismatch("the Mcp-Method header is required from protocol 2026-07-28 on")
    elif method_header != method:
        raise HeaderMismatch(f"Mcp-Method header {method_header!r} does not match body method {method!r}")
    if name_header is None:
        if modern and name is not None:
            raise HeaderMismatch(f"the Mcp-Name header is required for {method}")
    elif name is None or name_header != name:
        raise HeaderMismatch(f"Mcp-Name header {name_header!r} does not match the body ({name!r})")
