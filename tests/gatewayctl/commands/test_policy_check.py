"""`mcp-gateway policy check`: findings as file:line, exit codes, --json, --strict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gatewayctl.cli import main

ROOT = Path(__file__).resolve().parents[3]
POLICIES = ROOT / "policies"


def copy_with(tmp_path: Path, old: str, new: str) -> Path:
    folder = tmp_path / "policies"
    shutil.copytree(POLICIES, folder)
    rego = folder / "authz.rego"
    source = rego.read_text(encoding="utf-8")
    assert old in source
    rego.write_text(source.replace(old, new, 1), encoding="utf-8")
    return folder


def line_of(folder: Path, text: str) -> int:
    lines = (folder / "authz.rego").read_text(encoding="utf-8").splitlines()
    return next(n for n, line in enumerate(lines, 1) if text in line)


def test_shipped_policies_pass(capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped folder exits 0 and prints no error."""
    assert main(["policy", "check", "--dir", str(POLICIES)]) == 0
    out = capsys.readouterr().out
    assert all(line.endswith("(rego_unused_rule)") for line in out.splitlines())


def test_error_prints_file_line_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt rule reference is printed as file:line: message (kind), exit 1."""
    folder = copy_with(tmp_path, "\tsql_understood\n\tevery t in", "\tsql_understood\n\tnot sql_to_long\n"
                       "\tevery t in")
    assert main(["policy", "check", "--dir", str(folder)]) == 1
    out = capsys.readouterr().out
    line = line_of(folder, "not sql_to_long")
    assert f"authz.rego:{line}: var sql_to_long is unsafe (rego_unsafe_var_error)" in out.splitlines()


def test_warning_passes_unless_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unused rule prints but exits 0; with --strict it exits 1."""
    folder = copy_with(tmp_path, "max_path_segments := 128",
                       "max_path_segments := 128\n\nforgotten := 1")
    assert main(["policy", "check", "--dir", str(folder)]) == 0
    line = line_of(folder, "forgotten := 1")
    out = capsys.readouterr().out
    assert any(o.startswith(f"authz.rego:{line}: rule forgotten ") and o.endswith("(rego_unused_rule)")
               for o in out.splitlines())
    assert main(["policy", "check", "--dir", str(folder), "--strict"]) == 1


def test_json_output_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints one document: dir, entrypoint, ok, counts and every finding with its severity."""
    folder = copy_with(tmp_path, "method in data.gateway.open_methods",
                       "method in data.gateway.open_metods")
    assert main(["policy", "check", "--dir", str(folder), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"dir", "entrypoint", "ok", "errors", "warnings", "findings"}
    assert doc["ok"] is False and doc["errors"] == 1 and doc["entrypoint"] == "mcp/authz/decision"
    errors = [f for f in doc["findings"] if f["severity"] == "error"]
    assert errors == [{"file": "authz.rego", "line": line_of(folder, "open_metods"),
                       "kind": "rego_undefined_data_ref", "message": errors[0]["message"],
                       "severity": "error"}]
    assert "did you mean data.gateway.open_methods?" in errors[0]["message"]
    assert all(set(f) == {"file", "line", "kind", "message", "severity"} for f in doc["findings"])


def test_json_clean(capsys: pytest.CaptureFixture[str]) -> None:
    """--json on the shipped folder says ok with no errors."""
    assert main(["policy", "check", "--dir", str(POLICIES), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["errors"] == 0


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing folder, a malformed entrypoint or a config that does not load exit 2."""
    assert main(["policy", "check", "--dir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["policy", "check", "--dir", str(POLICIES), "--entrypoint", "mcp.authz"]) == 2
    assert main(["--config", str(tmp_path / "missing.yaml"), "policy", "check"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["policy", "check", "--no-such-flag"])
    assert exc.value.code == 2
