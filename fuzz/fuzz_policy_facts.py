"""atheris harness: the policy-input facts (gateway.policy.facts, gateway.paths, gateway.policy.sql).

The fuzzer's bytes become a path argument, a resource URI and an SQL text, each either free text
or assembled from the pieces attackers spell paths with (``dicts/policy_facts.dict`` adds more).
Checks, as ``tests/fuzz/test_policy_facts_fuzz.py``: ``mcp_facts`` returns a JSON-encodable dict
or raises a 400 GatewayError (a bound, or a NUL in a path); ``sql_facts`` returns a JSON-encodable
dict or raises InputLimitExceeded; facts stay linear in the path; a URI names a path only in its
canonical spelling and the facts judge that path; a path the facts call well formed is the one the
files sandbox opens. Run: ``python fuzz/fuzz_policy_facts.py -max_total_time=60``.
"""

from __future__ import annotations

import json
from typing import Any

import _common
import atheris  # type: ignore[import-untyped]  # atheris ships no type information

with atheris.instrument_imports():
    from gateway.errors import GatewayError, InputLimitExceeded
    from gateway.paths import file_uri, file_uri_path
    from gateway.policy.facts import MAX_PREFIX_DEPTH, PATH_ARGUMENT_NAMES, mcp_facts, path_facts
    from gateway.policy.sql import sql_facts
    from mcp_servers.files.sandbox import SandboxError, split_path

_PIECES = ["/", ".", "..", "a", "tenants", "globex", "shared", "\\", "%", "%2e", "%2F", "%5C", "%74", "%25",
           "%00", "%c0%ae", "%C3%A9", "%ff", "?", "#", " ", "\u00e9", "e\u0301", "\uff0e", "\x00"]
_PREFIXES = ["file:///", "file://", "file:/", "FILE:///", "file:////", "db://schema/", ""]


def _text(fdp: atheris.FuzzedDataProvider) -> str:
    if fdp.ConsumeBool():
        return str(fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 64)))
    return "".join(fdp.PickValueInList(_PIECES) for _ in range(fdp.ConsumeIntInRange(0, 32)))


def _json(value: Any) -> None:
    if not isinstance(value, dict) or json.loads(json.dumps(value, allow_nan=False)) != value:
        raise AssertionError(f"not a JSON object: {value!r}")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    path = _text(fdp)
    uri = fdp.PickValueInList(_PREFIXES) + _text(fdp)
    sql = _text(fdp) if fdp.ConsumeBool() else str(fdp.ConsumeUnicode(128))
    name = fdp.PickValueInList(list(PATH_ARGUMENT_NAMES))
    try:
        facts = mcp_facts({"arguments": {name: path, "sql": sql}, "resource_uri": uri})
    except GatewayError as err:
        if err.http_status != 400:
            raise
    else:
        _json(facts)
    try:
        _json(sql_facts(sql))
    except InputLimitExceeded:
        pass
    try:
        one = path_facts(path)
    except GatewayError:
        return
    if len(json.dumps(one)) > (MAX_PREFIX_DEPTH + 1) * (len(json.dumps(path)) + 4) + 64:
        raise AssertionError(f"facts not linear in {path!r}")
    try:
        parts = split_path(path)
    except SandboxError:
        parts = None
    if one["well_formed"] and parts is not None and one["prefixes"][-1] != "/".join(parts[:MAX_PREFIX_DEPTH]):
        raise AssertionError(f"policy and sandbox read {path!r} differently")
    decoded = file_uri_path(uri)
    if decoded is not None and file_uri(decoded) != uri:
        raise AssertionError(f"{uri!r} is not the canonical spelling of {decoded!r}")


if __name__ == "__main__":
    _common.run("policy_facts", test_one_input)
