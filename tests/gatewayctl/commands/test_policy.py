"""`mcp-gateway policy test|eval`, in-process and once as the installed console script."""

from __future__ import annotations

import json
import re
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
    assert "data.mcp.authz_test.test_missing_scope_named" in out
    assert "PASS  authz_test.rego:" in out
    assert "FAIL" not in out.replace("FAIL: ", "")
    assert "PARITY" not in out and "CONTRACT" not in out


def test_policy_test_fails_on_failing_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A failing test rule makes `policy test` exit 1, names the rule with its file and line,
    and shows the failing expression with the values it compared."""
    (tmp_path / "p.rego").write_text("package p\nimport rego.v1\nx := 1\n")
    (tmp_path / "p_test.rego").write_text("package p_test\nimport rego.v1\n"
                                          "test_ok if data.p.x == 1\ntest_wrong if data.p.x == 2\n")
    assert main(["policy", "test", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  p_test.rego:4: data.p_test.test_wrong (undefined)" in out
    assert "failed at p_test.rego:4: test_wrong if data.p.x == 2" in out
    assert "compared: 1 = 2" in out
    assert "test_ok" not in out  # passing tests only with -v
    assert "PASS: 1/2  FAIL: 1" in out


def test_policy_test_compile_error_names_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A compile error exits 1 with file:line, on either engine."""
    (tmp_path / "p.rego").write_text("package p\nimport rego.v1\nx := 1 if {\n  input.a ==\n}\n")
    assert main(["policy", "test", "--dir", str(tmp_path)]) == 1
    assert "p.rego:5: unexpected } token" in capsys.readouterr().err  # OPA: where it stopped
    assert main(["policy", "test", "--dir", str(tmp_path), "--engine", "embedded"]) == 1
    assert "p.rego:4:" in capsys.readouterr().err  # rego-cpp: where the expression starts


