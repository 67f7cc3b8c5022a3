"""``mcp-gateway workflow validate``: exit codes and errors naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.catalog.store import Catalog
from gatewayctl.cli import main

REPO = Path(__file__).resolve().parents[2]


def config_with_catalog(tmp: Path, tools: dict[str, list[str]]) -> Path:
    """The embedded default config, its catalog in ``tmp`` holding ``tools``."""
    raw = yaml.safe_load((REPO / "gateway" / "default_config.yaml").read_text())
    raw["catalog"]["path"] = str(tmp / "catalog.sqlite")
    raw["state_dir"] = str(tmp / "state")
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    with Catalog(tmp / "catalog.sqlite") as catalog:
        for server, names in tools.items():
            catalog.refresh(server, [{"name": n, "inputSchema": {"type": "object"}} for n in names])
    return path


def test_shipped_example_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped example passes against the default config and a catalog with its tools."""
    config = config_with_catalog(tmp_path, {"erp": ["createOrder", "cancelOrder"],
                                            "files": ["write_file", "delete_file"],
                                            "database": ["query", "insert_row", "delete_row"]})
    rc = main(["--config", str(config), "workflow", "validate",
               str(REPO / "workflows/order_to_invoice.yaml")])
    assert rc == 0, capsys.readouterr().err
    assert "ok (order_to_invoice, 5 steps)" in capsys.readouterr().out


def test_unknown_tool_and_server_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tool the catalog does not know for its server, and a server not configured, exit 1."""
    config = config_with_catalog(tmp_path, {"files": ["read_file"]})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "name": "bad", "description": "d",
        "steps": [{"id": "a", "server": "files", "tool": "write_file"},
                  {"id": "b", "server": "crm", "tool": "x"}]}))
    rc = main(["--config", str(config), "workflow", "validate", str(bad)])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{bad}: steps[0].tool: server 'files' has no tool 'write_file'" in err
    assert f"{bad}: steps[1].server: unknown server 'crm'" in err


def test_spec_error_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A schema error in a file exits 1 naming the file and key."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndescription: d\nsteps: []\n")
    assert main(["workflow", "validate", "--no-catalog", str(bad)]) == 1
    assert f"{bad}: steps: must be a non-empty list" in capsys.readouterr().err


def test_unchecked_output_is_a_warning_or_with_strict_a_problem(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A step output used in a file path without output_schema is a warning naming file and key;
    with --strict it fails."""
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump({
        "name": "wf", "description": "d",
        "steps": [{"id": "a", "server": "erp", "tool": "createOrder"},
                  {"id": "b", "server": "files", "tool": "write_file",
                   "arguments": {"path": "o-${steps.a.output.id}"}}]}))
    assert main(["workflow", "validate", "--no-catalog", str(wf)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {wf}: steps[1].arguments.path: ${{steps.a.output.id}}" in err
    assert main(["workflow", "validate", "--no-catalog", "--strict", str(wf)]) == 1
    assert f"{wf}: steps[1].arguments.path:" in capsys.readouterr().err
    assert main(["workflow", "validate", "--no-catalog", "--strict",
                 str(REPO / "workflows/order_to_invoice.yaml")]) == 0


def test_a_folder_stands_for_its_workflow_files(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`workflow validate --strict workflows/` checks every *.yaml of the folder, as the server
    loads it; a folder without workflow files is a problem, not a silent success."""
    config = config_with_catalog(tmp_path, {"erp": ["createOrder", "cancelOrder"],
                                            "files": ["write_file", "delete_file"],
                                            "database": ["query", "insert_row", "delete_row"]})
    rc = main(["--config", str(config), "workflow", "validate", "--strict", str(REPO / "workflows")])
    assert rc == 0, capsys.readouterr().err
    assert "ok (order_to_invoice" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a workflow")
    assert main(["--config", str(config), "workflow", "validate", str(empty)]) == 1
    assert "no workflow files" in capsys.readouterr().err
