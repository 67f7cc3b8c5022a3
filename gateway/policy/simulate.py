"""The policy input of a simulated request: what ext_authz would build for these claims, this
JSON-RPC body and these headers. ``mcp-gateway policy eval`` and the console's playground both
call :func:`simulated_input`, so the two can never decide a request differently; the document
itself comes from ``gateway.policy.input.build_policy_input``, ext_authz's own builder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.caller import Caller
from gateway.jsonrpc import parse_message
from gateway.mcp import NAME_PARAM, extract_context
from gateway.policy.input import build_policy_input

METHODS = ("POST", "GET", "DELETE")


def simulated_input(*, claims: Mapping[str, Any], request: bytes | None, public_url: str,
                    server: str, method: str = "POST", headers: Mapping[str, str] | None = None,
                    session: Mapping[str, Any] | None = None, now: int | None = None) -> dict[str, Any]:
    """The policy input ext_authz builds for ``method`` on ``/mcp/<server>`` by a caller with
    ``claims``. Raises ValueError for a request that is not one (a POST without a body, a GET
    with one) and GatewayError where ext_authz would refuse before the policy (a body that is
    not one JSON-RPC message, an argument over a bound)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    fields = {k.lower(): v for k, v in (headers or {}).items()}
    ctx = None
    body = None
    if method == "POST":
        if request is None:
            raise ValueError("a POST carries a JSON-RPC request")
        msg = parse_message(request)
        # A simulated request: supply the SEP-2243 headers a conforming client would send.
        if msg.method is not None:
            fields.setdefault("mcp-method", msg.method)
            key = NAME_PARAM.get(msg.method)
            if key and isinstance(msg.params.get(key), str):
                fields.setdefault("mcp-name", msg.params[key])
        ctx = extract_context(msg, fields)
        body = msg.raw
    elif request is not None:
        raise ValueError(f"a {method} request carries no JSON-RPC message")
    resource = f"{public_url.rstrip('/')}/mcp/{server}"
    return build_policy_input(
        ctx, caller=Caller.from_claims(claims), server_name=server, server_resource=resource,
        body=body, headers=fields, method=method, path=f"/mcp/{server}",
        host=resource.split("/")[2], session=dict(session) if session is not None else None, now=now)
