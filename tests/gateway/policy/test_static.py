"""Static checks of a policy folder: each mistake named with its file and line."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from ext_proc.settings import DEFAULT_LIST_ENTRYPOINTS
from gateway.policy import static
from gateway.policy.reference import Finding
from gateway.policy.static import errors, is_warning, run_check

POLICIES = Path(__file__).resolve().parents[3] / "policies"
ENTRYPOINT = "mcp/authz/decision"


def copy_with(tmp_path: Path, name: str, edit: Callable[[str], str]) -> Path:
    """A copy of the shipped policies/ with one file edited."""
    folder = tmp_path / "policies"
    shutil.copytree(POLICIES, folder)
    path = folder / name
    before = path.read_text(encoding="utf-8")
    after = edit(before)
    assert after != before, "the edit did not apply"
    path.write_text(after, encoding="utf-8")
    return folder


def line_of(folder: Path, name: str, text: str) -> int:
    lines = (folder / name).read_text(encoding="utf-8").splitlines()
    return next(n for n, line in enumerate(lines, 1) if text in line)


def of_kind(findings: list[Finding], kind: str) -> list[Finding]:
    return [f for f in findings if f.kind == kind]


def test_shipped_policies_have_no_errors() -> None:
    """The shipped folder passes: no error-level finding (warnings do not fail the check)."""
    findings = run_check(POLICIES, ENTRYPOINT)
    assert errors(findings) == []
    assert all(is_warning(f) for f in findings)


def test_misspelt_rule_reference_is_an_unsafe_var(tmp_path: Path) -> None:
    """`not sql_to_long` (a rule that does not exist) is refused with file and line, and the
    rule it was meant to name is reported unused."""
    folder = copy_with(tmp_path, "authz.rego", lambda s: s.replace(
        "sql_tables_ok if {\n\tsql_understood\n",
        "sql_too_long if count(input.mcp.facts.sql.tables) > 20\n\n"
        "sql_tables_ok if {\n\tsql_understood\n\tnot sql_to_long\n"))
    findings = run_check(folder, ENTRYPOINT)
    line = line_of(folder, "authz.rego", "not sql_to_long")
    assert Finding("authz.rego", line, "rego_unsafe_var_error", "var sql_to_long is unsafe") in findings
    unused = of_kind(findings, static.UNUSED_RULE)
    assert [(f.file, f.line) for f in unused if "sql_too_long" in f.message] == [
        ("authz.rego", line_of(folder, "authz.rego", "sql_too_long if"))]


def test_unbound_variable(tmp_path: Path) -> None:
    """A variable nothing binds is an error on its line."""
    folder = copy_with(tmp_path, "authz.rego", lambda s: s.replace(
        "is_tool_call if method == \"tools/call\"",
        "is_tool_call if {\n\tmethod == \"tools/call\"\n\tlimit > 1\n}"))
    findings = errors(run_check(folder, ENTRYPOINT))
    assert [(f.file, f.line, f.kind) for f in findings] == [
        ("authz.rego", line_of(folder, "authz.rego", "limit > 1"), "rego_unsafe_var_error")]
    assert "var limit is unsafe" in findings[0].message


def test_rego_v0_rule_is_refused(tmp_path: Path) -> None:
    """A Rego v0 rule (`deny[msg] { ... }`) is a parse error on its line."""
    folder = copy_with(tmp_path, "authz.rego", lambda s: s + '\ndeny[msg] {\n\tmsg := "no"\n}\n')
    findings = errors(run_check(folder, ENTRYPOINT))
    line = line_of(folder, "authz.rego", "deny[msg] {")
    assert findings and all((f.file, f.line, f.kind) == ("authz.rego", line, "rego_parse_error")
                            for f in findings)
    assert any("`if` keyword is required" in f.message for f in findings)


def test_misspelt_data_key_names_the_nearest_key(tmp_path: Path) -> None:
    """data.gateway.open_metods (a key neither data.json nor its schema has) is an error on its
    line, with the key that exists as a hint."""
    folder = copy_with(tmp_path, "authz.rego", lambda s: s.replace(
        "method in data.gateway.open_methods", "method in data.gateway.open_metods"))
    findings = errors(run_check(folder, ENTRYPOINT))
    assert [(f.file, f.line, f.kind) for f in findings] == [
        ("authz.rego", line_of(folder, "authz.rego", "open_metods"), static.UNDEFINED_DATA_REF)]
    assert "data.gateway.open_metods" in findings[0].message
    assert "did you mean data.gateway.open_methods?" in findings[0].message


def test_misspelt_data_key_behind_a_variable_key(tmp_path: Path) -> None:
    """data.gateway.roles[r].filez: the key after a role name is checked against the role's schema."""
    folder = copy_with(tmp_path, "authz.rego", lambda s: s.replace(
        "some pfx in data.gateway.roles[r].files[path_access]\n\tnot contains",
        "some pfx in data.gateway.roles[r].filez[path_access]\n\tnot contains"))
    findings = errors(run_check(folder, ENTRYPOINT))
    assert [(f.file, f.line, f.kind) for f in findings] == [
        ("authz.rego", line_of(folder, "authz.rego", ".filez["), static.UNDEFINED_DATA_REF)]
    assert "did you mean data.gateway.roles[_].files?" in findings[0].message


