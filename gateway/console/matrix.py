"""Who may call what: every role the policy names against every tool in the catalog, decided by
the policy itself (ext_authz's decision entrypoint, on the input ext_authz would build for a
``tools/call`` of that tool without arguments by a caller holding only that role). A cell holds
the decision's reason, shown on hover for a denial."""

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
    cells: dict[tuple[str, str, str], Cell] = {}
    for server, tool in tool_list:
        body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                             "params": {"name": tool, "arguments": {}}})
        for role in role_list:
            claims = {"sub": PROBE_SUB, "roles": [role], "tenant": PROBE_TENANT,
                      "scope": PROBE_SCOPE.replace("{server}", server)}
            cells[(role, server, tool)] = _decide(compiled, entrypoint, claims, body, server, public_url)
    return Matrix(role_list, tool_list, cells)


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
