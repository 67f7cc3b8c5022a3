"""Property-based fuzzing of the MCP context extraction and SEP-2243 header checks (gateway/mcp.py)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.errors import GatewayError, HeaderMismatch, InvalidRequest
from gateway.jsonrpc import Message, validate_message
from gateway.mcp import META_PROTOCOL_VERSION, NAME_PARAM, PROTOCOL_VERSIONS, extract_context
from tests.fuzz.strategies import ANY_JSON, FUZZ

_METHODS = st.sampled_from([*NAME_PARAM, "initialize", "tools/list", "server/discover", "ping"]) \
    | st.text(min_size=1, max_size=12)
_VERSIONS = st.sampled_from([*PROTOCOL_VERSIONS, "2025-03-26", "", "9999-99-99", "garbage"]) \
    | st.text(max_size=12)
_HEADER_NAMES = st.sampled_from(["mcp-method", "mcp-name", "mcp-protocol-version", "mcp-session-id",
                                 "authorization", "x-mcp-user"]) | st.text(min_size=1, max_size=10)
_headers = st.dictionaries(_HEADER_NAMES, st.text(max_size=20), max_size=5)


@st.composite
def params(draw: st.DrawFn) -> dict[str, Any]:
    """Params whose well-known members (name, uri, arguments, _meta) take any JSON type."""
    out: dict[str, Any] = draw(st.dictionaries(st.text(max_size=6), ANY_JSON, max_size=2))
    for key in ("name", "uri", "arguments", "_meta", "protocolVersion"):
        if draw(st.booleans()):
            out[key] = draw(ANY_JSON | _VERSIONS.map(lambda v: {META_PROTOCOL_VERSION: v}))
    return out


@st.composite
def requests(draw: st.DrawFn) -> Message:
    raw: dict[str, Any] = {"jsonrpc": "2.0", "method": draw(_METHODS)}
    if draw(st.booleans()):
        raw["id"] = draw(st.integers(0, 1000) | st.text(max_size=5))
    if draw(st.booleans()):
        raw["params"] = draw(params())
    return validate_message(raw)


def _spell(name: str, upper: list[bool]) -> str:
    return "".join(c.upper() if u else c for c, u in zip(name, upper + [False] * len(name), strict=False))


@FUZZ
@given(requests(), _headers)
def test_random_params_and_headers_raise_only_gateway_errors(msg: Message, headers: dict[str, str]) -> None:
    """Any params and headers give an McpContext or a GatewayError, never another exception."""
    try:
        ctx = extract_context(msg, headers)
    except GatewayError:
        return
    assert ctx.method == msg.method
    assert isinstance(ctx.arguments, dict)
    assert ctx.name is None or isinstance(ctx.name, str)


@FUZZ
@given(requests(), st.text(max_size=20), _VERSIONS, st.lists(st.booleans(), max_size=10))
def test_mcp_method_mismatch_always_rejected(msg: Message, header: str, version: str,
                                             upper: list[bool]) -> None:
    """An Mcp-Method header that differs from the body method is refused, whatever the version or case.

    Ill-typed params may be refused first (InvalidRequest); either way the request never passes.
    """
    assume(header != msg.method)
    headers = CIMultiDict({_spell("mcp-method", upper): header, "mcp-protocol-version": version})
    with pytest.raises((HeaderMismatch, InvalidRequest)) as info:
        extract_context(msg, headers)
    assert info.value.http_status == 400


@FUZZ
@given(st.sampled_from(sorted(NAME_PARAM)), st.text(max_size=20), st.text(max_size=20) | st.none(),
       _VERSIONS, st.lists(st.booleans(), max_size=8))
def test_mcp_name_mismatch_always_rejected(method: str, header: str, name: str | None, version: str,
                                           upper: list[bool]) -> None:
    """An Mcp-Name header that differs from the body's name/uri (or names nothing) is refused."""
    assume(header != name)
    params: dict[str, Any] = {} if name is None else {NAME_PARAM[method]: name}
    msg = validate_message({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    headers = CIMultiDict({"mcp-method": method, _spell("mcp-name", upper): header,
                           "mcp-protocol-version": version})
    with pytest.raises(HeaderMismatch):
        extract_context(msg, headers)


@FUZZ
@given(st.sampled_from(sorted(NAME_PARAM)), st.text(max_size=20), st.sampled_from(["mcp-method", "mcp-name"]))
def test_modern_protocol_requires_both_headers(method: str, name: str, missing: str) -> None:
    """From 2026-07-28 on, leaving out Mcp-Method or Mcp-Name (for a named method) is refused."""
    msg = validate_message({"jsonrpc": "2.0", "id": 1, "method": method,
                            "params": {NAME_PARAM[method]: name}})
    headers = {"mcp-method": method, "mcp-name": name, "mcp-protocol-version": "2026-07-28"}
    del headers[missing]
    with pytest.raises(HeaderMismatch):
        extract_context(msg, headers)


@FUZZ
@given(st.sampled_from(sorted(NAME_PARAM)), st.text(max_size=20), _VERSIONS)
def test_matching_headers_accepted(method: str, name: str, version: str) -> None:
    """Headers that repeat the body's method and name are accepted and the name is extracted."""
    msg = validate_message({"jsonrpc": "2.0", "id": 1, "method": method,
                            "params": {NAME_PARAM[method]: name}})
    ctx = extract_context(msg, {"mcp-method": method, "mcp-name": name, "mcp-protocol-version": version})
    assert ctx.name == name
