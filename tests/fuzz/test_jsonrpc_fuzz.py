"""Property-based fuzzing of the strict JSON-RPC parser (gateway/jsonrpc.py)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import GatewayError, InvalidRequest, ParseError
from gateway.jsonrpc import DEFAULT_MAX_DEPTH, MAX_SAFE_INT, loads_strict, parse_message
from tests.fuzz.reference import reference
from tests.fuzz.strategies import FUZZ, FUZZ_SLOW, json_ish_bytes, json_values, key_literal


def _check_against_reference(body: bytes) -> None:
    ok, expected = reference(body)
    if ok:
        got = loads_strict(body)
        # Top-level scalars come straight from orjson (big integers become floats there); the
        # message validator refuses them anyway, so only containers are compared by value.
        if isinstance(expected, (dict, list)):
            assert got == expected
    else:
        with pytest.raises(ParseError):
            loads_strict(body)


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_gateway_errors(body: bytes) -> None:
    """Any byte string either parses to a Message or raises a GatewayError, nothing else."""
    try:
        parse_message(body)
    except GatewayError:
        pass


@FUZZ
@given(json_ish_bytes)
def test_json_like_bytes_raise_only_gateway_errors(body: bytes) -> None:
    """JSON-shaped bytes (escapes, surrogates, huge numbers, BOMs, deep nesting) raise only GatewayError."""
    try:
        parse_message(body)
    except GatewayError:
        pass


@FUZZ
@given(st.binary(max_size=256) | json_ish_bytes)
def test_parser_agrees_with_reference(body: bytes) -> None:
    """The strict parser accepts exactly what a stdlib reference with duplicate detection accepts."""
    _check_against_reference(body)


@FUZZ
@given(json_values(), st.booleans(), st.sampled_from([None, 0, 2]))
def test_encoded_values_agree_with_reference(value: Any, ascii_only: bool, indent: int | None) -> None:
    """Valid JSON in any encoder spelling parses to the same value the reference produces."""
    body = json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode("utf-8")
    _check_against_reference(body)


@FUZZ
@given(st.integers(min_value=1, max_value=2000), st.sampled_from(["[", '{"a":']))
def test_nesting_limit_is_exact_and_never_recursion_error(depth: int, opener: str) -> None:
    """Nesting up to the limit parses; one level more is a ParseError (never RecursionError)."""
    closer = "]" if opener == "[" else "}"
    body = (opener * depth + "1" + closer * depth).encode()
    if depth <= DEFAULT_MAX_DEPTH:
        loads_strict(body)
    else:
        with pytest.raises(ParseError):
            loads_strict(body)


def _serialize(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


@st.composite
def documents_with_duplicate(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(a document with one duplicated key at a random depth, the same document without it)."""
    obj = draw(st.dictionaries(st.text(max_size=6), json_values(max_leaves=3), min_size=1, max_size=3))
    keys = list(obj)
    dup_key = draw(st.sampled_from(keys))
    dup_value = draw(json_values(max_leaves=2))
    escaped = draw(st.booleans())
    members = [f"{key_literal(k, False)}:{_serialize(v)}" for k, v in obj.items()]
    extra = f"{key_literal(dup_key, escaped)}:{_serialize(dup_value)}"
    at = draw(st.integers(min_value=0, max_value=len(members)))
    clean = "{" + ",".join(members) + "}"
    dirty = "{" + ",".join([*members[:at], extra, *members[at:]]) + "}"
    # Wrap in up to 40 levels of arrays / objects (with siblings) so the duplicate sits deep.
    for kind in draw(st.lists(st.sampled_from(["list", "dict", "sibling"]), max_size=40)):
        if kind == "list":
            clean, dirty = f"[{clean}]", f"[{dirty}]"
        elif kind == "dict":
            clean, dirty = f'{{"w":{clean}}}', f'{{"w":{dirty}}}'
        else:
            clean, dirty = f'[1,{clean},"x"]', f'[1,{dirty},"x"]'
    return dirty.encode("utf-8"), clean.encode("utf-8")


@FUZZ_SLOW
@given(documents_with_duplicate())
def test_duplicate_keys_rejected_at_any_depth(docs: tuple[bytes, bytes]) -> None:
    """A duplicated key (even spelled with \\u escapes) at any depth is a ParseError."""
    dirty, clean = docs
    loads_strict(clean)  # the document is otherwise acceptable
    with pytest.raises(ParseError) as info:
        loads_strict(dirty)
    assert info.value.code == "parse_error"


_ids = st.text(max_size=20) | st.integers(min_value=-MAX_SAFE_INT, max_value=MAX_SAFE_INT)
_params = st.dictionaries(st.text(max_size=8), json_values(max_leaves=8), max_size=5)
_methods = st.sampled_from(["initialize", "tools/list", "tools/call", "resources/read", "prompts/get",
                            "notifications/initialized", "server/discover"]) \
    | st.text(min_size=1, max_size=20)


@st.composite
def messages(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A valid JSON-RPC message and its kind."""
    kind = draw(st.sampled_from(["request", "notification", "response", "error"]))
    msg: dict[str, Any] = {"jsonrpc": "2.0"}
    if kind in ("request", "notification"):
        msg["method"] = draw(_methods)
        if draw(st.booleans()):
            msg["params"] = draw(_params)
        if kind == "request":
            msg["id"] = draw(_ids)
        return msg, kind
    msg["id"] = draw(_ids)
    if kind == "response":
        msg["result"] = draw(json_values(max_leaves=8))
    else:
        err: dict[str, Any] = {"code": draw(st.integers(-(2**31), 2**31)),
                               "message": draw(st.text(max_size=20))}
        if draw(st.booleans()):
            err["data"] = draw(json_values(max_leaves=5))
        msg["error"] = err
    return msg, "response"


@FUZZ
@given(messages(), st.sampled_from(["orjson", "ascii", "utf8"]))
def test_valid_messages_round_trip(case: tuple[dict[str, Any], str], encoding: str) -> None:
    """Every valid message, however encoded, parses back to the same value and kind."""
    msg, kind = case
    if encoding == "orjson":
        body = orjson.dumps(msg)
    else:
        body = json.dumps(msg, ensure_ascii=encoding == "ascii").encode("utf-8")
    parsed = parse_message(body)
    assert parsed.raw == msg
    assert parsed.kind == kind
    assert parsed.id == msg.get("id")
    assert parsed.method == msg.get("method")


@FUZZ_SLOW
@given(messages(), st.sampled_from(["method", "id", "jsonrpc", "params"]), json_values(max_leaves=3))
def test_mutated_messages_raise_only_gateway_errors(case: tuple[dict[str, Any], str], field: str,
                                                   value: Any) -> None:
    """Replacing a member of a valid message by any JSON value gives a Message or InvalidRequest."""
    msg = {**case[0], field: value}
    try:
        parse_message(orjson.dumps(msg))
    except InvalidRequest:
        pass


@FUZZ
@given(st.integers(min_value=2**64, max_value=10**300)
       | st.integers(min_value=-(10**300), max_value=-(2**63) - 1))
def test_accepted_values_reencode_with_orjson(number: int) -> None:
    """Integers orjson (the gateway's encoder) cannot write again are refused at parse time."""
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"n":%d}}' % number
    with pytest.raises(ParseError, match="64-bit"):
        loads_strict(body)
