"""Workflow files: parsing, the checks that name file and key, and the reference syntax."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import load_config
from mcp_servers.workflow.spec import (
    MissingValue,
    SpecError,
    check_targets,
    load_dir,
    load_file,
    parse_workflow,
    resolve,
    unchecked_output_refs,
)

REPO = Path(__file__).resolve().parents[2]


def doc(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "wf", "description": "d",
        "input_schema": {"type": "object", "properties": {"n": {"type": "integer"}}},
        "steps": [
            {"id": "a", "server": "erp", "tool": "createOrder", "arguments": {"x": "${inputs.n}"},
             "compensate": {"server": "erp", "tool": "cancelOrder",
                            "arguments": {"order_id": "${steps.a.output.id}"}}},
            {"id": "b", "server": "files", "tool": "write_file",
             "arguments": {"path": "p-${steps.a.output.id}", "content": "${steps.a.output}"}},
        ]}
    base.update(over)
    return base


def error_of(raw: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_workflow(raw, "f.yaml")
    return info.value


def test_shipped_example_loads() -> None:
    """The example in workflows/ parses, its approval runs after the order it names, and every
    step that changes something has a compensation that removes what it made."""
    wf = load_dir(REPO / "workflows")["order_to_invoice"]
    assert [s.id for s in wf.steps] == ["price", "create_order", "approve", "export_invoice", "record"]
    assert wf.steps[1].compensate is not None and wf.steps[0].idempotent
    undo = {s.id: (s.compensate.server, s.compensate.tool) for s in wf.steps if s.compensate is not None}
    assert undo == {"create_order": ("erp", "cancelOrder"), "export_invoice": ("files", "delete_file"),
                    "record": ("database", "delete_row")}


def test_references_order_the_steps() -> None:
    """A step that references another runs after it even when listed first."""
    raw = doc()
    raw["steps"].reverse()
    wf = parse_workflow(raw, "f.yaml")
    assert [s.id for s in wf.steps] == ["a", "b"]


def test_unknown_key_names_file_and_key() -> None:
    """An unknown key is an error naming the file and the key's path."""
    raw = doc()
    raw["steps"][1]["retry"] = 3
    err = error_of(raw)
    assert err.where == "f.yaml: steps[1].retry"


def test_cycle_is_refused() -> None:
    """Two steps depending on each other are a cycle, named."""
    raw = doc()
    raw["steps"][0]["depends_on"] = ["b"]
    assert "cycle" in error_of(raw).message


def test_reference_to_unknown_step_or_input() -> None:
    """A reference to a step or an input that does not exist names the key."""
    raw = doc()
    raw["steps"][1]["arguments"]["path"] = "${steps.zz.output.id}"
    assert error_of(raw).where == "f.yaml: steps[1].arguments.path"
    raw = doc()
    raw["steps"][0]["arguments"]["x"] = "${inputs.missing}"
    assert "no property 'missing'" in error_of(raw).message


def test_reference_to_a_step_not_depended_on() -> None:
    """A compensation may read its own step and the steps before it, not a later one."""
    raw = doc()
    raw["steps"][0]["compensate"]["arguments"]["order_id"] = "${steps.b.output.id}"
    err = error_of(raw)
    assert err.where == "f.yaml: steps[0].compensate.arguments.order_id"
    assert "not one this step depends on" in err.message


def test_bad_syntax_and_retries_need_idempotent() -> None:
    """Malformed references, eval-like text and retries of a non-idempotent step are refused."""
    for bad in ("${inputs.n + 1}", "${__import__('os')}", "${inputs.n", "${env.HOME}"):
        raw = doc()
        raw["steps"][0]["arguments"]["x"] = bad
        assert error_of(raw).where == "f.yaml: steps[0].arguments.x", bad
    raw = doc()
    raw["steps"][0]["retries"] = 2
    assert "idempotent" in error_of(raw).message


def test_input_schema_is_checked_and_key_reserved() -> None:
    """A broken input schema and a property named idempotency_key are refused."""
    assert error_of(doc(input_schema={"type": "object", "properties": {"n": {"type": "nope"}}})
                    ).where == "f.yaml: input_schema"
    assert "reserved" in error_of(doc(input_schema={
        "type": "object", "properties": {"idempotency_key": {"type": "string"}}})).message


