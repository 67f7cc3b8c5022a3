"""The embedded regopy backend: decisions, fail-closed errors, hot reload, extra entrypoints."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import PolicyConfig
from gateway.policy import PolicyCompileError, PolicyError
from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.factory import build_engine
from gateway.policy.opa import OpaEngine

REPO_POLICIES = Path(__file__).resolve().parents[3] / "policies"

SIMPLE = """package mcp.authz
import rego.v1
default decision := {"allow": false, "reason": "default_deny"}
decision := {"allow": true, "reason": "%s"} if input.token.sub == "alice"
"""


def write(d: Path, name: str, text: str) -> None:
    (d / name).write_text(text, encoding="utf-8")


@pytest.fixture
async def simple(tmp_path: Path) -> AsyncIterator[EmbeddedEngine]:
    write(tmp_path, "authz.rego", SIMPLE % "first")
    engine = EmbeddedEngine(tmp_path, "mcp/authz/decision", reload_interval=0)
    await engine.start()
    yield engine
    await engine.close()


def tool_call(path: str, roles: list[str] | None = None) -> dict[str, Any]:
    return {"mcp": {"kind": "request", "method": "tools/call", "tool": "read_file",
                    "arguments": {"path": path}},
            "token": {"sub": "alice", "roles": roles or ["viewer"], "scope": "tools:call:files/*",
                      "tenant": "acme"},
            "server": {"name": "files"}}


async def test_repo_policy_allows_and_denies() -> None:
    """The shipped policy allows a viewer's read under shared/ and denies one elsewhere."""
    engine = build_engine(PolicyConfig(dir=str(REPO_POLICIES)), reload_interval=0)
    await engine.start()
    try:
        ok = await engine.decide(tool_call("shared/a.txt"))
        assert ok.allow and ok.reason == "tool_allowed"
        assert ok.obligations["mask_pii"]
        no = await engine.decide(tool_call("secret/a.txt"))
        assert not no.allow and no.reason == "path_not_allowed" and no.http_status == 403
    finally:
        await engine.close()


async def test_visible_tools_one_query() -> None:
    """query() returns the raw value of another rule, compiling its plan on first use."""
    engine = build_engine(PolicyConfig(dir=str(REPO_POLICIES)), reload_interval=0)
    await engine.start()
    try:
        inp = {"mcp": {"method": "tools/list"}, "server": {"name": "files"},
               "token": {"sub": "a", "roles": ["viewer"], "tenant": "acme", "scope": "tools:call:files/*"},
               "items": [{"name": "read_file"}, {"name": "write_file"}, "stat"]}
        assert await engine.query("mcp/authz/visible_tools", inp) == ["read_file", "stat"]
        with pytest.raises(PolicyError):
            await engine.query("not a path", inp)
    finally:
        await engine.close()


async def test_undefined_rule_query_is_none(simple: EmbeddedEngine) -> None:
    """A rule that is undefined for this input answers None."""
    write_dir = Path(simple.policy_dir)
    write(write_dir, "extra.rego", "package mcp.authz\nimport rego.v1\nmaybe := 1 if input.x == 1\n")
    assert await simple.reload_if_changed()
    assert await simple.query("mcp/authz/maybe", {"x": 2}) is None
    assert await simple.query("mcp/authz/maybe", {"x": 1}) == 1


@pytest.mark.parametrize("body", [
    'decision := "allow"',
    'decision := {"allow": "yes"}',
    'decision := {"reason": "x"}',
    'decision := 1',
    'decision := null',
    'decision := {"allow": false, "http_status": 200}',
    'x := 1',  # decision undefined
])
async def test_contract_violation_fails_closed(tmp_path: Path, body: str) -> None:
    """A decision outside the contract is a deny with error_code policy_contract_error."""
    write(tmp_path, "authz.rego", f"package mcp.authz\nimport rego.v1\n{body}\n")
    engine = EmbeddedEngine(tmp_path, "mcp/authz/decision", reload_interval=0)
    await engine.start()
    try:
        d = await engine.decide({})
        assert not d.allow
        assert d.error_code == "policy_contract_error" and d.reason == "policy_contract_error"
        assert d.http_status == 500
    finally:
        await engine.close()


async def test_runtime_error_fails_closed(tmp_path: Path) -> None:
    """A Rego runtime error (conflicting values of a complete rule) is a 503 policy_error deny."""
    write(tmp_path, "authz.rego", "package mcp.authz\nimport rego.v1\n"
          "decision := true if input.a\ndecision := false if input.b\n")
    engine = EmbeddedEngine(tmp_path, "mcp/authz/decision", reload_interval=0)
    await engine.start()
    try:
        assert (await engine.decide({"a": True})).allow
        d = await engine.decide({"a": True, "b": True})
        assert not d.allow and d.error_code == "policy_error" and d.http_status == 503
    finally:
        await engine.close()


