"""Envoy CheckRequest -> the facts ext_authz needs and the policy input (pure functions).

The policy input shape is documented in ``policies/README.md``; it follows opa-envoy-plugin's
(``attributes.request.http``, ``parsed_body``) and adds ``mcp``, ``token`` and ``server``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from ext_authz.errors import InvalidToken, MissingToken, TokenInQuery
from gateway.caller import Caller
from gateway.mcp import McpContext
from gateway.policy.input import VIA_DIRECT, build_policy_input

# Set by Envoy when the body was cut at max_request_bytes (allow_partial_message).
PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"
MCP_PATH_PREFIX = "/mcp/"


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """The parts of the Envoy HTTP request attributes ext_authz reads."""

    id: str
    method: str
    path: str
    host: str
    scheme: str
    headers: dict[str, str]  # lower-case names, as Envoy sends them
    body: bytes
    source_address: str


def http_request(req: Any) -> HttpRequest:
    """Read a ``CheckRequest`` (xds-protos message) into an :class:`HttpRequest`."""
    attrs = req.attributes
    http = attrs.request.http
    headers = dict(http.headers)
    if not headers and len(http.header_map.headers):
        # Envoy sends header_map instead when encode_raw_headers is on; values may be raw bytes.
        for hv in http.header_map.headers:
            value = hv.value or hv.raw_value.decode("utf-8", "replace")
            key = hv.key.lower()
            headers[key] = f"{headers[key]},{value}" if key in headers else value
    body = http.raw_body or http.body.encode("utf-8")
    sock = attrs.source.address.socket_address
    return HttpRequest(http.id, http.method, http.path, http.host, http.scheme, headers, body,
                       sock.address)


def server_of(path: str) -> str | None:
    """The server name of ``/mcp/<server>`` (optionally followed by ``/...`` or a query)."""
    if not path.startswith(MCP_PATH_PREFIX):
        return None
    rest = path[len(MCP_PATH_PREFIX):]
    end = len(rest)
    for sep in ("?", "/", "#"):
        i = rest.find(sep)
        if i != -1 and i < end:
            end = i
    return rest[:end] or None


def check_query(path: str) -> None:
    """Refuse a bearer token in the query string (RFC 6750 section 2.3 is not supported)."""
    q = path.find("?")
    if q == -1:
        return
    for name, _ in parse_qsl(path[q + 1:].split("#", 1)[0], keep_blank_values=True):
        if name == "access_token":
            raise TokenInQuery("send the access token in the Authorization header, never in the URL")


def bearer_token(headers: dict[str, str]) -> str:
    """The token of ``Authorization: Bearer <token>``; raise MissingToken / InvalidToken."""
    value = headers.get("authorization")
    if value is None or not value.strip():
        raise MissingToken("this resource needs a bearer token in the Authorization header")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise InvalidToken("the Authorization header must use the Bearer scheme", code="invalid_scheme")
    token = token.strip()
    # Envoy joins repeated headers with ","; a token never contains "," or spaces.
    if not token or " " in token or "," in token:
        raise InvalidToken("the Authorization header must carry exactly one bearer token",
                           code="malformed_token")
    return token


def policy_input(req: HttpRequest, *, parsed_body: dict[str, Any] | None, mcp: McpContext | None,
                 caller: Caller, server: str, resource: str, now: float,
                 session: Mapping[str, str | None] | None = None, via: str = VIA_DIRECT,
                 exposed_name: str | None = None) -> dict[str, Any]:
    """The document the policy decides on: the one builder ``policy eval`` uses too, fed from the
    Envoy request. ``session`` (the owner of the request's session, ``ext_authz.sessions``) only
    when the request names a session; ``via`` and ``exposed_name``: see ``build_policy_input``."""
    return build_policy_input(
        mcp, caller=caller, server_name=server, server_resource=resource, body=parsed_body,
        headers=req.headers, method=req.method, path=req.path, host=req.host, scheme=req.scheme,
        request_id=req.id, source_address=req.source_address, session=session, now=now, via=via,
        exposed_name=exposed_name)