def test_optional_schema_key_is_defined(tmp_path: Path) -> None:
    """A key the schema declares is fine even when data.json leaves it out (mask_pii_combine)."""
    (tmp_path / "data.json").write_text('{"gateway": {"roles": {"a": {}}, "servers": {}, '
                                        '"pii_kinds": ["email"], "open_methods": []}}')
    shutil.copy(POLICIES / "data.schema.json", tmp_path / "data.schema.json")
    (tmp_path / "p.rego").write_text(
        "package mcp.authz\nimport rego.v1\n"
        'decision := data.gateway.mask_pii_combine == "most_trusted"\n'
        "more := data.gateway.roles.a.tools\n")
    findings = run_check(tmp_path, ENTRYPOINT)
    assert errors(findings) == []
    assert [f.line for f in of_kind(findings, static.UNUSED_RULE)] == [4]


def test_data_key_of_an_array_is_a_type_error(tmp_path: Path) -> None:
    """A key looked up in a data.json array is always undefined: an error naming the path."""
    folder = copy_with(tmp_path, "authz.rego", lambda s: s.replace(
        "method in data.gateway.open_methods", "method in data.gateway.open_methods.all"))
    findings = errors(run_check(folder, ENTRYPOINT))
    assert [(f.file, f.line, f.kind) for f in findings] == [
        ("authz.rego", line_of(folder, "authz.rego", "open_methods.all"), static.DATA_TYPE_ERROR)]
    assert "data.gateway.open_methods is an array" in findings[0].message


def test_misspelt_rule_of_another_package_in_a_test(tmp_path: Path) -> None:
    """`authz.decison` through an import alias, in a test module, is an error on each line."""
    folder = copy_with(tmp_path, "authz_test.rego", lambda s: s.replace(
        "authz.decision with", "authz.decison with"))
    findings = errors(run_check(folder, ENTRYPOINT))
    assert findings and {(f.file, f.kind) for f in findings} == {
        ("authz_test.rego", static.UNDEFINED_DATA_REF)}
    assert line_of(folder, "authz_test.rego", "authz.decison with") in {f.line for f in findings}
    assert "did you mean data.mcp.authz.decision?" in findings[0].message


def test_type_mismatch(tmp_path: Path) -> None:
    """A built-in called with an argument of the wrong type is an error on its line."""
    folder = copy_with(tmp_path, "authz.rego", lambda s: s.replace(
        'is_tool_call if method == "tools/call"', 'is_tool_call if startswith(1, "tools/")'))
    findings = errors(run_check(folder, ENTRYPOINT))
    assert [(f.file, f.line, f.kind) for f in findings] == [
        ("authz.rego", line_of(folder, "authz.rego", "startswith(1,"), "rego_type_error")]


def test_unused_rule_is_a_warning(tmp_path: Path) -> None:
    """A rule nothing refers to is a warning on its line; entrypoints and list filters are used."""
    folder = copy_with(tmp_path, "authz.rego", lambda s: s + "\nforgotten if input.x == 1\n")
    findings = run_check(folder, ENTRYPOINT)
    assert errors(findings) == []
    unused = {f.message.split()[1]: f for f in of_kind(findings, static.UNUSED_RULE)}
    assert unused["forgotten"].line == line_of(folder, "authz.rego", "forgotten if")
    assert is_warning(unused["forgotten"])
    assert not {"decision", "visible_tools", "visible_prompts", "visible_resources"} & set(unused)