async def test_non_json_input_fails_closed(simple: EmbeddedEngine) -> None:
    """An input the engine cannot pass on is a deny: a non-JSON type (the gateway's bug) is a
    policy_error, a request value past the engine's range a policy_input_invalid (400)."""
    assert (await simple.decide({"token": {"sub": {1, 2}}})).error_code == "policy_error"
    assert (await simple.decide({"token": {"sub": 2**70}})).error_code == "policy_input_invalid"


async def test_compile_error_at_start_names_file_and_line(tmp_path: Path) -> None:
    """A policy that does not compile stops start-up with file:line:col."""
    write(tmp_path, "authz.rego", "package mcp.authz\nimport rego.v1\ny := 1 if {\n  input.x ==\n}\n")
    engine = EmbeddedEngine(tmp_path, "mcp/authz/decision", reload_interval=0)
    with pytest.raises(PolicyCompileError, match=r"authz\.rego:4:\d+"):
        await engine.start()


async def test_reload_swaps_bundle(simple: EmbeddedEngine) -> None:
    """An edit is picked up by the change check and the new bundle decides."""
    assert (await simple.decide({"token": {"sub": "alice"}})).reason == "first"
    assert not await simple.reload_if_changed()
    write(Path(simple.policy_dir), "authz.rego", SIMPLE % "second_version")
    assert await simple.reload_if_changed()
    assert (await simple.decide({"token": {"sub": "alice"}})).reason == "second_version"


async def test_broken_edit_keeps_last_good_bundle(simple: EmbeddedEngine) -> None:
    """A broken edit is logged and the previous bundle keeps serving (neither open nor closed)."""
    rev = simple.revision
    write(Path(simple.policy_dir), "authz.rego", "package mcp.authz\nimport rego.v1\ndecision := {\n")
    assert not await simple.reload_if_changed()
    assert simple.last_error and "authz.rego" in simple.last_error
    assert simple.revision == rev
    assert (await simple.decide({"token": {"sub": "alice"}})).allow
    assert not (await simple.decide({"token": {"sub": "bob"}})).allow


async def test_edit_failing_policy_check_keeps_last_good_bundle(tmp_path: Path) -> None:
    """An edit rego-cpp compiles but `policy check` refuses (a misspelt rule name, `not
    sql_to_long`, which rego-cpp reads as always true) is refused at reload, naming file and
    line; the last good bundle keeps serving."""
    folder = tmp_path / "policies"
    shutil.copytree(REPO_POLICIES, folder)
    engine = EmbeddedEngine(folder, "mcp/authz/decision", reload_interval=0)
    await engine.start()
    try:
        rev = engine.revision
        rego = folder / "authz.rego"
        source = rego.read_text(encoding="utf-8")
        old = "\tsql_understood\n\tevery t in"
        assert old in source
        rego.write_text(source.replace(old, "\tsql_understood\n\tnot sql_to_long\n\tevery t in"),
                        encoding="utf-8")
        line = next(n for n, text in enumerate(rego.read_text().splitlines(), 1)
                    if "not sql_to_long" in text)
        assert not await engine.reload_if_changed()
        assert engine.last_error and f"authz.rego:{line}: var sql_to_long is unsafe" in engine.last_error
        assert engine.revision == rev
        assert (await engine.decide(tool_call("shared/a.txt"))).reason == "tool_allowed"
    finally:
        await engine.close()


async def test_watcher_task_reloads(tmp_path: Path) -> None:
    """The background watcher notices an edit without anyone asking (bounded poll)."""
    write(tmp_path, "authz.rego", SIMPLE % "first")
    engine = EmbeddedEngine(tmp_path, "mcp/authz/decision", reload_interval=0.02)
    await engine.start()
    try:
        write(tmp_path, "authz.rego", SIMPLE % "watched_edit")
        async with asyncio.timeout(10):
            while (await engine.decide({"token": {"sub": "alice"}})).reason != "watched_edit":
                await asyncio.sleep(0.02)
    finally:
        await engine.close()


async def test_data_json_is_placed_by_folder(tmp_path: Path) -> None:
    """data.json files load like an OPA bundle: a sub-folder names the data path."""
    (tmp_path / "cfg").mkdir()
    write(tmp_path / "cfg", "data.json", '{"allowed": ["alice"]}')
    write(tmp_path, "authz.rego", "package mcp.authz\nimport rego.v1\n"
          "default decision := false\ndecision := true if input.sub in data.cfg.allowed\n")
    engine = EmbeddedEngine(tmp_path, "mcp/authz/decision", reload_interval=0)
    await engine.start()
    try:
        assert (await engine.decide({"sub": "alice"})).allow
        assert not (await engine.decide({"sub": "bob"})).allow
    finally:
        await engine.close()


