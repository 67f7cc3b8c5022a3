"""Every case of cases.yaml gives OPA's documented value on OPA, and rego-cpp either agrees or
still differs exactly as the case records (so an upgrade that fixes a difference is noticed)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.policy import parity_check
from gateway.policy.errors import PolicyCompileError, PolicyError
from gateway.policy.reference import ReferenceEngine
from gateway.policy.rego import CompiledPolicy, PolicyModule, PolicySources

HERE = Path(__file__).resolve().parent
README = HERE.parents[3] / "policies" / "README.md"
HEADER = "package parity\n\nimport rego.v1\n\n"
ENTRYPOINT = "parity/result"
CATEGORIES = {"ordering", "numbers", "equality", "undefined", "with", "every", "comprehensions",
              "in_some", "else_default", "functions_conflicts", "strings", "sprintf", "regex",
              "json", "type_name", "builtin_types"}
CHILD_TIMEOUT_SECONDS = 60.0
# An outcome: {"value": v}, "undefined", {"error": needle}, {"compile_error": needle} or "crash".
Outcome = Any

CASES: list[dict[str, Any]] = yaml.safe_load((HERE / "cases.yaml").read_text(encoding="utf-8"))


def _sources(case: Mapping[str, Any]) -> PolicySources:
    return PolicySources("<corpus>", (PolicyModule("case.rego", HEADER + case["rego"]),), ())


def _opa(case: Mapping[str, Any]) -> Outcome:
    with ReferenceEngine(_sources(case)) as engine:
        if engine.findings:
            return {"compile_error": " ".join(f"{f.kind}: {f.message}" for f in engine.findings)}
        try:
            defined, value, _ = engine.evaluate(ENTRYPOINT, case.get("input"))
        except PolicyError as exc:
            return {"error": str(exc)}
    return {"value": value} if defined else "undefined"


def _embedded(case: Mapping[str, Any]) -> Outcome:
    try:
        compiled = CompiledPolicy(_sources(case), [ENTRYPOINT])
    except PolicyCompileError as exc:
        return {"compile_error": str(exc)}
    try:
        defined, value = compiled.evaluate(ENTRYPOINT, case.get("input"))
    except PolicyError as exc:
        return {"error": str(exc)}
    return {"value": value} if defined else "undefined"


def _embedded_in_child(case: Mapping[str, Any]) -> Outcome:
    """A case that crashes rego-cpp runs in a child process: "crash" when a signal ends it."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from tests.gateway.policy.parity.test_corpus import CASES, _embedded; "
            "print(_embedded(next(c for c in CASES if c['id'] == sys.argv[2])))")
    root = str(HERE.parents[3])
    proc = subprocess.run([sys.executable, "-c", code, root, case["id"]], cwd=root,
                          capture_output=True, timeout=CHILD_TIMEOUT_SECONDS, check=False)
    if proc.returncode < 0:
        return "crash"
    return proc.stdout.decode(errors="replace").strip()


def _matches(actual: Outcome, recorded: Outcome) -> bool:
    """``actual`` is the recorded outcome: the same value or, for errors, an error naming it."""
    if isinstance(recorded, str) or isinstance(actual, str):
        return bool(actual == recorded)
    ((kind, want),) = recorded.items()
    if kind not in actual:
        return False
    if kind == "value":
        return bool(actual["value"] == want and type(actual["value"]) is type(want)
                    or _same_number(actual["value"], want))
    return str(want) in str(actual[kind])


def _same_number(a: Any, b: Any) -> bool:
    numbers = (int, float)
    return (isinstance(a, numbers) and isinstance(b, numbers)
            and not isinstance(a, bool) and not isinstance(b, bool) and a == b)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_opa_gives_the_documented_outcome(case: dict[str, Any]) -> None:
    """OPA (the reference) answers what OPA's documentation says for the case."""
    actual = _opa(case)
    assert _matches(actual, case["expected"]), actual


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_embedded_engine_agrees_or_differs_as_recorded(case: dict[str, Any]) -> None:
    """rego-cpp gives OPA's outcome, or exactly the recorded different one (still different)."""
    if case.get("embedded") == "crash":
        actual = _embedded_in_child(case)
    else:
        actual = _embedded(case)
    if "embedded_differs" in case:
        assert _matches(actual, case["embedded"]), actual
        assert not _matches(actual, case["expected"])
    else:
        expected = case["expected"]
        if isinstance(expected, dict) and "error" in expected:
            assert isinstance(actual, dict) and "error" in actual, actual  # messages differ
        else:
            assert _matches(actual, expected), actual


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_policy_check_refuses_what_the_case_says(case: dict[str, Any]) -> None:
    """`policy check` refuses a case's construct exactly when the case says it does."""
    found = parity_check.findings(_sources(case))
    assert bool(found) is case["refused_by_check"], found
    assert all(f.kind == "rego_engine_parity" and f.file == "case.rego" and f.line > 4
               for f in found)


def test_corpus_is_well_formed() -> None:
    """Ids are unique, every category is covered, and a difference carries its reason and value."""
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids))
    assert {c["category"] for c in CASES} == CATEGORIES
    for case in CASES:
        assert ("embedded" in case) == ("embedded_differs" in case), case["id"]
        assert re.fullmatch(r"[a-z0-9_]+", case["id"])


def test_every_difference_is_documented_in_the_policy_readme() -> None:
    """policies/README.md's engine-differences section names every case where rego-cpp differs."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Engine differences (rego-cpp vs OPA)", 1)
    assert len(section) == 2, "policies/README.md lacks the engine differences section"
    body = section[1].split("\n## ", 1)[0]
    missing = [c["id"] for c in CASES if "embedded_differs" in c and f"`{c['id']}`" not in body]
    assert missing == []