def test_policy_eval_explains(capsys: pytest.CaptureFixture[str]) -> None:
    """eval prints the decision and, with --explain, the rules that decided it with file:line:
    the failure chain from `granted` down to the path check, the denial that held; bounded and
    without value dumps. A denial exits 1."""
    assert main(["policy", "eval", "--dir", str(POLICIES), "--claims", CLAIMS,
                 "--request", call("secret/x"), "--explain"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("DENY  reason=path_not_allowed  http_status=403")
    trace = out.split("rules of data.mcp.authz that decided", 1)[1].split("\npolicy input:")[0]
    lines = trace.strip().splitlines()[1:]
    assert 0 < len(lines) <= 61
    assert all(len(line) <= 160 for line in lines)
    assert re.search(r"failed\s+authz\.rego:\d+\s+decision: granted", trace)
    assert re.search(r"failed\s+authz\.rego:\d+\s+granted: tool_call_ok", trace)
    assert re.search(r"held\s+authz\.rego:\d+\s+denials contains \[\d+, \"path_not_allowed\"", trace)
    assert "NOTE: OPA decides" not in out
    # A rule whose other body held is not listed as failed (is_open_method failed, roles held).
    assert not re.search(r"failed\s+authz\.rego:\d+\s+roles", trace)


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
    assert "PASS  p_test.rego:3: data.p_test.test_ok" in proc.stdout
    assert "FAIL  p_test.rego:4: data.p_test.test_bad" in proc.stdout


def test_policy_test_runs_only_the_selected_tests(capsys: pytest.CaptureFixture[str]) -> None:
    """--run REGEX selects tests by their full name; no match, or a bad pattern, is an error."""
    assert main(["policy", "test", "--dir", str(POLICIES), "--run", "time_tools", "-v"]) == 0
    out = capsys.readouterr().out
    assert "data.mcp.authz_test.test_time_tools_by_role" in out and "PASS: 1/1" in out
    # As with `opa test --run`, the rule name alone matches too.
    assert main(["policy", "test", "--dir", str(POLICIES), "--run", "^test_time_tools_by_role$"]) == 0
    assert "PASS: 1/1" in capsys.readouterr().out
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
        # The Rego tests that compute such a decision fail too (they assert only `allow`).
        assert "(a decision outside the contract)" in out


def test_policy_test_refuses_with_whole_input_naming_file_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`with input as {...}` in a test (which can abort rego-cpp) is an error with file and line
    on the embedded engine, not a crash of the runner; in a comment it is harmless; OPA runs it."""
    (tmp_path / "p.rego").write_text("package p\nimport rego.v1\nx := input.a\n")
    (tmp_path / "p_test.rego").write_text(
        "package p_test\nimport rego.v1\n# with input as {} is fine in a comment\n"
        "test_x if {\n\tdata.p.x == 1 with input as {\"a\": 1}\n}\n")
    assert main(["policy", "test", "--dir", str(tmp_path), "--engine", "embedded"]) == 1
    assert "p_test.rego:5: `with input as ...`" in capsys.readouterr().err
    main(["policy", "test", "--dir", str(tmp_path), "-v"])
    assert "PASS  p_test.rego:4: data.p_test.test_x" in capsys.readouterr().out


def _copy_policies(tmp_path: Path, old: str, new: str) -> Path:
    folder = tmp_path / "policies"
    shutil.copytree(POLICIES, folder)
    rego = folder / "authz.rego"
    source = rego.read_text()
    assert old in source
    rego.write_text(source.replace(old, new))
    return folder


def test_policy_test_checks_decisions_computed_inside_tests(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A policy whose allowed decisions set a header the gateway owns fails the very tests that
    compute such a decision (even with --run, which skips the sample requests), naming the
    header and the input; the tests that only see denials still pass."""
    folder = _copy_policies(
        tmp_path, '\t"allow": true,\n\t"reason": granted,\n\t"http_status": 200,\n\t"headers": {},',
        '\t"allow": true,\n\t"reason": granted,\n\t"http_status": 200,\n'
        '\t"headers": {"x-mcp-user": "root"},')
    assert main(["policy", "test", "--dir", str(folder), "--run", "test_rbac_allows_role_tool|"
                 "test_unknown_method_denied"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  authz_test.rego:" in out
    assert "data.mcp.authz_test.test_rbac_allows_role_tool (a decision outside the contract)" in out
    assert "decision.headers may not set 'x-mcp-user'" in out and '"read_file"' in out
    assert "test_unknown_method_denied" not in out
    assert "PASS: 1/2  FAIL: 1" in out


def test_policy_test_runtime_error_names_rule_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A test that hits a runtime error (conflicting values of a complete rule) is an ERROR
    naming the file, line and rule of the conflict and its source line; the others still run."""
    (tmp_path / "p.rego").write_text("package p\nimport rego.v1\nx := 1\n"
                                     "c := 1 if input.a\nc := 2 if input.a\n")
    (tmp_path / "p_test.rego").write_text(
        "package p_test\nimport rego.v1\ntest_ok if data.p.x == 1\n"
        "test_conflict if data.p.c == 1 with input.a as true\n")
    assert main(["policy", "test", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "ERROR p_test.rego:4: data.p_test.test_conflict" in out
    assert re.search(r"error at p\.rego:[45] \(rule c\): c := [12] if input\.a", out)
    assert "eval_conflict_error" in out
    assert "PASS: 1/2  FAIL: 1" in out


def _quirk_policy(folder: Path) -> None:
    """A policy rego-cpp and OPA decide differently, which policy check cannot see: rego-cpp's
    upper() leaves non-ASCII letters alone."""
    folder.mkdir()
    (folder / "data.json").write_text(json.dumps(
        {"gateway": {"roles": {"viewer": {"tools": {"files": ["read_file"]}}},
                     "servers": {"files": {}}}}))
    (folder / "authz.rego").write_text(
        "package mcp.authz\nimport rego.v1\ndefault decision := false\n"
        'decision := {"allow": true, "reason": "odd"} if upper("\u00e9") == "\u00e9"\n')
    (folder / "authz_test.rego").write_text(
        "package mcp.authz_test\nimport rego.v1\ntest_ok if true\n")


def test_policy_test_reports_engine_differences(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Sample requests that rego-cpp (production) and OPA decide differently fail `policy
    test`, each named with both decisions, although every Rego test passes."""
    _quirk_policy(tmp_path / "p")
    assert main(["policy", "test", "--dir", str(tmp_path / "p")]) == 1
    out = capsys.readouterr().out
    assert "PARITY mcp/authz/decision for role=viewer server=files tools/call read_file: " \
           'rego-cpp {"allow": true, "reason": "odd"}, OPA false' in out
    assert "PASS: 1/1" in out and "sample request(s) decided differently" in out


def test_policy_eval_says_when_opa_decides_differently(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """eval prints what rego-cpp decides (what the gateway does); --engine opa prints OPA's
    decision; --explain notes that OPA decides differently."""
    _quirk_policy(tmp_path / "p")
    args = ["policy", "eval", "--dir", str(tmp_path / "p"), "--claims", CLAIMS,
            "--request", call("shared/a")]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("ALLOW  reason=odd")
    assert main([*args, "--engine", "opa"]) == 1
    assert capsys.readouterr().out.startswith("DENY  reason=denied")
    assert main([*args, "--explain"]) == 0
    assert "NOTE: OPA decides this input differently from rego-cpp: false" in capsys.readouterr().out


def test_policy_eval_refuses_a_folder_the_gateway_would_refuse(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder that fails `policy check` (here: a typo'd rule, and a comparison the engines
    decide differently) is an error (exit 2) naming file and line, not an ALLOW or DENY of a
    policy that would never serve."""
    for old, new, needle in (
            ("not restricting_role_refuses_call", "not restricting_role_refuse_call",
             r"authz\.rego:\d+: var restricting_role_refuse_call is unsafe"),
            ('is_tool_call if method == "tools/call"',
             'is_tool_call if {\n\tmethod == "tools/call"\n\t20 > "2000"\n}',
             r'authz\.rego:\d+: `20 > "2000"`')):
        folder = _copy_policies(tmp_path / old[:12].replace(" ", "_"), old, new)
        assert main(["policy", "eval", "--dir", str(folder), "--claims", CLAIMS,
                     "--request", call("shared/a")]) == 2
        err = capsys.readouterr().err
        assert "the gateway would refuse to load it" in err and re.search(needle, err), err


def test_policy_eval_runtime_error_names_rule_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A conflict rego-cpp reports without a location is reported with OPA's file, line and
    rule (exit 2), with or without --explain."""
    (tmp_path / "authz.rego").write_text(
        "package mcp.authz\nimport rego.v1\n"
        'decision := {"allow": true} if input.token.sub\n'
        'decision := {"allow": false} if input.token.tenant\n')
    for extra in ([], ["--explain"]):
        assert main(["policy", "eval", "--dir", str(tmp_path), "--claims", CLAIMS,
                     "--request", call("shared/a"), *extra]) == 2
        err = capsys.readouterr().err
        assert "error at authz.rego:3 (rule decision)" in err and "eval_conflict_error" in err


@pytest.mark.parametrize("engine", ["opa", "embedded", "both"])
def test_policy_test_engines(tmp_path: Path, capsys: pytest.CaptureFixture[str], engine: str) -> None:
    """Each --engine runs the tests and names itself in the summary; an unknown engine is a
    usage error."""
    (tmp_path / "authz.rego").write_text("package mcp.authz\nimport rego.v1\n"
                                         "default decision := false\n")
    (tmp_path / "p_test.rego").write_text("package p_test\nimport rego.v1\n"
                                          "test_ok if data.mcp.authz.decision == false\n")
    assert main(["policy", "test", "--dir", str(tmp_path), "--engine", engine, "-v"]) == 0
    out = capsys.readouterr().out
    assert "PASS  p_test.rego:3: data.p_test.test_ok" in out and f"[{engine}, " in out
    with pytest.raises(SystemExit):
        main(["policy", "test", "--dir", str(tmp_path), "--engine", "wasm"])


def test_policy_test_both_engines_report_a_different_outcome(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--engine both names every test that passes on one engine and not on the other."""
    (tmp_path / "p.rego").write_text("package p\nimport rego.v1\nodd if 20 > \"2000\"\n")
    (tmp_path / "p_test.rego").write_text("package p_test\nimport rego.v1\ntest_odd if data.p.odd\n")
    assert main(["policy", "test", "--dir", str(tmp_path), "--engine", "both"]) == 1
    out = capsys.readouterr().out
    assert "ENGINES p_test.rego:3: data.p_test.test_odd: OPA FAIL (undefined), rego-cpp PASS" in out