def test_build_engine_picks_backend(tmp_path: Path) -> None:
    """build_engine returns the configured backend and rejects unknown ones."""
    assert isinstance(build_engine(PolicyConfig(dir=str(tmp_path))), EmbeddedEngine)
    assert isinstance(build_engine(PolicyConfig(engine="opa", opa_url="http://127.0.0.1:8181")), OpaEngine)
    with pytest.raises(PolicyError):
        build_engine(PolicyConfig(engine="nope"))
    with pytest.raises(PolicyError):
        build_engine(PolicyConfig(engine="opa", opa_url="http://127.0.0.1:8181/v1/data"))


async def test_not_started_fails_closed(tmp_path: Path) -> None:
    """Deciding before start() is a deny, not a crash."""
    shutil.copy(REPO_POLICIES / "authz.rego", tmp_path / "authz.rego")
    engine = EmbeddedEngine(tmp_path, "mcp/authz/decision", reload_interval=0)
    assert (await engine.decide({})).error_code == "policy_error"


# rego-cpp 1.5.2 aborts the process (uncaught std::runtime_error) when it builds this.
CRASHING = """package mcp.authz
import rego.v1
x := {"a": 1}
decision := true if {
\ty := input.a with input as x
\ty == 1
}
"""


async def test_crashing_edit_keeps_old_bundle_and_logs(simple: EmbeddedEngine,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """An edit that crashes rego-cpp is caught in the checker child; the old bundle keeps serving."""
    rev = simple.revision
    write(Path(simple.policy_dir), "authz.rego", CRASHING)
    with caplog.at_level("ERROR", logger="gateway.policy.embedded"):
        assert not await simple.reload_if_changed()
    assert simple.last_error and "crashes rego-cpp" in simple.last_error
    assert any("policy reload failed" in r.getMessage() for r in caplog.records)
    assert simple.revision == rev
    assert (await simple.decide({"token": {"sub": "alice"}})).reason == "first"


async def test_crashing_policy_fails_start(tmp_path: Path) -> None:
    """Start-up refuses a policy that crashes the checker, with a clear error (the process lives)."""
    write(tmp_path, "authz.rego", CRASHING)
    engine = EmbeddedEngine(tmp_path, "mcp/authz/decision", reload_interval=0)
    with pytest.raises(PolicyCompileError, match="crashes rego-cpp"):
        await engine.start()


async def test_checker_timeout_is_a_compile_error(tmp_path: Path) -> None:
    """A checker that cannot finish in time counts as a failed check (fail closed)."""
    from gateway.policy.check import check_in_subprocess

    write(tmp_path, "authz.rego", SIMPLE % "first")
    with pytest.raises(PolicyCompileError, match="did not finish"):
        await check_in_subprocess(str(tmp_path), ["mcp/authz/decision"], limit_seconds=0.001)


def test_build_engine_passes_the_evaluation_bounds() -> None:
    """policy.eval_* reach the embedded engine's worker pool and deadline."""
    engine = build_engine(PolicyConfig(dir=str(REPO_POLICIES), eval_timeout_ms=77, eval_workers=3,
                                       eval_max_abandoned=5, eval_max_waiting=9), reload_interval=0)
    assert isinstance(engine, EmbeddedEngine)
    assert engine.eval_timeout == 0.077
    assert (engine.pool.workers, engine.pool.max_abandoned, engine.pool.max_waiting) == (3, 5, 9)


@pytest.mark.parametrize(("timeout_ms", "workers", "abandoned", "waiting"),
                         [(0, 1, 0, 0), (1, 0, 0, 0), (1, 1, -1, 0), (1, 1, 0, -1)])
def test_engine_refuses_unbounded_evaluation(timeout_ms: int, workers: int, abandoned: int,
                                             waiting: int) -> None:
    """An engine without a deadline or a worker is refused with a PolicyError."""
    with pytest.raises(PolicyError):
        EmbeddedEngine(REPO_POLICIES, "mcp/authz/decision", reload_interval=0,
                       eval_timeout_ms=timeout_ms, eval_workers=workers,
                       eval_max_abandoned=abandoned, eval_max_waiting=waiting)


@pytest.mark.parametrize("arguments", [
    {"tenant": "acme\x00globex"},
    {"table": "orders\x00"},
    {"tenant_id": 2**70},
])
async def test_a_value_the_engine_cannot_take_is_a_400_not_a_503(arguments: dict[str, Any]) -> None:
    """A NUL or a 65-bit integer in an argument the policy reads is the caller's fault: 400
    policy_input_invalid (no retry helps), still a deny."""
    engine = build_engine(PolicyConfig(dir=str(REPO_POLICIES)), reload_interval=0)
    await engine.start()
    try:
        doc = tool_call("shared/a.txt")
        doc["mcp"]["arguments"].update(arguments)
        decision = await engine.decide(doc)
        assert not decision.allow
        assert (decision.http_status, decision.error_code) == (400, "policy_input_invalid")
    finally:
        await engine.close()
