"""The exact decision cache of the embedded engine: what hits, what never does, and when it is off."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import DEFAULT_CONFIG_PATH, ConfigError, PolicyConfig, parse_config
from gateway.policy import PolicyEvalError
from gateway.policy.cache import input_key
from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.factory import build_engine
from gateway.policy.rego import CompiledPolicy, load_sources

POLICIES = Path(__file__).resolve().parents[3] / "policies"
DECISION = "mcp/authz/decision"
VISIBLE_TOOLS = "mcp/authz/visible_tools"


def compiled(cache_size: int, folder: Path = POLICIES) -> CompiledPolicy:
    return CompiledPolicy(load_sources(folder, include_tests=False), [DECISION, VISIBLE_TOOLS],
                          cache_size=cache_size)


def tool_call(path: str = "shared/a.txt", roles: tuple[str, ...] = ("viewer",),
              **extra_args: Any) -> dict[str, Any]:
    """A gateway-shaped input, with fields the policy never reads."""
    return {
        "attributes": {"request": {"http": {"method": "POST", "id": "req-1",
                                            "headers": {"user-agent": "a", "x-request-id": "req-1"}}}},
        "parsed_body": {"jsonrpc": "2.0", "id": 1, "method": "tools/call"},
        "mcp": {"kind": "request", "method": "tools/call", "tool": "read_file", "id": 1,
                "arguments": {"path": path, **extra_args}},
        "token": {"sub": "alice", "roles": list(roles), "scope": "tools:call:files/*",
                  "tenant": "acme", "jti": "j1", "iat": 1},
        "server": {"name": "files", "resource": "https://gw/mcp/files"},
        "now": 1700000000,
    }


def write_policy(folder: Path, body: str) -> None:
    (folder / "authz.rego").write_text("package mcp.authz\nimport rego.v1\n" + body, encoding="utf-8")


def test_a_hit_returns_the_fresh_decision() -> None:
    """The second evaluation of an input is a hit with the value a fresh evaluation gives."""
    cached, fresh = compiled(100), compiled(0)
    assert cached.cache is not None and fresh.cache is None
    for inp in (tool_call(), tool_call("secret/a"), tool_call("tenants/globex/a", ("admin",))):
        first = cached.evaluate(DECISION, inp)
        second = cached.evaluate(DECISION, inp)
        assert first == second == fresh.evaluate(DECISION, inp)
    assert cached.cache.hits == 3 and cached.cache.misses == 3


def test_a_hit_cannot_be_changed_by_its_caller() -> None:
    """Each hit is a fresh value: mutating one leaves the next unchanged."""
    policy = compiled(100)
    _, first = policy.evaluate(DECISION, tool_call())
    first["obligations"]["mask_pii"].append("changed")
    first["allow"] = False
    _, second = policy.evaluate(DECISION, tool_call())
    assert second["allow"] is True and "changed" not in second["obligations"]["mask_pii"]
    assert policy.cache is not None and policy.cache.hits == 1


def test_fields_the_policy_does_not_read_share_an_entry() -> None:
    """Headers, ids, time, unread claims and unread arguments (a 1 KB text) are pruned: hits."""
    policy = compiled(100)
    policy.evaluate(DECISION, tool_call())
    other = tool_call(text="x" * 1024)
    other["attributes"]["request"]["http"]["headers"]["x-request-id"] = "req-2"
    other["token"]["jti"] = "j2"
    other["now"] = 1800000000
    other["parsed_body"]["id"] = 2
    assert policy.evaluate(DECISION, other) == policy.evaluate(DECISION, tool_call())
    assert policy.cache is not None and policy.cache.hits == 2 and len(policy.cache) == 1


def test_key_order_does_not_matter() -> None:
    """Two inputs that differ only in object key order are one entry."""
    policy = compiled(100)
    inp = tool_call()
    reordered = {k: inp[k] for k in reversed(list(inp))}
    reordered["token"] = dict(reversed(list(inp["token"].items())))
    policy.evaluate(DECISION, inp)
    policy.evaluate(DECISION, reordered)
    assert policy.cache is not None and policy.cache.hits == 1


def test_a_referenced_field_makes_a_new_entry() -> None:
    """A different path, role or tenant argument is evaluated afresh, with its own decision."""
    policy = compiled(100)
    assert policy.evaluate(DECISION, tool_call())[1]["allow"] is True
    assert policy.evaluate(DECISION, tool_call("secret/a"))[1]["reason"] == "path_not_allowed"
    assert policy.evaluate(DECISION, tool_call(roles=("intern",)))[1]["allow"] is False
    assert policy.evaluate(DECISION, tool_call(tenant="globex"))[1]["reason"] == "tenant_mismatch"
    assert policy.cache is not None and policy.cache.hits == 0 and len(policy.cache) == 4


def test_distinct_json_values_have_distinct_keys() -> None:
    """1, 1.0 and true differ; values the engine refuses (NaN, datetime, str subclass) get no key."""
    keys = {input_key({"a": v}) for v in (1, 1.0, True, "1", [1], None)}
    assert None not in keys and len(keys) == 6

    class Name(str):
        pass

    for bad in (float("nan"), float("inf"), datetime.date(2024, 1, 1), Name("x"), 2**64, {1: "a"}):
        assert input_key({"a": [bad]}) is None


def test_nan_never_hits_the_entry_of_null() -> None:
    """orjson writes NaN as null; the cache must not answer an input the engine refuses."""
    from gateway.policy import PolicyInputError

    policy = compiled(100)
    inp = tool_call()
    inp["mcp"]["resource_uri"] = None
    policy.evaluate(DECISION, inp)
    inp["mcp"]["resource_uri"] = float("nan")
    with pytest.raises(PolicyInputError):
        policy.evaluate(DECISION, inp)


def test_list_filters_are_cached() -> None:
    """visible_tools goes through the same cache."""
    policy = compiled(100)
    inp = {"mcp": {"method": "tools/list"}, "server": {"name": "files"}, "kind": "tools",
           "token": {"sub": "a", "roles": ["engineer"], "tenant": "acme", "scope": "tools:call:files/*"},
           "items": ["read_file", "write_file", "delete"]}
    first = policy.evaluate(VISIBLE_TOOLS, inp)
    assert policy.evaluate(VISIBLE_TOOLS, inp) == first
    assert policy.cache is not None and policy.cache.hits == 1


def test_errors_are_not_cached(tmp_path: Path) -> None:
    """A Rego runtime error is raised on every evaluation and never stored."""
    write_policy(tmp_path, "decision := 1 if input.x\ndecision := 2 if input.x\n")
    policy = CompiledPolicy(load_sources(tmp_path), [DECISION], cache_size=100)
    assert policy.cache is not None
    for _ in range(2):
        with pytest.raises(PolicyEvalError):
            policy.evaluate(DECISION, {"x": True})
    assert len(policy.cache) == 0 and policy.cache.hits == 0
    assert policy.evaluate(DECISION, {"x": False}) == (False, None)  # undefined is a result
    assert len(policy.cache) == 1


def test_the_lru_bound_holds() -> None:
    """At most cache_size entries; the least recently used goes first."""
    policy = compiled(2)
    cache = policy.cache
    assert cache is not None
    policy.evaluate(DECISION, tool_call("shared/1"))
    policy.evaluate(DECISION, tool_call("shared/2"))
    policy.evaluate(DECISION, tool_call("shared/1"))  # hit: shared/1 is now the most recent
    policy.evaluate(DECISION, tool_call("shared/3"))  # evicts shared/2
    assert len(cache) == 2 and cache.hits == 1
    policy.evaluate(DECISION, tool_call("shared/1"))
    assert cache.hits == 2
    policy.evaluate(DECISION, tool_call("shared/2"))
    assert cache.hits == 2 and len(cache) == 2


async def test_size_zero_turns_the_cache_off() -> None:
    """decision_cache_size 0: no cache, every decision evaluated."""
    assert compiled(0).cache is None
    engine = build_engine(PolicyConfig(dir=str(POLICIES), decision_cache_size=0), reload_interval=0)
    await engine.start()
    try:
        assert isinstance(engine, EmbeddedEngine) and engine.decision_cache is None
        assert (await engine.decide(tool_call())).allow
    finally:
        await engine.close()


async def test_build_engine_passes_the_configured_size() -> None:
    """The configured size reaches the serving bundle's cache; decisions then hit."""
    engine = build_engine(PolicyConfig(dir=str(POLICIES), decision_cache_size=7), reload_interval=0)
    await engine.start()
    try:
        assert isinstance(engine, EmbeddedEngine)
        cache = engine.decision_cache
        assert cache is not None and cache.max_entries == 7
        assert (await engine.decide(tool_call())).allow
        assert (await engine.decide(tool_call())).allow
        assert cache.hits == 1
    finally:
        await engine.close()


