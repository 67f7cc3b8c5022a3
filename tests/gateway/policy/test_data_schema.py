"""Data mistakes fail closed: data.json is checked against policies/data.schema.json at load (a
misspelt key or an unknown PII kind is refused, naming it), and a role without a mask_pii entry
masks every kind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from gateway.pii import ALL_TYPES
from gateway.policy.decision import check_decision
from gateway.policy.errors import PolicyCompileError
from gateway.policy.rego import DATA_SCHEMA, CompiledPolicy, load_sources

POLICIES = Path(__file__).resolve().parents[3] / "policies"


def _folder(tmp_path: Path, change: Any) -> Path:
    """A copy of the shipped policy with ``change(data)`` applied to its data.json."""
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    data = json.loads((target / "data.json").read_text())
    change(data["gateway"])
    (target / "data.json").write_text(json.dumps(data))
    return target


def test_shipped_data_matches_its_schema() -> None:
    """The shipped data.json loads, and the schema's PII kinds are the masker's."""
    load_sources(POLICIES)
    schema = json.loads((POLICIES / DATA_SCHEMA).read_text())
    assert tuple(schema["$defs"]["kinds"]["items"]["enum"]) == ALL_TYPES


@pytest.mark.parametrize(("change", "where"), [
    (lambda g: g["roles"]["analyst"].__setitem__("mask_pii", ["emial"]),
     "/gateway/roles/analyst/mask_pii/0: 'emial' is not one of"),
    (lambda g: g["roles"]["analyst"].__setitem__("mask_ppi", ["email"]),
     "/gateway/roles/analyst: Additional properties are not allowed ('mask_ppi'"),
    (lambda g: g["servers"]["erp"]["mask_pii"].__setitem__("analyst", ["e-mail"]),
     "/gateway/servers/erp/mask_pii/analyst/0: 'e-mail' is not one of"),
    (lambda g: g.__setitem__("pii_kind", ["email"]),
     "/gateway: Additional properties are not allowed ('pii_kind'"),
    (lambda g: g["roles"]["viewer"]["files"].__setitem__("reed", ["shared"]),
     "/gateway/roles/viewer/files: Additional properties are not allowed ('reed'"),
])
def test_data_mistakes_are_refused_at_load(tmp_path: Path, change: Any, where: str) -> None:
    """Each mistake a policy author makes in data.json is a load error naming file and key."""
    with pytest.raises(PolicyCompileError) as err:
        load_sources(_folder(tmp_path, change))
    assert f"data.json: {where}" in str(err.value)


def test_a_role_without_mask_pii_masks_every_kind(tmp_path: Path) -> None:
    """Without the schema (a custom policy) a forgotten mask_pii masks every kind, for one role
    and within several, never nothing."""
    folder = _folder(tmp_path, lambda g: g["roles"]["analyst"].pop("mask_pii"))
    (folder / DATA_SCHEMA).unlink()
    policy = CompiledPolicy(load_sources(folder, include_tests=False), ["mcp/authz/decision"])
    kinds = json.loads((POLICIES / "data.json").read_text())["gateway"]["pii_kinds"]
    for roles in (["analyst"], ["analyst", "engineer"]):
        inp = {"mcp": {"kind": "request", "method": "tools/call", "tool": "list_tables",
                       "arguments": {}},
               "token": {"sub": "a", "roles": roles, "tenant": "acme",
                         "scope": "tools:call:database/*"},
               "server": {"name": "database"}}
        defined, value = policy.evaluate("mcp/authz/decision", inp)
        decision = check_decision(value, defined=defined)
        assert decision.allow and sorted(decision.obligations["mask_pii"]) == sorted(kinds)