def test_list_entrypoints_follow_ext_proc() -> None:
    """The list filters counted as used are the ones ext_proc queries."""
    assert set(DEFAULT_LIST_ENTRYPOINTS.values()) <= set(static.LIST_ENTRYPOINTS)


def test_undefined_entrypoint_is_reported(tmp_path: Path) -> None:
    """An entrypoint no module defines is named with the nearest rule (a warning: a folder of
    library packages has none)."""
    (tmp_path / "p.rego").write_text("package mcp.authz\nimport rego.v1\ndecisions := true\n")
    findings = of_kind(run_check(tmp_path, ENTRYPOINT), static.UNDEFINED_ENTRYPOINT)
    assert len(findings) == 1 and findings[0].file == "p.rego"
    assert "did you mean data.mcp.authz.decisions?" in findings[0].message


def test_data_schema_errors_are_findings_and_rego_is_still_checked(tmp_path: Path) -> None:
    """A data.json that breaks its schema is reported with the JSON pointer, next to the Rego's
    own errors."""
    folder = copy_with(tmp_path, "data.json", lambda s: s.replace('"open_methods"', '"open_metods"'))
    (folder / "authz.rego").write_text((folder / "authz.rego").read_text() + "\nbad if x\n")
    findings = errors(run_check(folder, ENTRYPOINT))
    schema = of_kind(findings, static.DATA_SCHEMA_ERROR)
    assert schema and all(f.file == "data.json" and f.line == 0 for f in schema)
    assert any(f.message.startswith("/gateway: ") and "open_metods" in f.message for f in schema)
    assert of_kind(findings, "rego_unsafe_var_error")


def test_with_whole_input_is_refused_before_rego_cpp_sees_it(tmp_path: Path) -> None:
    """`with input as ...` (which aborts rego-cpp) is an error with file and line, and the
    process running the check lives on."""
    (tmp_path / "p.rego").write_text("package mcp.authz\nimport rego.v1\nx := {\"a\": 1}\n"
                                     "decision if {\n\ty := input.a with input as x\n\ty == 1\n}\n")
    findings = errors(run_check(tmp_path, ENTRYPOINT))
    assert [(f.file, f.line, f.kind) for f in findings] == [
        ("p.rego", 5, static.SERVING_COMPILE_ERROR)]


def test_missing_reference_engine_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without OPA the check cannot pass: that is an error finding, not a silent pass."""
    monkeypatch.setattr("gateway.policy.reference._opa", None)
    findings = errors(run_check(POLICIES, ENTRYPOINT))
    assert [f.kind for f in findings] == [static.REFERENCE_UNAVAILABLE]


def test_describe_without_a_line() -> None:
    """A finding with no line prints as `file: message (kind)`."""
    assert static.describe(Finding("data.json", 0, "k", "/a: bad")) == "data.json: /a: bad (k)"
    assert static.describe(Finding("a.rego", 3, "k", "bad")) == "a.rego:3: bad (k)"


def test_without_a_schema_an_unknown_data_key_is_a_warning(tmp_path: Path) -> None:
    """With no data.schema.json nothing says whether a key is optional (the shipped policy reads
    data.gateway.mask_pii_combine only when present): an unknown key is a warning naming the
    line, so a folder that worked before still loads; with the schema it is an error."""
    folder = copy_with(tmp_path, "authz.rego", lambda s: s.replace(
        "method in data.gateway.open_methods", "method in data.gateway.open_metods"))
    (folder / "data.schema.json").unlink()
    findings = run_check(folder, ENTRYPOINT)
    assert errors(findings) == []
    unknown = of_kind(findings, static.UNSCHEMATIZED_DATA_REF)
    lines = {f.line for f in unknown}
    assert line_of(folder, "authz.rego", "open_metods") in lines
    assert line_of(folder, "authz.rego", 'data.gateway.mask_pii_combine == "most_trusted"') in lines
    assert all(static.is_warning(f) and "add a schema" in f.message for f in unknown)
