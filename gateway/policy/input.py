"""The policy input: one pure function shared by ext_authz and ``mcp-gateway policy eval``.

Modelled on opa-envoy-plugin's input (``attributes.request.http``, ``parsed_body``) plus what
an MCP gateway knows: the MCP context, the verified token claims and the target server. The
shape is documented in policies/README.md; change both together.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from gateway.mcp import McpContext
from gateway.policy.facts import with_facts

# Credentials never reach the policy (nor, through it, the decision log): the policy sees the
# verified claims instead.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


def build_policy_input(
    ctx: McpContext,
    *,
    claims: Mapping[str, Any],
    server_name: str,
    server_resource: str,
    body: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    method: str = "POST",
    path: str = "",
    host: str = "",
    scheme: str = "https",
    request_id: str = "",
    source_address: str = "",
    session: Mapping[str, Any] | None = None,
    now: int | None = None,
) -> dict[str, Any]:
    """Assemble the input document of one decision.

    ``claims``: the verified JWT claims (sub, iss, aud, exp, iat, scope, roles, tenant,
    client_id, ...). ``body``: the parsed JSON-RPC message (``Message.raw``). ``session``: what
    the gateway's session store knows about ``ctx.session_id`` (e.g. ``{"sub", "tenant"}``), or
    None. ``now``: Unix seconds (defaults to the current time).
    """
    http_headers = {k.lower(): v for k, v in (headers or {}).items()
                    if k.lower() not in CREDENTIAL_HEADERS}
    policy_input: dict[str, Any] = {
        "attributes": {
            "request": {
                "http": {
                    "id": request_id,
                    "method": method,
                    "path": path,
                    "host": host,
                    "scheme": scheme,
                    "headers": http_headers,
                },
            },
            "source": {"address": source_address},
        },
        "parsed_body": dict(body) if body is not None else None,
        "mcp": with_facts(ctx.as_policy_input()),
        "token": dict(claims),
        "server": {"name": server_name, "resource": server_resource},
        "now": int(time.time()) if now is None else now,
    }
    if session is not None:
        policy_input["session"] = dict(session)
    return policy_input
