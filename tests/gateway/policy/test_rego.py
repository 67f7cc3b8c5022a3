"""Input pruning: the engine passes rego-cpp only the input paths the policy references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.policy.rego import (
    ALL,
    CompiledPolicy,
    PolicyModule,
    input_projection,
    load_sources,
    project_input,
)

POLICIES = Path(__file__).resolve().parents[3] / "policies"


def proj(source: str) -> Any:
    return input_projection([PolicyModule("a.rego", "package a\nimport rego.v1\n" + source)])


def test_static_references_form_a_trie() -> None:
    """input.a.b and input.a.c keep only a.b and a.c; an index ends the static path."""
    p = proj("x := input.a.b\ny := input.a.c[0]\n")
    assert set(p) == {"a"} and p["a"]["b"] is ALL and p["a"]["c"] is ALL


def test_dynamic_or_bare_reference_keeps_everything() -> None:
    """input[k], input["k"] and a bare input keep the whole input."""
    assert proj('x := input["a"]') is ALL
    assert proj("x := object.get(input, \"a\", 1)") is ALL
    assert proj("x := input[k] if some k in {\"a\"}") is ALL


def test_comments_and_strings_are_not_references() -> None:
    """'input' inside a comment or string neither widens nor narrows the projection."""
    p = proj('# the whole input\nx := "input" \ny := `input`\nz := input.a\n')
    assert set(p) == {"a"}


def test_projection_keeps_non_objects_as_they_are() -> None:
    """A value that is not an object where the trie expects one passes unchanged."""
    p = proj("x := input.mcp.method\ny := input.token.roles\n")
    value = {"mcp": None, "token": {"roles": ["a"], "iss": "x"}, "attributes": {"h": 1}}
    assert project_input(value, p) == {"mcp": None, "token": {"roles": ["a"]}}


def test_pruned_and_full_input_decide_alike() -> None:
    """The shipped policy decides the same with the pruned and the full gateway input."""
    policy = CompiledPolicy(load_sources(POLICIES, include_tests=False), ["mcp/authz/decision"])
    base = {"attributes": {"request": {"http": {"method": "POST", "headers": {"a": "b"}}}},
            "parsed_body": {"jsonrpc": "2.0"}, "now": 1,
            "token": {"sub": "a", "roles": ["viewer"], "tenant": "acme", "iss": "i",
                      "scope": "tools:call:files/*"},
            "server": {"name": "files", "resource": "r"}}
    for path in ("shared/a.txt", "secret/a", "tenants/globex/a", "../x"):
        inp = {**base, "mcp": {"kind": "request", "method": "tools/call", "tool": "read_file",
                               "arguments": {"path": path}, "id": 1}}
        pruned = policy.evaluate("mcp/authz/decision", inp)
        saved, policy.input_projection = policy.input_projection, ALL
        full = policy.evaluate("mcp/authz/decision", inp)
        policy.input_projection = saved
        assert pruned == full


def test_type_tests_keep_only_the_type() -> None:
    """is_object(input.a.b) (and the other type tests) keep a.b's type, not its contents."""
    p = proj("x if is_object(input.a.b)\ny if not type_name( input.a.c )\nz := input.a.b.k\n")
    assert p["a"]["b"] == {"k": ALL} and p["a"]["c"] == {}
    value = {"a": {"b": {"k": 1, "big": "x" * 100}, "c": {"d": 1}}}
    assert project_input(value, p) == {"a": {"b": {"k": 1}, "c": {}}}
    # A value that is not an object keeps its type because it is kept as it is.
    assert project_input({"a": {"b": "text", "c": [1]}}, p) == {"a": {"b": "text", "c": [1]}}


def test_type_test_lookalikes_keep_everything() -> None:
    """Another function's call, an extra argument or a shadowing definition is not a type test."""
    assert proj("x if data.lib.is_object(input.a)\n")["a"] is ALL
    assert proj("x if is_object(input.a[0])\n")["a"] is ALL
    assert proj("x if count(input.a) > 0\n")["a"] is ALL
    assert proj("is_object(v) := true\nx if is_object(input.a)\n")["a"] is ALL
    assert proj("import data.lib.f as is_null\nx if is_null(input.a)\n")["a"] is ALL
    # `with` can replace the built-in by a function that reads deeper than the type.
    assert proj("f(x) := x.owner\no := is_object(input.a)\n"
                "y if { v := o with is_object as f; v == \"m\" }\n")["a"] is ALL


def test_a_type_test_replaced_with_with_decides_on_the_whole_value(tmp_path: Path) -> None:
    """A policy that mocks is_object with a reader of input.a.owner sees owner, pruned or not."""
    (tmp_path / "p.rego").write_text(
        "package t\nimport rego.v1\nowner_is(x) := x.owner\no := is_object(input.a)\n"
        "blocked if { x := o with is_object as owner_is; x == \"mallory\" }\n"
        "default allow := false\nallow if not blocked\n")
    policy = CompiledPolicy(load_sources(tmp_path, include_tests=False), ["t/allow"], cache_size=10)
    assert policy.evaluate("t/allow", {"a": {"owner": "alice"}}) == (True, True)
    assert policy.evaluate("t/allow", {"a": {"owner": "mallory"}}) == (True, False)


def test_shipped_policy_reads_arguments_by_name() -> None:
    """mcp.arguments is not kept whole: an argument the policy never reads is dropped."""
    policy = CompiledPolicy(load_sources(POLICIES, include_tests=False), ["mcp/authz/decision"])
    arguments = policy.input_projection["mcp"]["arguments"]
    assert arguments is not ALL
    # (Not sql: the policy reads the gateway's parse of it, input.mcp.facts.sql, never the text.)
    assert set(arguments) == {"path", "root", "directory", "source", "destination", "target",
                              "tenant", "tenant_id", "table"}
    pruned = project_input({"mcp": {"arguments": {"path": "a", "text": "x" * 1024}}},
                           policy.input_projection)
    assert pruned == {"mcp": {"arguments": {"path": "a"}}}


def test_path_argument_names_match_the_facts() -> None:
    """The policy's path argument names, the arguments it reads and facts.py's list agree."""
    from gateway.policy.facts import PATH_ARGUMENT_NAMES
    from gateway.policy.rego import query_interpreter, run_query

    sources = load_sources(POLICIES, include_tests=False)
    _, names = run_query(query_interpreter(sources, include_tests=False),
                         "data.mcp.authz.path_argument_names")
    assert sorted(names) == sorted(PATH_ARGUMENT_NAMES)
    source = "".join(m.source for m in sources.modules)
    for name in PATH_ARGUMENT_NAMES:
        assert f"file_paths contains p if p := input.mcp.arguments.{name}\n" in source


def test_the_bundle_digest_is_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decision records the bundle's revision: reading it must not hash the bundle again
    (that was ~10 % of ext_authz's event loop), and it still tells two bundles apart."""
    import hashlib

    from gateway.policy import rego
    sources = rego.PolicySources("r", (rego.PolicyModule("a.rego", "package a\n"),), (("data.json", b"{}"),))
    other = rego.PolicySources("r", (rego.PolicyModule("a.rego", "package b\n"),), (("data.json", b"{}"),))
    calls: list[int] = []
    sha256 = hashlib.sha256

    def counting(*args: Any) -> Any:
        calls.append(1)
        return sha256(*args)
    monkeypatch.setattr(hashlib, "sha256", counting)
    assert [sources.digest for _ in range(3)] == [sources.digest] * 3
    assert calls == [] and sources.digest != other.digest
