"""Facts about the request that the policy would otherwise derive with string built-ins.

rego-cpp charges tens of microseconds per built-in call and per function call, so splitting and
normalizing a file path in Rego costs more than the rest of an allowed decision together. The
gateway computes these facts once in Python and passes them as ``input.mcp.facts``; the policy
reads them with plain membership tests. They describe the request only (no roles, no tenant,
no settings), so every decision stays in Rego. ``policies/authz.rego`` computes the same facts
itself when an input has none (Rego unit tests, list filtering), and the tests check that it is
never more permissive. The shape is documented in ``policies/README.md`` ("Path facts").

Every value is checked against the gateway's bounds (``gateway.paths``) before any fact is built
from it, and the facts are linear in its size: whatever the request, building them costs little.
A resource URI is read with ``gateway.paths.file_uri_path``, the function the files server reads
it with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.errors import INVALID_PARAMS, GatewayError, InputLimitExceeded
from gateway.paths import MAX_PATH_CHARS, MAX_PATH_SEGMENTS, MAX_URI_CHARS, file_uri_path
from gateway.policy.sql import sql_facts

# Arguments holding a path, as ``path_argument_names`` in policies/authz.rego.
PATH_ARGUMENT_NAMES = ("path", "root", "directory", "source", "destination", "target")
# Every name can occur once in a JSON object; the bound holds should the list grow.
MAX_PATH_ARGUMENTS = len(PATH_ARGUMENT_NAMES)
# Prefixes are listed for the first MAX_PREFIX_DEPTH segments only: the policy tests them for
# membership in the prefixes of data.json, which are never deeper (a test checks it), so a
# deeper entry could never match, and the facts of a path stay linear in its length instead of
# quadratic (a 20 KB path used to make 100 MB of prefixes). As ``max_prefix_depth`` in the Rego.
MAX_PREFIX_DEPTH = 8
_MALFORMED: Mapping[str, Any] = {"well_formed": False}


def _over(limit: str, maximum: int, what: str) -> InputLimitExceeded:
    return InputLimitExceeded(f"{what} is over the gateway's limit of {maximum}",
                              data={"limit": limit, "max": maximum})


def path_facts(path: Any) -> dict[str, Any]:
    """The facts of one path relative to the files root.

    Raises :class:`InputLimitExceeded` for a string over ``MAX_PATH_CHARS`` characters or
    ``MAX_PATH_SEGMENTS`` segments, before any work that grows with it, and a 400 ``invalid_path``
    :class:`GatewayError` for a NUL. ``{"well_formed": False}`` for anything but a relative path
    without ``..`` segments, backslashes or lone surrogates; otherwise ``prefixes`` (``""`` and
    each leading run of up to ``MAX_PREFIX_DEPTH`` segments of the normalized path) and, for a
    path under ``tenants/``, ``tenant`` (its second segment, ``""`` when there is none).
    """
    if type(path) is not str:
        return dict(_MALFORMED)
    if len(path) > MAX_PATH_CHARS:
        raise _over("path_length", MAX_PATH_CHARS, "a path argument's length")
    if path.count("/") >= MAX_PATH_SEGMENTS:
        raise _over("path_depth", MAX_PATH_SEGMENTS, "a path argument's number of segments")
    if "\x00" in path:
        # The policy engine cannot take a NUL at all (it would fail closed as a 503 policy
        # error): the caller gets a clear 400 instead.
        raise GatewayError("a path argument holds a NUL character", code="invalid_path",
                           rpc_code=INVALID_PARAMS, http_status=400)
    if path.startswith("/") or "\\" in path:
        return dict(_MALFORMED)
    if not path.isascii():
        try:
            path.encode("utf-8")  # a lone surrogate names no file the server could open
        except UnicodeEncodeError:
            return dict(_MALFORMED)
    raw_parts = path.split("/")
    if ".." in raw_parts:
        return dict(_MALFORMED)
    parts = [p for p in raw_parts if p and p != "."]
    prefixes = [""]
    for part in parts[:MAX_PREFIX_DEPTH]:
        prefixes.append(f"{prefixes[-1]}/{part}" if len(prefixes) > 1 else part)
    facts: dict[str, Any] = {"well_formed": True, "prefixes": prefixes}
    if parts and parts[0] == "tenants":
        facts["tenant"] = parts[1] if len(parts) > 1 else ""
    return facts


def resource_facts(uri: Any) -> dict[str, Any]:
    """The facts of the path a resource URI names; malformed unless it is a canonical ``file:``
    URI (``gateway.paths.file_uri_path``, the same function the files server reads it with)."""
    if type(uri) is not str:
        return dict(_MALFORMED)
    if len(uri) > MAX_URI_CHARS:
        raise _over("resource_uri_length", MAX_URI_CHARS, "the resource URI's length")
    path = file_uri_path(uri)
    if path is None:
        return dict(_MALFORMED)
    return path_facts(path)


def mcp_facts(mcp: Mapping[str, Any]) -> dict[str, Any]:
    """The facts of one MCP message (``input.mcp``); empty when there is nothing to say.

    ``arguments``: the facts of each path argument, in argument order (non-string values
    included, as malformed). ``resource``: the facts of ``resource_uri``. Raises
    :class:`InputLimitExceeded` when an argument or the URI is over a bound.
    """
    facts: dict[str, Any] = {}
    arguments = mcp.get("arguments")
    if type(arguments) is dict:
        names = [k for k in arguments if k in PATH_ARGUMENT_NAMES]
        if len(names) > MAX_PATH_ARGUMENTS:
            raise _over("path_arguments", MAX_PATH_ARGUMENTS, "the number of path arguments")
        if names:
            facts["arguments"] = [path_facts(arguments[k]) for k in names]
        if "sql" in arguments:
            sql = sql_facts(arguments["sql"])
            if sql:
                facts["sql"] = sql
    uri = mcp.get("resource_uri")
    if uri is not None:
        facts["resource"] = resource_facts(uri)
    return facts


def with_facts(mcp: dict[str, Any]) -> dict[str, Any]:
    """``mcp`` (a fresh dict the caller owns) with its facts added under ``facts``."""
    facts = mcp_facts(mcp)
    if facts:
        mcp["facts"] = facts
    return mcp
