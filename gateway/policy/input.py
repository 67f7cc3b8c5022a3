"""The policy input: one pure function shared by ext_authz and ``mcp-gateway policy eval``.

Modelled on opa-envoy-plugin's input (``attributes.request.http``, ``parsed_body``) plus what
an MCP gateway knows: the MCP context, the verified token claims and the target server. The
shape is documented in policies/README.md; change both together.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from gateway.caller import Caller
from gateway.mcp import McpContext
from gateway.policy.facts import with_facts

# Credentials never reach the policy (nor, through it, the decision log): the policy sees the
# verified claims instead.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
# ``input.mcp.via`` of a request sent to ``/mcp/<server>`` itself; the aggregate endpoints say
# "aggregate" or "virtual:<name>" (gateway.aggregate.views.View.via).
VIA_DIRECT = "direct"


def build_policy_input(
    ctx: McpContext | None,
    *,
    caller: Caller,
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
    now: float | None = None,
    via: str = VIA_DIRECT,
    exposed_name: str | None = None,
) -> dict[str, Any]:
    """Assemble the input document of one decision (ext_authz and ``policy eval`` alike).

    ``ctx``: the MCP context of the JSON-RPC message, or None for a request without one (GET: the
    session's stream; DELETE: its end). ``caller``: who the request acts for (its ``token()`` is
    ``input.token``). ``body``: the parsed JSON-RPC message (``Message.raw``). ``headers``: the
    request's headers; names are compared and kept lower-case (as Envoy sends them), credentials
    dropped. ``session``: the owner of the
    request's session (``ext_authz.sessions``: ``{"iss", "sub", "tenant"}``), or None.
    ``now``: Unix seconds (defaults to the current time). ``via``: how the request reached the
    server (``input.mcp.via``); ``exposed_name``: on an aggregate endpoint, the name, URI or
    answer id the client wrote (``files__read_file``), while everything else in the input is
    what the server receives, as if the request had been sent to ``/mcp/<server>``. Raises
    ``gateway.errors.InputLimitExceeded`` (and other 400s) for arguments over the facts' bounds.
    """
    http_headers: dict[str, str] = {}
    for name, value in (headers or {}).items():
        key = name.lower()
        if key in CREDENTIAL_HEADERS:
            continue
        # Envoy joins repeated headers with ","; a hand-built request may repeat a name in two cases.
        http_headers[key] = f"{http_headers[key]},{value}" if key in http_headers else value
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
        "mcp": _mcp(ctx, http_headers, via, exposed_name),
        "token": caller.token(),
        "server": {"name": server_name, "resource": server_resource},
        "now": int(time.time() if now is None else now),
    }
    if session is not None:
        policy_input["session"] = dict(session)
    return policy_input


def _mcp(ctx: McpContext | None, headers: Mapping[str, str], via: str,
         exposed_name: str | None) -> dict[str, Any]:
    mcp = ctx.as_policy_input() if ctx is not None else _no_message(headers)
    mcp["via"] = via
    mcp["exposed_name"] = exposed_name
    return with_facts(mcp) if ctx is not None else mcp


def _no_message(headers: Mapping[str, str]) -> dict[str, Any]:
    # GET (the session's SSE stream) and DELETE (its end) carry no JSON-RPC message.
    return {
        "kind": None, "method": None, "id": None, "name": None, "tool": None, "arguments": {},
        "resource_uri": None, "prompt": None,
        "protocol_version": headers.get("mcp-protocol-version"),
        "session_id": headers.get("mcp-session-id"),
    }


def build_list_input(*, caller: Caller, server_name: str, server_resource: str, method: str,
                     kind: str, items: list[str], now: float | None = None) -> dict[str, Any]:
    """The input of a list filter (ext_proc asks it for each list answer): the decision input
    of a request without a message, its ``mcp.method`` the list method, plus ``kind`` (tools,
    prompts, resources, resourceTemplates) and ``items`` (the listed names or URIs). The token,
    server and clock are the ones ext_authz's decision read; the request itself is not known
    when the answer is inspected, so its ``attributes`` are empty."""
    policy_input = build_policy_input(None, caller=caller, server_name=server_name,
                                      server_resource=server_resource, now=now)
    policy_input["mcp"]["method"] = method
    policy_input["kind"] = kind
    policy_input["items"] = items
    return policy_input