async def test_a_new_bundle_never_serves_an_old_decision(tmp_path: Path) -> None:
    """After a reload to a denying policy, the input that hit before is denied."""
    write_policy(tmp_path, 'default decision := false\ndecision := true if input.token.sub == "alice"\n')
    engine = EmbeddedEngine(tmp_path, DECISION, reload_interval=0, cache_size=100)
    await engine.start()
    try:
        inp = {"token": {"sub": "alice"}}
        assert (await engine.decide(inp)).allow
        assert (await engine.decide(inp)).allow
        old = engine.decision_cache
        assert old is not None and old.hits == 1
        write_policy(tmp_path, "default decision := false\n# now everyone is refused\n")
        assert await engine.reload_if_changed()
        assert not (await engine.decide(inp)).allow
        assert engine.decision_cache is not old
    finally:
        await engine.close()


@pytest.mark.parametrize("call", ["time.now_ns()", "rand.intn(\"k\", 10)", "uuid.rfc4122(\"k\")",
                                  "opa.runtime()", "io.jwt.decode_verify(input.t, {})"])
def test_nondeterministic_builtins_turn_the_cache_off(tmp_path: Path, call: str) -> None:
    """A policy whose result can change without its input or data changing gets no cache."""
    write_policy(tmp_path, f"decision := true if {{\n\tx := {call}\n\tx != null\n}}\n")
    policy = CompiledPolicy(load_sources(tmp_path), [DECISION], cache_size=100)
    assert policy.cache is None and policy.cache_disabled_by == (call.split("(")[0],)


