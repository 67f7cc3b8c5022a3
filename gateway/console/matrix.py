"""Who may call what: every role the policy names against every tool in the catalog, from the
policy itself. A role may call a tool when the policy's list filter (``visible_tools``, what
ext_proc shows that role in ``tools/list``, as ``mcp-gateway catalog list`` reads it) keeps it;
arguments are still checked per call. A denial's reason is ext_authz's decision for a
``tools/call`` of that tool without arguments by a caller holding only that role, on the input
ext_authz would build (shown on hover). Without a list filter, that decision alone decides."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
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
# What the policy reads to tell tenants apart: then the matrix is computed per tenant.
TENANT_REFERENCE = "input.token.tenant"
# Evaluations one computation makes at most (roles x tenants x tools): tenants beyond what fits
# are left out, and the page names them.
MAX_EVALUATIONS = 50_000


def uses_tenant(sources: PolicySources) -> bool:
    """Whether a Rego module of the policy reads ``input.token.tenant``."""
    return any(TENANT_REFERENCE in m.source for m in sources.modules)


def policy_tenants(sources: PolicySources) -> list[str]:
    """The tenant names of ``data.gateway.servers.<name>.tenants`` in the policy data ("*", any
    tenant, is not a name)."""
    names: set[str] = set()
    for _, text in sources.data:
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            continue
        servers = data.get("gateway", {}).get("servers", {}) if isinstance(data, dict) else {}
        for server in servers.values() if isinstance(servers, dict) else ():
            tenants = server.get("tenants") if isinstance(server, dict) else None
            names.update(t for t in tenants or () if isinstance(t, str) and t != "*")
    return sorted(names)


def matrix_tenants(sources: PolicySources, configured: Iterable[str]) -> list[str]:
    """The tenants to compute the matrix for: the probe tenant when the policy does not read the
    tenant; else ``console.matrix_tenants``, else the tenants the policy data names, else the
    probe tenant (a tenant every server admitting "*" admits)."""
    if not uses_tenant(sources):
        return [PROBE_TENANT]
    return list(configured) or policy_tenants(sources) or [PROBE_TENANT]


def bounded_tenants(tenants: list[str], roles: int, tools: int) -> tuple[list[str], list[str]]:
    """(kept, left out): as many tenants as fit in MAX_EVALUATIONS, at least one."""
    per_tenant = max(roles * tools, 1)
    room = max(MAX_EVALUATIONS // per_tenant, 1)
    return tenants[:room], tenants[room:]


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
    tenant: str = PROBE_TENANT


@dataclass(frozen=True, slots=True)
class TenantMatrices:
    """One matrix per tenant (one, for the probe tenant, when the policy ignores tenants)."""

    by_tenant: dict[str, Matrix]
    per_tenant: bool  # the policy reads input.token.tenant
    left_out: list[str] = field(default_factory=list)  # tenants over MAX_EVALUATIONS

    @property
    def tenants(self) -> list[str]:
        return list(self.by_tenant)


def compute_all(compiled: CompiledPolicy, entrypoint: str, roles: list[str],
                tools: list[tuple[str, str]], public_url: str,
                configured_tenants: Iterable[str] = ()) -> TenantMatrices:
    """Every tenant's matrix, within MAX_EVALUATIONS (call from one thread at a time)."""
    per_tenant = uses_tenant(compiled.sources)
    kept, left_out = bounded_tenants(matrix_tenants(compiled.sources, configured_tenants),
                                     len(roles), len(set(tools)))
    return TenantMatrices({t: compute(compiled, entrypoint, roles, tools, public_url, tenant=t)
                           for t in kept}, per_tenant, left_out)


def compute(compiled: CompiledPolicy, entrypoint: str, roles: Iterable[str],
            tools: Iterable[tuple[str, str]], public_url: str, *,
            tenant: str = PROBE_TENANT) -> Matrix:
    """Decide every (role, tool) for a caller of ``tenant`` with ``compiled`` (call from one
    thread at a time)."""
    role_list = list(roles)
    tool_list = sorted(set(tools))
    by_server: dict[str, list[str]] = {}
    for server, tool in tool_list:
        by_server.setdefault(server, []).append(tool)
    listing = LIST_ENTRYPOINT in compiled.entrypoints
    cells: dict[tuple[str, str, str], Cell] = {}
    for server, names in by_server.items():
        for role in role_list:
            claims = {"sub": PROBE_SUB, "roles": [role], "tenant": tenant,
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
    return Matrix(role_list, tool_list, cells, tenant)


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
