"""The shipped policy, evaluated as the gateway evaluates it: cases rego-cpp cannot run as Rego
unit tests (see policies/README.md), and the grants-only-open-the-door property."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.policy.decision import check_decision
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
