"""The decision contract checker."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.policy.decision import ContractViolation, check_decision


def test_boolean_true_allows() -> None:
    """A bare true is an allow with the default reason."""
    d = check_decision(True)
    assert d.allow and d.reason == "allowed" and d.http_status == 200


def test_boolean_false_denies_403() -> None:
    """A bare false is a 403 deny."""
    d = check_decision(False)
    assert not d.allow and d.http_status == 403 and d.reason == "denied"


def test_full_object_is_kept() -> None:
    """Every contract field is carried into the Decision; header names are lower-cased."""
    d = check_decision({"allow": False, "reason": "insufficient_scope", "http_status": 403,
                        "headers": {"X-Why": "scope"}, "obligations": {"mask_pii": ["email"]},
                        "missing_scope": "tools:call:files/read_file"})
    assert d.reason == "insufficient_scope"
    assert d.headers == {"x-why": "scope"}
    assert d.obligations == {"mask_pii": ["email"]}
    assert d.missing_scope == "tools:call:files/read_file"
    assert d.error_code is None


def test_allow_ignores_status() -> None:
    """http_status only means something for a denial."""
    assert check_decision({"allow": True, "http_status": 418}).http_status == 200


@pytest.mark.parametrize(("value", "expected"), [
    (None, "boolean or object"),
    (1, "boolean or object"),
    ("allow", "boolean or object"),
    ([True], "boolean or object"),
    ({}, "decision.allow"),
    ({"allow": "true"}, "decision.allow to be a boolean"),
    ({"allow": 1}, "decision.allow to be a boolean"),
    ({"allow": False, "reason": 5}, "decision.reason"),
    ({"allow": False, "reason": "Not Snake"}, "decision.reason"),
    ({"allow": False, "http_status": "403"}, "http_status to be an integer"),
    ({"allow": False, "http_status": True}, "http_status to be an integer"),
    ({"allow": False, "http_status": 200}, "400-599"),
    ({"allow": True, "headers": []}, "headers to be an object"),
    ({"allow": True, "headers": {"x": 1}}, "single-line string"),
    ({"allow": True, "headers": {"x": "a\r\nset-cookie: y"}}, "single-line string"),
    ({"allow": True, "headers": {"bad name": "v"}}, "HTTP tokens"),
    ({"allow": True, "headers": {"X-MCP-Tenant": "acme"}}, "the gateway owns it"),
    ({"allow": True, "headers": {"x-mcp-inspect": "1"}}, "the gateway owns it"),
    ({"allow": False, "headers": {"x-mcp-status": "200"}}, "the gateway owns it"),
    ({"allow": True, "headers": {"mcp-gateway-context": "{}"}}, "the gateway owns it"),
    ({"allow": True, "headers": {"x-envoy-auth-headers-to-remove": "x"}}, "the gateway owns it"),
    ({"allow": True, "headers": {"Content-Length": "0"}}, "the gateway owns it"),
    ({"allow": True, "headers": {"transfer-encoding": "chunked"}}, "the gateway owns it"),
    ({"allow": True, "headers": {"authorization": "Bearer x"}}, "the gateway owns it"),
    ({"allow": True, "obligations": []}, "obligations to be an object"),
    ({"allow": True, "obligations": {"mask_pii": ["email", "emial"]}},
     "obligations.mask_pii: unknown PII type 'emial'"),
    ({"allow": False, "missing_scope": 'a" b'}, "missing_scope"),
    ({"allow": False, "missing_scope": 3}, "missing_scope"),
])
def test_contract_violations_name_the_expected_type(value: Any, expected: str) -> None:
    """Anything outside the contract raises, and the message names what was expected."""
    with pytest.raises(ContractViolation, match=expected):
        check_decision(value)


def test_undefined_is_a_violation() -> None:
    """An undefined decision is outside the contract."""
    with pytest.raises(ContractViolation, match="undefined"):
        check_decision(None, defined=False)


def test_known_mask_kinds_and_aliases_pass() -> None:
    """Known kinds, their aliases and ``all`` are within the contract."""
    for kinds in (["email", "card"], ["credit_card"], ["all"], []):
        assert check_decision({"allow": True, "obligations": {"mask_pii": kinds}}).allow