def test_step_may_not_call_the_workflow_server() -> None:
    """No recursion: a step on the workflow server itself is refused."""
    raw = doc()
    raw["steps"][1]["server"] = "workflow"
    assert error_of(raw).where == "f.yaml: steps[1].server"


def test_resolve_keeps_types_and_interpolates() -> None:
    """A whole-string reference keeps its type; inside text an object becomes compact JSON."""
    scope = {"inputs": {"n": 3}, "steps": {"a": {"output": {"id": 7, "rows": [[5]]}}},
             "run": {"id": "r1"}}
    assert resolve({"x": "${inputs.n}", "y": ["${steps.a.output.rows.0.0}"]}, scope) == {"x": 3, "y": [5]}
    assert resolve("o=${steps.a.output} r=${run.id} $${lit}", scope) == \
        'o={"id":7,"rows":[[5]]} r=r1 ${lit}'
    with pytest.raises(MissingValue):
        resolve("${steps.a.output.nope}", scope)


def test_check_targets_unknown_server_and_tool() -> None:
    """Unknown servers, and tools a known server lacks, are listed with file and key."""
    wf = parse_workflow(doc(), "f.yaml")
    problems = check_targets(wf, {"erp": frozenset({"createOrder"}), "files": None})
    assert problems == ["f.yaml: steps[0].compensate.tool: server 'erp' has no tool 'cancelOrder' "
                        "(known: createOrder)"]
    assert "unknown server 'files'" in check_targets(wf, {"erp": None})[0]


def test_load_file_reports_yaml_errors(tmp_path: Path) -> None:
    """A file that is not YAML is an error naming the file and the line."""
    path = tmp_path / "x.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"x.yaml: is not valid YAML \(line 2\)"):
        load_file(path)
    path.write_text(yaml.safe_dump(doc()))
    assert load_file(path).source == str(path)


ORDER_SCHEMA = {"type": "object", "required": ["id"], "additionalProperties": False,
                "properties": {"id": {"type": "integer", "minimum": 1}}}


def test_output_schema_is_checked_at_load() -> None:
    """A step's output_schema must be a JSON Schema; a reference into a closed output names a
    property it declares."""
    raw = doc()
    raw["steps"][0]["output_schema"] = {"type": "nonsense"}
    assert error_of(raw).where == "f.yaml: steps[0].output_schema"
    raw["steps"][0]["output_schema"] = ORDER_SCHEMA
    parse_workflow(raw, "f.yaml")
    raw["steps"][1]["arguments"]["path"] = "p-${steps.a.output.idx}"
    err = error_of(raw)
    assert err.where == "f.yaml: steps[1].arguments.path" and "no property 'idx'" in err.message


def test_unchecked_output_uses_are_listed() -> None:
    """Every use of an output without output_schema in arguments is named by file and key; the
    shipped example checks every output it uses."""
    wf = parse_workflow(doc(), "f.yaml")
    found = unchecked_output_refs(wf)
    assert any(f.startswith("f.yaml: steps[0].compensate.arguments.order_id: ${steps.a.output.id}")
               for f in found)
    assert any(f.startswith("f.yaml: steps[1].arguments.path:") for f in found)
    raw = doc()
    raw["steps"][0]["output_schema"] = ORDER_SCHEMA
    assert unchecked_output_refs(parse_workflow(raw, "f.yaml")) == []
    assert unchecked_output_refs(load_file(REPO / "workflows" / "order_to_invoice.yaml")) == []


def test_default_stack_and_example_policy_serve_the_example() -> None:
    """make run's database server makes the table the example records into writable, its files
    server allows writes, and the example policy lets engineers call every tool the example's
    steps and compensations name, on that table."""
    wf = load_dir(REPO / "workflows")["order_to_invoice"]
    servers = {s.name: s.args for s in load_config().servers}
    record = next(s for s in wf.steps if s.id == "record")
    assert record.call is not None and record.call.arguments["table"] == "invoice_records"
    db_args = list(servers["database"])
    assert db_args[db_args.index("--writable-table") + 1] == "invoice_records"
    assert "--allow-write" in servers["files"]
    engineer = json.loads((REPO / "policies" / "data.json").read_text())["gateway"]["roles"]["engineer"]
    calls = [c for s in wf.steps for c in (s.call, s.compensate) if c is not None]
    assert calls and all(c.tool in engineer["tools"][c.server] for c in calls)
    assert "invoice_records" in engineer["tables"]
