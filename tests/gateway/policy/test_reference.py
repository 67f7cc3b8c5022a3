"""The reference engine (OPA in-process) compiles what OPA compiles and refuses what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.policy.errors import PolicyEvalError
from gateway.policy.reference import ReferenceEngine, available, parse_findings
from gateway.policy.rego import load_sources

POLICIES = Path(__file__).resolve().parents[3] / "policies"


def _folder(tmp_path: Path, source: str) -> ReferenceEngine:
    (tmp_path / "p.rego").write_text(source)
    return ReferenceEngine(load_sources(tmp_path))


def test_installed_by_the_project() -> None:
    assert available()


def test_shipped_policy_and_tests_compile_strictly() -> None:
    engine = ReferenceEngine(load_sources(POLICIES), include_tests=True)
    assert engine.findings == ()


@pytest.mark.parametrize(("source", "kind", "needle"), [
    ("package p\ndeny[msg] { msg := 1 }\n", "rego_parse_error", "`if` keyword is required"),
    ("package p\n\nallow if { not sql_to_long }\n", "rego_unsafe_var_error", "sql_to_long"),
    ("package p\n\nallow if { y > 1 }\n", "rego_unsafe_var_error", "var y is unsafe"),
    ("package p\n\na := count(5)\n", "rego_type_error", "count"),
])
def test_mistakes_rego_cpp_accepts_are_named_with_file_and_line(
        tmp_path: Path, source: str, kind: str, needle: str) -> None:
    engine = _folder(tmp_path, source)
    assert engine.findings, "OPA must refuse this policy"
    first = engine.findings[0]
    assert (first.file, first.kind) == ("p.rego", kind)
    assert first.line in (2, 3)
    assert needle in first.message


def test_runtime_error_names_file_and_line(tmp_path: Path) -> None:
    engine = _folder(tmp_path, 'package p\n\na if startswith(input.q, "x")\n')
    with pytest.raises(PolicyEvalError, match=r"p\.rego:3: .*startswith"):
        engine.evaluate("p/a", {"q": 1})
    assert engine.evaluate("p/a", {"q": "xy"})[:2] == (True, True)
    assert engine.evaluate("p/a", {"q": "yy"})[:2] == (False, None)


def test_parse_findings_keeps_continuation_lines() -> None:
    text = ("prepare_error: bundle activation failed: 2 errors occurred:\n"
            "a.rego:2: rego_type_error: plus: invalid argument(s)\n\thave: (any, string)\n"
            "\twant: (number, number)\nb.rego:7: rego_compile_error: declared var s unused")
    found = parse_findings(text)
    assert [(f.file, f.line, f.kind) for f in found] == [
        ("a.rego", 2, "rego_type_error"), ("b.rego", 7, "rego_compile_error")]
    assert "have: (any, string)" in found[0].message
