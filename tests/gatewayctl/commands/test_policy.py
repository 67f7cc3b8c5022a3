"""`mcp-gateway policy test|eval`, in-process and once as the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gatewayctl.cli import main

ROOT = Path(__file__).resolve().parents[3]
POLICIES = ROOT / "policies"
CLAIMS = json.dumps({"sub": "alice", "roles": ["analyst"], "scope": "tools:call:files/*", "tenant": "acme"})


def call(path: str) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "read_file", "arguments": {"path": path}}})


def test_policy_test_passes_on_shipped_policies(capsys: pytest.CaptureFixture[str]) -> None:
    """Every shipped Rego unit test passes and each is listed with -v."""
    assert main(["policy", "test", "--dir", str(POLICIES), "-v"]) == 0
    out = capsys.readouterr().out
    assert "PASS  authz_test.rego: data.mcp.authz_test.test_missing_scope_named" in out
    assert "FAIL" not in out.replace("FAIL: ", "")


def test_policy_test_fails_on_failing_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A failing test rule makes `policy test` exit 1 and names the rule."""
    (tmp_path / "p.rego").write_text("package p\nimport rego.v1\nx := 1\n")
    (tmp_path / "p_test.rego").write_text("package p_test\nimport rego.v1\n"
                                          "test_ok if data.p.x == 1\ntest_wrong if data.p.x == 2\n")
    assert main(["policy", "test", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  p_test.rego: data.p_test.test_wrong (undefined)" in out
    assert "test_ok" not in out  # passing tests only with -v
    assert "PASS: 1/2  FAIL: 1" in out


def test_policy_test_compile_error_names_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A compile error exits 1 with file:line:col."""
    (tmp_path / "p.rego").write_text("package p\nimport rego.v1\nx := 1 if {\n  input.a ==\n}\n")
    assert main(["policy", "test", "--dir", str(tmp_path)]) == 1
    assert "p.rego:4:" in capsys.readouterr().err


def test_policy_eval_explains(capsys: pytest.CaptureFixture[str]) -> None:
    """eval prints the decision and, with --explain, the value of each rule; a denial exits 1."""
    assert main(["policy", "eval", "--dir", str(POLICIES), "--claims", CLAIMS,
                 "--request", call("secret/x"), "--explain"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("DENY  reason=path_not_allowed  http_status=403")
    assert '  roles = ["analyst"]' in out
    assert "  granted = <undefined>" in out


def test_policy_eval_from_files_allow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """@file arguments work and an allowed call shows its obligations."""
    (tmp_path / "claims.json").write_text(CLAIMS)
    (tmp_path / "req.json").write_text(call("shared/a.txt"))
    assert main(["policy", "eval", "--dir", str(POLICIES), "--claims", f"@{tmp_path / 'claims.json'}",
                 "--request", f"@{tmp_path / 'req.json'}", "--server", "files"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ALLOW  reason=tool_allowed")
    assert '"mask_pii"' in out


def test_policy_eval_missing_scope(capsys: pytest.CaptureFixture[str]) -> None:
    """A denial for lack of scope shows the scope to ask for."""
    claims = json.dumps({"sub": "a", "roles": ["viewer"], "scope": "openid", "tenant": "acme"})
    assert main(["policy", "eval", "--dir", str(POLICIES), "--claims", claims,
                 "--request", call("shared/a")]) == 1
    assert "missing_scope=tools:call:files/read_file" in capsys.readouterr().out


def test_policy_eval_contract_violation_is_an_error(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A decision ext_authz would answer 500 for (a reserved header set by the policy) exits 2,
    not 0: a script checking a policy change sees it as broken."""
    (tmp_path / "p.rego").write_text(
        "package mcp.authz\nimport rego.v1\n"
        'decision := {"allow": true, "reason": "ok", "http_status": 200,'
        ' "headers": {"x-mcp-user": "root"}, "obligations": {}}\n')
    assert main(["policy", "eval", "--dir", str(tmp_path), "--claims", CLAIMS,
                 "--request", call("shared/a")]) == 2
    assert "policy_contract_error" in capsys.readouterr().out


def test_policy_eval_bad_request(capsys: pytest.CaptureFixture[str]) -> None:
    """A body the gateway would reject before the policy is reported as such (exit 2)."""
    assert main(["policy", "eval", "--dir", str(POLICIES), "--claims", CLAIMS,
                 "--request", '{"jsonrpc":"2.0","id":1,"method":"a","method":"b"}']) == 2
    assert "before the policy" in capsys.readouterr().err


@pytest.mark.parametrize("path,limit", [("shared/" + "a" * 20_000, "path_length"),
                                        ("a/" * 200, "path_depth")])
def test_policy_eval_input_over_a_bound(capsys: pytest.CaptureFixture[str], path: str, limit: str) -> None:
    """A path over a gateway bound is reported as refused before the policy, naming the bound (exit 2)."""
    assert main(["policy", "eval", "--dir", str(POLICIES), "--claims", CLAIMS, "--request", call(path)]) == 2
    err = capsys.readouterr().err
    assert "input_limit_exceeded (HTTP 400" in err and f"limit={limit}" in err and "Traceback" not in err


def test_console_script_subprocess(tmp_path: Path) -> None:
    """The installed `mcp-gateway policy test` reports each test and exits 1 on a failure."""
    (tmp_path / "p.rego").write_text("package p\nimport rego.v1\nx := 1\n")
    (tmp_path / "p_test.rego").write_text("package p_test\nimport rego.v1\n"
                                          "test_ok if data.p.x == 1\ntest_bad if data.p.x == 3\n")
    exe = Path(sys.executable).with_name("mcp-gateway")
    proc = subprocess.run([str(exe), "policy", "test", "--dir", str(tmp_path), "-v"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "PASS  p_test.rego: data.p_test.test_ok" in proc.stdout
    assert "FAIL  p_test.rego: data.p_test.test_bad" in proc.stdout


def test_policy_test_runs_only_the_selected_tests(capsys: pytest.CaptureFixture[str]) -> None:
    """--run REGEX selects tests by their full name; no match, or a bad pattern, is an error."""
    assert main(["policy", "test", "--dir", str(POLICIES), "--run", "time_tools", "-v"]) == 0
    out = capsys.readouterr().out
    assert "data.mcp.authz_test.test_time_tools_by_role" in out and "PASS: 1/1" in out
    assert main(["policy", "test", "--dir", str(POLICIES), "--run", "no_such_test"]) == 1
    assert main(["policy", "test", "--dir", str(POLICIES), "--run", "("]) == 1
    assert "not a regular expression" in capsys.readouterr().err


def test_policy_eval_takes_a_whole_input_or_a_time(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """--input evaluates a document as is; --now sets input.now; mixing --input with the
    request flags is an error."""
    doc = {"mcp": {"kind": "request", "method": "tools/call", "tool": "read_file",
                   "arguments": {"path": "shared/a"}},
           "token": {"sub": "a", "roles": ["viewer"], "tenant": "acme",
                     "scope": "tools:call:files/*"},
           "server": {"name": "files"}}
    (tmp_path / "input.json").write_text(json.dumps(doc))
    assert main(["policy", "eval", "--dir", str(POLICIES), "--input",
                 f"@{tmp_path / 'input.json'}"]) == 0
    assert capsys.readouterr().out.startswith("ALLOW")
    assert main(["policy", "eval", "--dir", str(POLICIES), "--claims", CLAIMS,
                 "--request", call("shared/a"), "--now", "1700000000", "--explain"]) == 0
    assert '"now": 1700000000' in capsys.readouterr().out
    assert main(["policy", "eval", "--dir", str(POLICIES), "--input", "{}", "--claims", CLAIMS]) == 2
    assert main(["policy", "eval", "--dir", str(POLICIES), "--request", call("shared/a")]) == 2


def test_policy_test_checks_sample_decisions_against_the_contract(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A policy whose tests all pass but whose allowed decisions set a header the gateway owns
    (every allowed request a 500 in production) fails `policy test`, naming a request and the
    problem; so does a mask_pii kind the masker does not know."""
    for old, new, problem in (
            ('\t"allow": true,\n\t"reason": granted,\n\t"http_status": 200,\n\t"headers": {},',
             '\t"allow": true,\n\t"reason": granted,\n\t"http_status": 200,\n'
             '\t"headers": {"x-mcp-user": "root"},', "the gateway owns it"),
            ('obligations := {"mask_pii": mask_pii}', 'obligations := {"mask_pii": ["emial"]}',
             "unknown PII type 'emial'")):
        folder = tmp_path / problem.split()[0].strip("'")
        shutil.copytree(POLICIES, folder)
        rego = folder / "authz.rego"
        source = rego.read_text()
        assert old in source
        rego.write_text(source.replace(old, new))
        assert main(["policy", "test", "--dir", str(folder)]) == 1
        out = capsys.readouterr().out
        assert "CONTRACT mcp/authz/decision for role=" in out and problem in out
        if "gateway" in problem:
            assert "FAIL:" not in out  # every Rego test passed, and still it is caught


def test_policy_test_refuses_with_whole_input_naming_file_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`with input as {...}` in a test (which can abort rego-cpp) is an error with file and line,
    not a crash of the runner; in a comment it is harmless."""
    (tmp_path / "p.rego").write_text("package p\nimport rego.v1\nx := input.a\n")
    (tmp_path / "p_test.rego").write_text(
        "package p_test\nimport rego.v1\n# with input as {} is fine in a comment\n"
        "test_x if {\n\tdata.p.x == 1 with input as {\"a\": 1}\n}\n")
    assert main(["policy", "test", "--dir", str(tmp_path)]) == 1
    assert "p_test.rego:5: `with input as ...`" in capsys.readouterr().err
