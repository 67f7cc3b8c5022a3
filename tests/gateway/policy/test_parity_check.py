"""`policy check` refuses, with file and line, what decides differently on rego-cpp and OPA."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.policy.parity_check import KIND, findings
from gateway.policy.rego import PolicyModule, PolicySources, load_sources

POLICIES = Path(__file__).resolve().parents[3] / "policies"


def _check(body: str, *, name: str = "p.rego") -> list[tuple[str, int]]:
    source = "package p\n\nimport rego.v1\n\n" + body
    found = findings(PolicySources("<t>", (PolicyModule(name, source),), ()))
    assert all(f.kind == KIND for f in found)
    return [(f.file, f.line) for f in found]


def test_shipped_policies_have_no_findings() -> None:
    """The policies the gateway ships decide the same on both engines, as far as the check sees."""
    assert findings(load_sources(POLICIES)) == []


@pytest.mark.parametrize("body", [
    'allow if input.limit > "100"',
    'allow if "2000" <= input.n',
    'allow if input.n >= "1e3"',
    'allow if 20 > "abc"',
    'allow if input.a < [1, 2]',
    'allow if input.flag > false',
    'allow if input.x < null',
    'allow if input.o < {"a": 1}',
    'allow if f(input.x)[0] < "10"',
])
def test_ordering_across_types_is_refused(body: str) -> None:
    """A comparison with a numeric string, a number against a string, or a non-scalar literal."""
    assert _check(body) == [("p.rego", 5)]


@pytest.mark.parametrize("body", [
    "allow if input.limit > 100",
    'allow if input.name < "m"',
    'allow if count(input.items) <= 10',
    'allow if input.a[0] >= input.b',
    "allow if {\n\tx := input.a\n\tx := 1\n}",
    "# a comment: input.limit > \"100\"\nallow if input.x == \"<= 5\"",
    'x := {"a": 1, "b": 2}\n\nallow if x["a"] < 5',
    'allow if time.clock([time.now_ns(), "UTC"])[0] >= 19',
    'allow if input.list[0] < 10',
])
def test_ordinary_comparisons_pass(body: str) -> None:
    """Numbers against numbers and text against text, and text inside strings or comments."""
    assert _check(body) == []


@pytest.mark.parametrize("body", [
    "allow if not startswith(input.path, \"/\")",
    "t := input.tenant\n\nf(x) if x == 1\n\nallow if not f(t)",
    "s := input.server\n\nallow if not s in {\"files\"}",
    "allow if not count(input.items) > 0",
    "allow if not data.x.enabled in {true}",
])
def test_negated_call_on_a_possibly_undefined_value_is_refused(body: str) -> None:
    """`not f(x)` / `not x in s` where x is input, data or a rule: OPA leaves it undefined."""
    found = _check(body)
    assert len(found) == 1
    assert found[0][1] == 5 + body.count("\n")


@pytest.mark.parametrize("body", [
    "ok if input.x\n\nallow if not ok",
    "allow if {\n\tsome p in input.paths\n\tnot startswith(p, \"/\")\n}",
    "allow if not input.kind == \"x\"",
    "f(x) if x\n\nallow if not f(1)",
    "allow if {\n\tsegments := split(input.p, \"/\")\n\tnot \"..\" in segments\n}",
])
def test_negation_of_rules_and_local_values_passes(body: str) -> None:
    """A negated rule, a negated call on a local variable, a negated comparison of refs."""
    assert _check(body) == []


def test_concat_over_a_set_and_regex_backreferences_are_refused() -> None:
    """Two built-ins whose answers differ: concat() over a set and RE2 without backreferences."""
    body = ('a := concat(",", {x | some x in input.xs})\n\n'
            'b if regex.match(`(a)\\1`, input.s)\n\n'
            'c if regex.match("(a)\\\\1", input.s)\n\n'
            'd if regex.match(`^[a-z]+$`, input.s)\n\n'
            'e := concat(",", sort(input.xs))\n')
    assert _check(body) == [("p.rego", 5), ("p.rego", 7), ("p.rego", 9)]


def test_test_modules_are_not_checked() -> None:
    """Rego tests run on both engines already: only the modules that decide are checked."""
    assert _check('x if 1 < "2"', name="p_test.rego") == []


def test_finding_names_file_and_line_in_a_policy_folder(tmp_path: Path) -> None:
    """A finding in a folder names the module's relative path and the line of the comparison."""
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "limits.rego").write_text(
        'package org\n\nimport rego.v1\n\n# a "comment" > 1\n\nok if input.n <= "10"\n')
    found = findings(load_sources(tmp_path))
    assert [(f.file, f.line) for f in found] == [("org/limits.rego", 7)]
    assert "looks like a number" in found[0].message


@pytest.mark.parametrize(("body", "line"), [
    # a rule constant holding a numeric-looking string, then compared
    ('sql_limit := "2000"\n\ndeny if count(input.sql) > sql_limit', 7),
    ('default sql_limit := "2000"\n\ndeny if sql_limit < count(input.sql)', 7),
    # a local variable
    ('deny if {\n\tlimit := "2000"\n\tcount(input.sql) > limit\n}', 7),
])
def test_a_numeric_string_in_a_name_is_refused(body: str, line: int) -> None:
    """Moving the string limit into a constant or a variable does not hide it: rego-cpp compares
    it as a number and OPA as a string, so one denies what the other allows."""
    assert _check(body) == [("p.rego", line)]


def test_a_numeric_string_constant_of_another_module_is_refused() -> None:
    org = "package org\n\nimport rego.v1\n\nsql_limit := \"2000\"\n"
    core = ("package core\n\nimport rego.v1\n\nimport data.org\n\n"
            "deny if count(input.sql) > org.sql_limit\n")
    found = findings(PolicySources("<t>", (PolicyModule("org.rego", org),
                                           PolicyModule("core.rego", core)), ()))
    assert [(f.file, f.line) for f in found] == [("core.rego", 7)]


def test_a_number_name_and_a_plain_string_name_are_fine() -> None:
    assert _check('limit := 2000\n\nlabel := "two"\n\ndeny if count(input.sql) > limit') == []


def test_not_over_a_call_on_an_imported_rule_is_refused() -> None:
    """`not f(alias.rule)`: when the imported rule is undefined OPA leaves it undefined and
    rego-cpp makes it true."""
    assert _check('import data.mcp.authz\n\ndeny if not startswith(authz.tool, "get_")') == \
        [("p.rego", 7)]


def test_the_finding_shows_the_literal_as_written() -> None:
    source = 'package p\n\nimport rego.v1\n\nallow if input.limit > "100"\n'
    found = findings(PolicySources("<t>", (PolicyModule("p.rego", source),), ()))
    assert '`input.limit > "100"`' in found[0].message
