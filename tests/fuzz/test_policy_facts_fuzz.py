"""Property-based fuzzing of the policy-input facts (gateway/policy/facts.py, gateway/paths.py,
gateway/policy/sql.py): bounded, total, and in agreement with what the files server reads.

The atheris harness ``fuzz/fuzz_policy_facts.py`` checks the same properties for longer runs.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import GatewayError, InputLimitExceeded
from gateway.paths import MAX_PATH_CHARS, MAX_URI_CHARS, file_uri, file_uri_path
from gateway.policy.facts import MAX_PREFIX_DEPTH, PATH_ARGUMENT_NAMES, mcp_facts, path_facts
from gateway.policy.sql import sql_facts
from mcp_servers.files.sandbox import SandboxError, split_path
from tests.fuzz.strategies import ANY_JSON, FUZZ, FUZZ_SLOW

# Pieces an attacker spells paths and URIs with: separators, dots, escapes of each, overlong and
# invalid UTF-8, tenant names, a NUL, non-ASCII look-alikes.
_PATH_PIECES = ["/", "//", ".", "..", "...", "a", "tenants", "globex", "acme", "shared", "\\", "%", "%2e",
                "%2E", "%2f", "%2F", "%5c", "%5C", "%74", "%25", "%00", "%c0%ae", "%C3%A9", "%ff", "?", "#",
                "~", " ", "\u00e9", "e\u0301", "\u0435", "\uff0e", "\u2024", "\x00", "\t", ":"]
_paths = st.lists(st.sampled_from(_PATH_PIECES), max_size=24).map("".join) | st.text(max_size=40)
_uris = st.tuples(st.sampled_from(["file:///", "file://", "file:/", "FILE:///", "file:////", "db://schema/",
                                   "file://localhost/", ""]), _paths).map("".join)
_SQL_PIECES = ["select", " ", "*", "from", "orders", "employees", ",", "join", "(", ")", "'", '"', "`",
               "[", "]", ";", "--", "/*", "*/", "as", "where", "1", "=", "not indexed", "union",
               "sqlite_master", "fts3_tokenizer", "with", "x", "\x00", "\\", "pragma", "attach"]
_sqls = st.lists(st.sampled_from(_SQL_PIECES), max_size=40).map("".join) | st.text(max_size=60) | ANY_JSON


def _json_dict(value: Any) -> None:
    assert isinstance(value, dict)
    assert json.loads(json.dumps(value, allow_nan=False)) == value


@FUZZ
@given(st.dictionaries(st.sampled_from([*PATH_ARGUMENT_NAMES, "sql", "tenant", "x"]), _paths | ANY_JSON,
                       max_size=7), st.none() | _uris | ANY_JSON)
def test_mcp_facts_are_json_or_a_400(arguments: dict[str, Any], uri: Any) -> None:
    """Any arguments and resource URI: a JSON-encodable dict, or a 400 GatewayError naming why."""
    try:
        facts = mcp_facts({"arguments": arguments, "resource_uri": uri})
    except GatewayError as err:
        assert err.http_status == 400
        assert err.to_rpc_error()["data"]["reason"] in ("input_limit_exceeded", "invalid_path")
        return
    _json_dict(facts)


@FUZZ_SLOW
@given(_sqls)
def test_sql_facts_are_json_or_a_limit(sql: Any) -> None:
    """sql_facts of anything is a JSON-encodable dict or InputLimitExceeded, never another error."""
    try:
        facts = sql_facts(sql)
    except InputLimitExceeded as err:
        assert err.to_rpc_error()["data"]["limit"]
        return
    _json_dict(facts)


@FUZZ
@given(st.integers(1, 3 * MAX_PATH_CHARS), st.sampled_from(["a", "ab/", "/", "./", "a/" * 3, "\u00e9"]))
def test_path_facts_stay_linear(size: int, unit: str) -> None:
    """Facts of any path within the bounds are at most MAX_PREFIX_DEPTH + 1 times its size; over
    them, InputLimitExceeded (no facts built)."""
    path = (unit * (size // len(unit) + 1))[:size]
    try:
        facts = path_facts(path)
    except InputLimitExceeded:
        return
    assert len(json.dumps(facts)) <= (MAX_PREFIX_DEPTH + 1) * (len(json.dumps(path)) + 4) + 64


@FUZZ
@given(_paths)
def test_policy_and_sandbox_read_a_path_alike(path: str) -> None:
    """A path the facts call well formed is opened by the sandbox as exactly the segments the facts
    judged; a path the sandbox would open differently is never well formed."""
    try:
        facts = path_facts(path)
    except GatewayError:
        return
    try:
        parts = split_path(path)
    except SandboxError:
        return  # the server refuses it whatever the policy says
    if facts["well_formed"]:
        assert facts["prefixes"][-1] == "/".join(parts[:MAX_PREFIX_DEPTH])
        tenant = parts[1] if len(parts) > 1 else ""
        assert facts.get("tenant") == (tenant if parts and parts[0] == "tenants" else None)


@FUZZ
@given(_uris)
def test_a_uri_names_one_path_or_none(uri: str) -> None:
    """A URI names a path only in that path's one canonical spelling, and the resource facts
    judge exactly that path (the one the files server then opens)."""
    path = file_uri_path(uri)
    try:
        facts = mcp_facts({"resource_uri": uri})["resource"]
    except InputLimitExceeded:
        assert len(uri) > MAX_URI_CHARS or path is not None
        return
    if path is None:
        assert facts == {"well_formed": False}
        return
    assert file_uri(path) == uri
    assert facts == path_facts(path)
    assert "%" not in path and "\\" not in path and "\x00" not in path


def test_lone_surrogate_path_found_by_the_fuzzer() -> None:
    """fuzz_policy_facts crash-868aca43: a lone surrogate made the sandbox raise UnicodeEncodeError;
    now the facts and the sandbox both refuse it."""
    for path in ("tenants//g\uda67lots", "shared/\udcff", "\ud800"):
        assert path_facts(path) == {"well_formed": False}
        try:
            split_path(path)
        except SandboxError as err:
            assert err.code == "invalid_path"
        else:
            raise AssertionError(path)
