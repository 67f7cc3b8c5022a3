"""gateway.policy.testing: the OPA test runner, its failure explanations and the decision hook."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.policy.rego import load_sources
from gateway.policy.testing import check_samples, rule_at, run_tests_opa

ROOT = Path(__file__).resolve().parents[3]


def _folder(tmp_path: Path, policy: str, tests: str) -> Path:
    (tmp_path / "authz.rego").write_text("package mcp.authz\nimport rego.v1\n" + policy)
    (tmp_path / "authz_test.rego").write_text("package mcp.authz_test\nimport rego.v1\n" + tests)
    return tmp_path


def test_shipped_suite_passes_on_opa_with_every_decision_in_the_contract() -> None:
    """Every shipped test passes on OPA and no decision a test computes breaks the contract."""
    results, notes = run_tests_opa(ROOT / "policies", entrypoint="mcp/authz/decision")
    assert results and all(r.passed for r in results), [r for r in results if not r.passed]
    assert notes == []


def test_failure_in_a_helper_shows_the_chain_and_values(tmp_path: Path) -> None:
    """A test failing inside a helper function shows the test's line, then the helper's failing
    expression with the values compared and its variables."""
    folder = _folder(tmp_path, "y := {\"a\": input.q}\n",
                     "helper(v) if {\n\tr := data.mcp.authz.y with input.q as v\n\tr.a == \"zz\"\n}\n"
                     "test_helper if {\n\thelper(\"b\")\n}\n")
    [result], _ = run_tests_opa(folder)
    assert result.status == "FAIL" and result.line == 7
    assert result.explanation[0] == "failed at authz_test.rego:8: helper(\"b\")"
    assert "  which failed at authz_test.rego:5: r.a == \"zz\"" in result.explanation
    assert '    compared: "b" = "zz"' in result.explanation
    assert '    r = {"a": "b"}' in result.explanation


def test_undefined_decision_inside_a_test_is_a_contract_failure(tmp_path: Path) -> None:
    """A test that passes because the decision is undefined (`not decision.allow`) fails:
    production answers an undefined decision with a 500."""
    folder = _folder(tmp_path, "decision := {\"allow\": true} if input.ok\n",
                     "test_denied if not data.mcp.authz.decision.allow with input.ok as false\n")
    [result], notes = run_tests_opa(folder, entrypoint="mcp/authz/decision")
    assert notes == []
    assert result.status == "FAIL" and result.detail == "a decision outside the contract"
    assert any("got undefined" in line and '"ok": false' in line for line in result.explanation)
    [plain], _ = run_tests_opa(folder)  # without an entrypoint, only the Rego assertion counts
    assert plain.passed


def test_batch_isolates_the_tests_that_error(tmp_path: Path) -> None:
    """A runtime error in one test leaves the others' outcomes intact and names rule and line."""
    folder = _folder(tmp_path, "n := to_number(input.s)\n",
                     "".join(f"test_ok{i} if true\n" for i in range(5))
                     + "test_bad if data.mcp.authz.n == 1 with input.s as \"x\"\n"
                     + "test_fail if false\n")
    results, _ = run_tests_opa(folder)
    status = {r.name: r.status for r in results}
    assert status == {**{f"test_ok{i}": "PASS" for i in range(5)}, "test_bad": "ERROR",
                      "test_fail": "FAIL"}
    bad = next(r for r in results if r.name == "test_bad")
    assert re.match(r"error at authz\.rego:3 \(rule n\): n := to_number\(input\.s\)", bad.explanation[0])


def test_rule_at_finds_the_enclosing_rule() -> None:
    """rule_at names the rule whose definition holds a line (else-chains included)."""
    sources = load_sources(ROOT / "policies", include_tests=False)
    text = (ROOT / "policies" / "authz.rego").read_text().splitlines()
    line = next(i for i, t in enumerate(text, 1) if t.startswith("granted :="))
    assert rule_at(sources, "authz.rego", line + 3) == "granted"


def test_samples_agree_on_the_shipped_policy() -> None:
    """rego-cpp and OPA decide every sample request of the shipped policy alike, in contract."""
    report = check_samples(ROOT / "policies", "mcp/authz/decision")
    assert report.samples > 100
    assert report.contract == [] and report.parity == []
