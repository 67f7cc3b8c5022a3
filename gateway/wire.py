"""The wire contract between Envoy, ext_authz, ext_proc and the MCP servers, in one place.

Every header name the gateway owns, the dynamic-metadata namespace and the codec of identity
header values (the encoder ext_authz uses beside the decoder the servers use) live here, so the
services and the rendered Envoy config (``gatewayctl.envoy_config``) agree by construction.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

# Identity headers: set by ext_authz alone from verified claims; a client's copies are dropped
# (Envoy's edge route and ext_authz's removal list), so an upstream can rely on them.
USER_HEADER = "x-mcp-user"
ISSUER_HEADER = "x-mcp-issuer"
TENANT_HEADER = "x-mcp-tenant"
CLIENT_ID_HEADER = "x-mcp-client-id"
ROLES_HEADER = "x-mcp-roles"
TOOL_HEADER = "x-mcp-tool"
DECISION_ID_HEADER = "x-mcp-decision-id"
IDENTITY_HEADERS = (USER_HEADER, ISSUER_HEADER, TENANT_HEADER, CLIENT_ID_HEADER, ROLES_HEADER,
                    TOOL_HEADER, DECISION_ID_HEADER)
# The caller assertion (gateway.assertion): a short-lived JWT ext_authz signs for each allowed
# request, sent upstream in place of the identity headers above when ``identity.assertion`` is on.
ASSERTION_HEADER = "x-mcp-assertion"
# Set by ext_authz alone on requests whose answer ext_proc must inspect; Envoy routes on it, so a
# client's copy would let it force inspection.
INSPECT_HEADER = "x-mcp-inspect"
# The aggregate endpoints (/mcp, /mcp/<virtual>; gateway.aggregate): ext_authz names the route
# Envoy takes after its check (a server's name, or AGGREGATOR_ROUTE for the aggregator) and always
# sets it there, so a client's copy never routes. For a call aimed at one server it also hands
# Envoy's Lua filter the one byte-exact body rewrite it checked (at byte offset, length, the JSON
# text put in: the real tool name, prompt name, URI or answer id) and the client's request id as
# JSON text (for the JSON-RPC error Envoy answers when that server is down).
ROUTE_HEADER = "x-mcp-route"
AGGREGATOR_ROUTE = "_aggregator"
REWRITE_AT_HEADER = "x-mcp-rw-at"
REWRITE_LEN_HEADER = "x-mcp-rw-len"
REWRITE_TO_HEADER = "x-mcp-rw-to"
REWRITE_HEADERS = (REWRITE_AT_HEADER, REWRITE_LEN_HEADER, REWRITE_TO_HEADER)
ID_JSON_HEADER = "x-mcp-id-json"
# ext_authz sets or removes each of these on every allowed request (whatever the path), and a
# policy's headers never set them; Envoy's edge strips a client's copies too.
AGGREGATE_HEADERS = (ROUTE_HEADER, *REWRITE_HEADERS, ID_JSON_HEADER)
# Every header the gateway owns towards the upstream: a client-sent copy never survives.
GATEWAY_HEADERS = (*IDENTITY_HEADERS, ASSERTION_HEADER, INSPECT_HEADER)
# Sent by the aggregator on its /mcp/<server> legs for a virtual server's session, naming the
# view: ext_authz then accepts the virtual server's token there for what the view holds. Not a
# gateway-owned header: a client that sends it only narrows its own access.
VIEW_HEADER = "x-mcp-view"
# Envoy's Lua filter on the aggregate routes keeps the server and the client's request id of a
# routed call here (keys "server" and "id"), for the response rewrite and the local reply.
AGGREGATE_NAMESPACE = "mcp.agg"

# What ext_authz's HTTP transport says to Envoy in headers (never taken from a client either):
# the real status of a 5xx it answers as 400, the caller context for ext_proc, the client's TCP
# address (added by Envoy to each check), and the upstream headers Envoy must remove.
STATUS_HEADER = "x-mcp-status"
CONTEXT_HEADER = "mcp-gateway-context"
PEER_HEADER = "x-mcp-peer-address"
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
SIGNAL_HEADERS = (STATUS_HEADER, CONTEXT_HEADER, PEER_HEADER, REMOVE_HEADER)

# ext_authz files its dynamic metadata (the caller context ext_proc needs) under this namespace;
# the caller context is the key CONTEXT_HEADER in it.
EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"

# Identity values travel as printable ASCII with anything else (and "%" itself) percent-encoded,
# so a claim can never inject a header line or an invalid header value. A space at either end is
# encoded too: HTTP parsers trim it, and " alice" must not reach a server as "alice".
_IDENTITY_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def encode_identity(value: str, *, reserved: str = "") -> str:
    """An identity value as a header value (``decode_identity`` is its inverse). ``reserved``:
    characters percent-encoded besides the usual ones (a list's separator)."""
    if value.isascii() and value.isprintable() and "%" not in value \
            and not any(c in value for c in reserved) and value[:1] != " " and value[-1:] != " ":
        return value
    encoded = quote(value, safe=_safe(reserved))
    if encoded.startswith(" "):
        encoded = "%20" + encoded[1:]
    if encoded.endswith(" "):
        encoded = encoded[:-1] + "%20"
    return encoded


def decode_identity(value: str | None, *, reserved: str = "") -> str | None:
    """An identity header's value, decoded; raises ValueError for a spelling
    :func:`encode_identity` (with the same ``reserved``) never produces, so one identity has
    exactly one form (``%41`` is not ``A``)."""
    if value is None:
        return value
    if any(c in value for c in reserved):
        raise ValueError("an identity header value holds a reserved character unencoded")
    if "%" not in value:
        return value
    try:
        decoded = unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise ValueError("an identity header value is not valid percent-encoded UTF-8") from None
    if encode_identity(decoded, reserved=reserved) != value:
        raise ValueError("an identity header value is not in the gateway's encoding")
    return decoded


def _safe(reserved: str) -> str:
    return _IDENTITY_SAFE if not reserved else "".join(c for c in _IDENTITY_SAFE if c not in reserved)
