"""Facts about the request that the policy would otherwise derive with string built-ins.

rego-cpp charges tens of microseconds per built-in call and per function call, so splitting and
normalizing a file path in Rego costs more than the rest of an allowed decision together. The
gateway computes these facts once in Python and passes them as ``input.mcp.facts``; the policy
reads them with plain membership tests. They describe the request only (no roles, no tenant,
no settings), so every decision stays in Rego. ``policies/authz.rego`` computes the same facts
itself when an input has none (Rego unit tests, list filtering), and the tests check that both
give identical decisions. The shape is documented in ``policies/README.md`` ("Path facts").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gateway.policy.sql import sql_facts

# Arguments holding a path, as ``path_argument_names`` in policies/authz.rego.
PATH_ARGUMENT_NAMES = ("path", "root", "directory", "source", "destination", "target")
# The scheme and "//" of a URI, as ``uri_path`` in policies/authz.rego (RE2 and re agree on
# this ASCII-only pattern).
_URI_SCHEME_RE = re.compile(r"[a-z][a-z0-9+.-]*://")
# A URI that does not match names "/": an absolute path, which is never well formed.
_MALFORMED_URI_PATH = "/"
_MALFORMED: Mapping[str, Any] = {"well_formed": False}


def path_facts(path: Any) -> dict[str, Any]:
    """The facts of one path relative to the files root.

    ``{"well_formed": False}`` for anything but a relative path without ``..`` segments or
    backslashes; otherwise ``prefixes`` (``""`` and each leading run of segments of the
    normalized path) and, for a path under ``tenants/``, ``tenant`` (its second segment, ``""``
    when there is none).
    """
    if type(path) is not str or path.startswith("/") or "\\" in path:
        return dict(_MALFORMED)
    raw_parts = path.split("/")
    if ".." in raw_parts:
        return dict(_MALFORMED)
    parts = [p for p in raw_parts if p and p != "."]
    facts: dict[str, Any] = {
        "well_formed": True,
        "prefixes": ["/".join(parts[:i]) for i in range(len(parts) + 1)],
    }
    if parts and parts[0] == "tenants":
        facts["tenant"] = parts[1] if len(parts) > 1 else ""
    return facts


def uri_path(uri: Any) -> str:
    """``file:///shared/a.txt`` -> ``shared/a.txt``; anything without a scheme -> ``/``."""
    if type(uri) is not str:
        return _MALFORMED_URI_PATH
    match = _URI_SCHEME_RE.match(uri)
    if match is None:
        return _MALFORMED_URI_PATH
    return uri[match.end():].lstrip("/")


def mcp_facts(mcp: Mapping[str, Any]) -> dict[str, Any]:
    """The facts of one MCP message (``input.mcp``); empty when there is nothing to say.

    ``arguments``: the facts of each path argument, in argument order (non-string values
    included, as malformed). ``resource``: the facts of the path of ``resource_uri``.
    """
    facts: dict[str, Any] = {}
    arguments = mcp.get("arguments")
    if type(arguments) is dict:
        found = [path_facts(arguments[k]) for k in arguments if k in PATH_ARGUMENT_NAMES]
        if found:
            facts["arguments"] = found
        if "sql" in arguments:
            sql = sql_facts(arguments["sql"])
            if sql:
                facts["sql"] = sql
    uri = mcp.get("resource_uri")
    if uri is not None:
        facts["resource"] = path_facts(uri_path(uri))
    return facts


def with_facts(mcp: dict[str, Any]) -> dict[str, Any]:
    """``mcp`` (a fresh dict the caller owns) with its facts added under ``facts``."""
    facts = mcp_facts(mcp)
    if facts:
        mcp["facts"] = facts
    return mcp
