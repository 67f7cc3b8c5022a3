"""Who may call what: every role the policy names against every tool in the catalog, from the
policy itself. A role may call a tool when the policy's list filter (``visible_tools``, what
ext_proc shows that role in ``tools/list``, as ``mcp-gateway catalog list`` reads it) keeps it;
arguments are still checked per call. A denial's reason is ext_authz's decision for a
``tools/call`` of that tool without arguments by a caller holding only that role, on the input
ext_authz would build (shown on hover). Without a list filter, that decision alone decides."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import GatewayError
from gateway.policy.decision import ContractViolation, check_decision
from gateway.policy.errors import PolicyError
from gateway.policy.rego import CompiledPolicy, PolicySources
from gateway.policy.simulate import simulated_input

# The identity each role is probed as (as `mcp-gateway catalog list` lists roles): a tenant the
# example policy admits on every server and the server-wide scope, so what remains is the role's
# grant and the organisation rules.
PROBE_SUB = "console-probe"
PROBE_TENANT = "console-probe"
PROBE_SCOPE = "tools:call:{server}/*"
LIST_ENTRYPOINT = "mcp/authz/visible_tools"


def policy_roles(sources: PolicySources) -> list[str]:
    """The role names of data.gateway.roles in the policy folder's data (none: an empty list)."""
    roles: set[str] = set()
    for _, text in sources.data:
        roles.update(_roles_of(text))
    return sorted(roles)


def _roles_of(text: bytes) -> list[str]:
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return []
    roles = data.get("gateway", {}).get("roles", {}) if isinstance(data, dict) else {}
    return list(roles) if isinstance(roles, dict) else []


@dataclass(frozen=True, slots=True)
class Cell:
    allow: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Matrix:
    roles: list[str]
    tools: list[tuple[str, str]]  # (server, tool)
    cells: dict[tuple[str, str, str], Cell]  # (role, server, tool)


def compute(compiled: CompiledPolicy, entrypoint: str, roles: Iterable[str],
            tools: Iterable[tuple[str, str]], public_url: str) -> Matrix:
    """Decide every (role, tool) with ``compiled`` (call from one thread at a time)."""
    role_list = list(roles)
    tool_list = sorted(set(tools))
    by_server: dict[str, list[str]] = {}
    for server, tool in tool_list:
        by_server.setdefault(server, []).append(tool)
    listing = LIST_ENTRYPOINT in compiled.entrypoints
    cells: dict[tuple[str, str, str], Cell] = {}
    for server, names in by_server.items():
        for role in role_list:
            claims = {"sub": PROBE_SUB, "roles": [role], "tenant": PROBE_TENANT,
                      "scope": PROBE_SCOPE.replace("{server}", server)}
            visible = _visible(compiled, claims, server, names) if listing else None
            for tool in names:
                if visible is not None and tool in visible:
                    cells[(role, server, tool)] = Cell(True, "listed")
                    continue
                body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                     "params": {"name": tool, "arguments": {}}})
                cell = _decide(compiled, entrypoint, claims, body, server, public_url)
                if visible is not None and cell.allow:
                    cell = Cell(False, "not_listed")  # allowed as called, hidden from the list
                cells[(role, server, tool)] = cell
    return Matrix(role_list, tool_list, cells)


def _visible(compiled: CompiledPolicy, claims: dict[str, Any], server: str,
             names: list[str]) -> set[str] | None:
    """The tools the list filter keeps for ``claims`` (None when it fails: decide per call)."""
    try:
        defined, value = compiled.evaluate(LIST_ENTRYPOINT, {
            "token": claims, "server": {"name": server}, "kind": "tools", "items": names})
    except PolicyError:
        return None
    if not defined or not isinstance(value, list):
        return set()
    return {v for v in value if isinstance(v, str)}


def _decide(compiled: CompiledPolicy, entrypoint: str, claims: dict[str, Any], body: bytes, server: str,
            public_url: str) -> Cell:
    try:
        policy_input = simulated_input(claims=claims, request=body, public_url=public_url, server=server)
        defined, value = compiled.evaluate(entrypoint, policy_input)
        decision = check_decision(value, defined=defined)
    except GatewayError as exc:
        return Cell(False, exc.code)
    except ContractViolation:
        return Cell(False, "policy_contract_error")
    except PolicyError:
        return Cell(False, "policy_error")
    return Cell(decision.allow, decision.reason)