@pytest.mark.parametrize("call", ["time. now_ns()", "time\n\t\t.now_ns()", "uuid .rfc4122(\"k\")"])
def test_blanks_around_the_dot_do_not_hide_a_nondeterministic_builtin(tmp_path: Path, call: str) -> None:
    """Rego reads "time . now_ns()" as time.now_ns(): the cache must turn off for it too."""
    write_policy(tmp_path, f"decision := true if {{\n\tx := {call}\n\tx != null\n}}\n")
    policy = CompiledPolicy(load_sources(tmp_path), [DECISION], cache_size=100)
    assert policy.cache is None and len(policy.cache_disabled_by) == 1


def test_builtin_names_in_comments_and_strings_keep_the_cache(tmp_path: Path) -> None:
    """Only code counts: a comment or string naming time.now_ns does not turn the cache off."""
    write_policy(tmp_path, '# not time.now_ns()\ndecision := {"allow": true, "reason": "time.now_ns"}\n'
                 "now_ns := input.now\nmy.time.now_ns := 1\n")
    assert CompiledPolicy(load_sources(tmp_path), [DECISION], cache_size=100).cache is not None


async def test_engine_logs_why_the_cache_is_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The engine says once which built-ins turned the cache off; decisions still work."""
    write_policy(tmp_path, "decision := true if time.now_ns() > 0\n")
    engine = EmbeddedEngine(tmp_path, DECISION, reload_interval=0, cache_size=100)
    with caplog.at_level(logging.WARNING, logger="gateway.policy.embedded"):
        await engine.start()
    try:
        assert engine.decision_cache is None
        assert [r.getMessage() for r in caplog.records if "time.now_ns" in r.getMessage()]
        assert (await engine.decide({})).allow
    finally:
        await engine.close()


@pytest.mark.parametrize("bad", [-1, "100", True, 1.5, None, 1_000_001])
def test_config_rejects_a_bad_cache_size(bad: Any) -> None:
    """policy.decision_cache_size must be an integer 0-1000000; the error names the key."""
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["policy"] = {**raw["policy"], "decision_cache_size": bad}
    with pytest.raises(ConfigError, match="policy.decision_cache_size"):
        parse_config(raw, base_dir=Path.cwd())


def test_config_reads_the_cache_size() -> None:
    """The default is 10000; 0 is accepted (off)."""
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    assert parse_config(raw, base_dir=Path.cwd()).policy.decision_cache_size == 10000
    raw["policy"] = {**raw["policy"], "decision_cache_size": 0}
    assert parse_config(raw, base_dir=Path.cwd()).policy.decision_cache_size == 0
