"""The shipped policy, evaluated as the gateway evaluates it: cases rego-cpp cannot run as Rego
unit tests (see policies/README.md), and the grants-only-open-the-door property."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.policy.decision import check_decision
from gateway.policy.facts import with_facts
from gateway.policy.rego import CompiledPolicy, load_sources

POLICIES = Path(__file__).resolve().parents[2] / "policies"


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return CompiledPolicy(load_sources(POLICIES, include_tests=False),
                          ["mcp/authz/decision", "mcp/authz/denials"])


def call(args: dict[str, Any], roles: list[str], server: str = "files",
         tool: str = "read_file") -> dict[str, Any]:
    return {"mcp": {"kind": "request", "method": "tools/call", "tool": tool, "arguments": args},
            "token": {"sub": "a", "roles": roles, "scope": f"tools:call:{server}/*", "tenant": "acme"},
            "server": {"name": server}}


@pytest.mark.parametrize("path", ["shared\\..\\x", "shared\\a", 42, None, ["shared"],
                                  "shared/a/../../b", "/shared"])
def test_malformed_paths_denied_even_for_admin(policy: CompiledPolicy, path: Any) -> None:
    """Backslashes, NUL, '..' and non-string paths are refused whatever the role."""
    defined, value = policy.evaluate("mcp/authz/decision", call({"path": path}, ["admin"]))
    d = check_decision(value, defined=defined)
    assert not d.allow and d.reason == "path_invalid"


@pytest.mark.parametrize("inp", [
    {},
    {"mcp": None, "token": None, "server": None},
    {"mcp": {"method": "tools/call", "tool": 5}, "token": {"roles": "admin"}, "server": {"name": "files"}},
    {"mcp": {"method": ["tools/call"]}, "token": {"roles": ["admin"], "tenant": "acme"},
     "server": {"name": "files"}},
    {"mcp": {"method": "tools/call", "tool": "read_file", "arguments": "x"},
     "token": {"roles": ["admin"], "tenant": "acme", "scope": "tools:call:files/*"},
     "server": {"name": "files"}},
])
def test_odd_inputs_deny_within_contract(policy: CompiledPolicy, inp: dict[str, Any]) -> None:
    """Unexpected input shapes still produce a contract-conforming deny."""
    defined, value = policy.evaluate("mcp/authz/decision", inp)
    assert not check_decision(value, defined=defined).allow


def test_every_denial_is_also_refused(policy: CompiledPolicy) -> None:
    """Where a denial fires, the decision denies (grants alone open the door)."""
    cases = [call({"path": "secret"}, ["viewer"]),
             call({"sql": "select * from x"}, ["analyst"], "database", "query"),
             call({"tenant": "other"}, ["analyst"], "database", "list_tables")]
    for inp in cases:
        _, denials = policy.evaluate("mcp/authz/denials", inp)
        _, value = policy.evaluate("mcp/authz/decision", inp)
        assert denials and value["allow"] is False


def test_nul_in_input_is_refused(policy: CompiledPolicy) -> None:
    """A NUL would truncate the string the policy sees: the engine refuses the input instead."""
    from gateway.policy.errors import PolicyInputError

    with pytest.raises(PolicyInputError):
        policy.evaluate("mcp/authz/decision", call({"path": "shared/\x00/../../etc"}, ["viewer"]))


PATHS = ["shared/a.txt", "./shared//reports/q3.txt", "shared", "", ".", "shared-secrets/a", "projects/x.py",
         "reports/q3", "secret", "tenants", "tenants/acme", "tenants/acme/reports/a.csv",
         "tenants/acme/scratch/x", "tenants/globex/reports/a", "tenants/{tenant}/reports",
         "shared/../secret", "/etc/passwd", "..", "shared/..hidden", "a/.../b", 7, None, ["shared"]]
ROLE_SETS = [["viewer"], ["analyst"], ["engineer"], ["admin"], ["viewer", "engineer"], ["intern"], []]


def _with_facts(inp: dict[str, Any]) -> dict[str, Any]:
    return {**inp, "mcp": with_facts(dict(inp["mcp"]))}


def _decide(policy: CompiledPolicy, inp: dict[str, Any]) -> Any:
    return policy.evaluate("mcp/authz/decision", inp)


def _file_call_cases() -> list[dict[str, Any]]:
    cases = []
    for tool in ("read_file", "write_file", "list_directory", "move"):
        for roles in ROLE_SETS:
            for tenant in ("acme", None):
                for args in [{"path": p} for p in PATHS] + [
                        {}, {"path": "shared/a", "root": "secret"},
                        {"source": "projects/a", "destination": "shared/b"},
                        {"path": "tenants/acme/reports/x", "target": "shared/y"}]:
                    inp = call(args, roles, tool=tool)
                    if tenant is None:
                        del inp["token"]["tenant"]
                    cases.append(inp)
    return cases


def test_gateway_facts_give_the_same_file_decisions(policy: CompiledPolicy) -> None:
    """For every tool call in the corpus, the decision with the gateway's path facts equals the
    decision the policy reaches computing them itself."""
    cases = _file_call_cases()
    assert len(cases) > 1000
    allowed = 0
    for inp in cases:
        plain = _decide(policy, inp)
        assert _decide(policy, _with_facts(inp)) == plain, inp
        allowed += plain[1]["allow"]
    assert allowed > 100  # the corpus exercises grants, not only denials


@pytest.mark.parametrize("uri", ["file:///shared/a.txt", "file:///secret/a", "file:///tenants/acme/reports/x",
                                 "file:///tenants/globex/x", "file:///shared/../x", "ftp:/bad", "file://",
                                 "FILE:///shared/a", None, 5])
@pytest.mark.parametrize("roles", [["viewer"], ["analyst"], ["admin"]])
def test_gateway_facts_give_the_same_resource_decisions(policy: CompiledPolicy, uri: Any,
                                                        roles: list[str]) -> None:
    """resources/read decides the same with the gateway's facts of its URI as without."""
    inp = {"mcp": {"kind": "request", "method": "resources/read", "resource_uri": uri, "arguments": {}},
           "token": {"sub": "a", "roles": roles, "scope": "", "tenant": "acme"}, "server": {"name": "files"}}
    assert _decide(policy, _with_facts(inp)) == _decide(policy, inp)


@pytest.mark.parametrize("uri", ["file:///shared\\bin", "file:///shared/x\\b", "file:///shared\\..\\..\\etc"])
def test_backslash_uri_denied_as_invalid_with_facts(policy: CompiledPolicy, uri: str) -> None:
    """With the gateway's facts a backslash in a resource URI is path_invalid, for admins too
    (rego-cpp 1.5.2 reads backslashes in strings derived from input as escapes: README.md)."""
    inp = {"mcp": {"kind": "request", "method": "resources/read", "resource_uri": uri, "arguments": {}},
           "token": {"sub": "a", "roles": ["admin"], "scope": "", "tenant": "acme"},
           "server": {"name": "files"}}
    defined, value = _decide(policy, _with_facts(inp))
    d = check_decision(value, defined=defined)
    assert not d.allow and d.reason == "path_invalid"


def test_facts_do_not_widen_a_role(policy: CompiledPolicy) -> None:
    """Facts only answer "which prefixes": a role's prefixes still decide (viewer, projects/)."""
    inp = _with_facts(call({"path": "projects/x.py"}, ["viewer"]))
    defined, value = _decide(policy, inp)
    d = check_decision(value, defined=defined)
    assert not d.allow and d.reason == "path_not_allowed"
