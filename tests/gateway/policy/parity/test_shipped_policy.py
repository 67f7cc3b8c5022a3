"""The shipped policy decides every sample request, well formed or not, the same on rego-cpp and
on OPA: same decision document, same list filtering, and no error on either."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.policy.errors import PolicyError
from gateway.policy.reference import ReferenceEngine
from gateway.policy.rego import CompiledPolicy, load_sources

POLICIES = Path(__file__).resolve().parents[4] / "policies"
DECISION = "mcp/authz/decision"
LISTS = ("mcp/authz/visible_tools", "mcp/authz/visible_prompts", "mcp/authz/visible_resources")

ROLES: list[Any] = [["viewer"], ["analyst"], ["admin"], ["engineer", "viewer"], ["intern"], [], "admin", None]
SERVERS: list[Any] = ["files", "database", "erp", "conformance", "payroll", 7, None]
ARGUMENTS: list[Any] = [{}, None, 7, {"path": "shared/a.txt"}, {"path": 5}, {"path": "tenants/globex/x"},
                        {"table": "orders"}, {"tenant": "globex"}, "absent"]
TOOLS: list[Any] = ["read_file", "write_file", "query", "describe_table", "listCustomers", 3]
METHODS: list[Any] = ["initialize", "tools/list", "notifications/initialized", "ping",
                      "resources/read", "prompts/get", "completion/complete",
                      "sampling/createMessage", None, 5]
URIS: list[Any] = ["file:///shared/a.txt", "file:///secret/a", "db://schema/orders",
                   "db://schema/employees", "db://other/orders", 9, None]


def _token(roles: Any, scope: Any = "tools:call:files/* tools:call:database/* tools:call:erp/*",
           tenant: Any = "acme") -> dict[str, Any]:
    return {"sub": "alice", "roles": roles, "scope": scope, "tenant": tenant}


def _requests() -> Iterator[dict[str, Any]]:
    for roles, server, tool, args in itertools.product(ROLES[:5], SERVERS, TOOLS, ARGUMENTS):
        mcp: dict[str, Any] = {"kind": "request", "method": "tools/call", "tool": tool}
        if args != "absent":
            mcp["arguments"] = args
        yield {"mcp": mcp, "token": _token(roles), "server": {"name": server}}
    for roles, server, method in itertools.product(ROLES, SERVERS, METHODS):
        yield {"mcp": {"kind": "request", "method": method}, "token": _token(roles),
               "server": {"name": server}}
    for roles, server, uri in itertools.product(ROLES[:5], SERVERS[:4], URIS):
        yield {"mcp": {"kind": "request", "method": "resources/read", "resource_uri": uri},
               "token": _token(roles), "server": {"name": server}}
    for roles, http_method in itertools.product(ROLES, ["GET", "DELETE", "PUT", None]):
        yield {"mcp": {"kind": None, "method": None}, "token": _token(roles),
               "server": {"name": "files"},
               "attributes": {"request": {"http": {"method": http_method}}}}
    odd_tokens = [_token(["admin"], scope=7), _token(["admin"], tenant=5), _token(["admin"], tenant=""),
                  {"roles": ["admin"]}, None, "token"]
    for token in odd_tokens:
        yield {"mcp": {"kind": "request", "method": "tools/call", "tool": "read_file",
                       "arguments": {"path": "shared/a"}}, "token": token, "server": {"name": "files"}}
    for facts in [7, {"arguments": 7}, {"arguments": [7]}, {"arguments": [{"well_formed": "yes"}]},
                  {"sql": {"understood": True, "tables": "orders", "functions": []}}]:
        yield {"mcp": {"kind": "request", "method": "tools/call", "tool": "read_file",
                       "arguments": {"path": "shared/a"}, "facts": facts},
               "token": _token(["admin"]), "server": {"name": "files"}}
    yield {"mcp": {"kind": "request", "method": "tools/call", "tool": "read_file"},
           "token": _token(["viewer"]), "server": {"name": "files"}, "session": {"tenant": "globex"}}


REQUESTS = list(_requests())


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[CompiledPolicy, ReferenceEngine]]:
    sources = load_sources(POLICIES, include_tests=False)
    with ReferenceEngine(sources) as reference:
        yield CompiledPolicy(sources, [DECISION, *LISTS]), reference


def test_every_sample_request_is_decided_alike(engines: tuple[CompiledPolicy, ReferenceEngine]) -> None:
    """Both engines give the same decision document for every sample request (no error on OPA)."""
    embedded, reference = engines
    differences = []
    for request in REQUESTS:
        mine = _outcome(embedded.evaluate, request)
        theirs = _outcome(lambda ep, value: reference.evaluate(ep, value)[:2], request)
        if mine != theirs:
            differences.append((request, mine, theirs))
    assert differences == [], f"{len(differences)} of {len(REQUESTS)} differ; first: {differences[0]}"
    allowed = sum(bool(embedded.evaluate(DECISION, r)[1]["allow"]) for r in REQUESTS)
    assert 0 < allowed < len(REQUESTS)  # the samples reach both answers


@pytest.mark.parametrize("entrypoint", LISTS)
def test_list_filtering_is_alike(engines: tuple[CompiledPolicy, ReferenceEngine], entrypoint: str) -> None:
    """visible_tools / prompts / resources agree for every role, server and kind of listing."""
    embedded, reference = engines
    items = ["read_file", "write_file", "query", "describe_table", "listCustomers", "test_simple_text",
             {"name": "search"}, {"uri": "file:///shared/a.txt"}, {"uri": "file:///secret/b"},
             "db://schema/orders", "db://schema/employees", {"uriTemplate": "file:///{path}"}, 5, None]
    for roles, server, kind in itertools.product(ROLES, SERVERS, [None, "resourceTemplates"]):
        request = {"token": _token(roles), "server": {"name": server}, "items": items, "kind": kind}
        mine = embedded.evaluate(entrypoint, request)
        theirs = reference.evaluate(entrypoint, request)[:2]
        assert _as_sets(mine) == _as_sets(theirs), request


def _outcome(evaluate: Callable[[str, Any], tuple[bool, Any]], request: Any) -> Any:
    try:
        return evaluate(DECISION, request)
    except PolicyError as exc:
        return f"error: {exc}"


def _as_sets(result: tuple[bool, Any]) -> tuple[bool, Any]:
    defined, value = result
    if isinstance(value, list):  # a set comes back as an array in each engine's own order
        return defined, sorted(value, key=repr)
    return defined, value
