"""Strict JSON-RPC 2.0 parsing shared by the MCP servers and ext_authz.

Every Python JSON parser keeps the last of duplicate keys, so ``{"method": "tools/list",
"method": "tools/call"}`` could be authorized as one method and executed as another. This module
parses once, rejects anything ambiguous (duplicate keys, lone surrogates, NaN, deep nesting,
invalid UTF-8, a byte-order mark, batches) and returns the parsed value that both sides then use.

orjson validates UTF-8, rejects surrogates and NaN and caps nesting without recursion; the
stdlib parser with ``object_pairs_hook`` then finds duplicate keys (orjson cannot). The depth
check in between keeps the stdlib parser far from its recursion limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import InvalidRequest, ParseError, PayloadTooLarge

DEFAULT_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_DEPTH = 64
# JSON-RPC ids are strings or integers here; integers are bounded so that every language on the
# path (Envoy, Rego, JavaScript clients) reads the same number.
MAX_SAFE_INT = 2**53 - 1


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def _reject_constant(name: str) -> Any:
    raise ParseError(f"invalid JSON: {name} is not allowed")


def _bounded_int(text: str) -> int:
    # Every component re-serializes with orjson, which stops at 64 bits: refuse what it can't write.
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise ParseError("invalid JSON: integer outside the 64-bit range")
    return value


_decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                            parse_int=_bounded_int)


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in item)
    return False


def loads_strict(body: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse JSON bytes strictly or raise :class:`ParseError` / :class:`PayloadTooLarge`."""
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"body of {len(body)} bytes exceeds the limit of {max_bytes}",
                              data={"limit": max_bytes})
    if body.startswith(b"\xef\xbb\xbf") or body.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ParseError("invalid JSON: a byte-order mark is not allowed; send UTF-8 without BOM")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        msg = str(exc)
        if "recursion" in msg.lower():
            raise ParseError(f"invalid JSON: nesting deeper than {max_depth}") from None
        raise ParseError(f"invalid JSON: {msg}") from None
    if isinstance(value, (dict, list)):
        if _depth_exceeds(value, max_depth):
            raise ParseError(f"invalid JSON: nesting deeper than {max_depth}",
                             data={"limit": max_depth})
        try:
            value = _decoder.decode(body.decode("utf-8"))
        except _DuplicateKey as exc:
            raise ParseError(f"invalid JSON: duplicate key {str(exc)!r}") from None
    return value


@dataclass(frozen=True, slots=True)
class Message:
    """One validated JSON-RPC message."""

    raw: dict[str, Any]
    kind: str  # "request" | "notification" | "response"

    @property
    def id(self) -> str | int | None:
        value = self.raw.get("id")
        return value if isinstance(value, (str, int)) else None

    @property
    def method(self) -> str | None:
        value = self.raw.get("method")
        return value if isinstance(value, str) else None

    @property
    def params(self) -> dict[str, Any]:
        value = self.raw.get("params")
        return value if isinstance(value, dict) else {}


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -MAX_SAFE_INT <= value <= MAX_SAFE_INT
    return isinstance(value, str)


def validate_message(value: Any) -> Message:
    """Check the shape of a parsed JSON-RPC message; batches are rejected (MCP >= 2025-06-18)."""
    if isinstance(value, list):
        raise InvalidRequest("JSON-RPC batches are not supported; send one message per request")
    if not isinstance(value, dict):
        raise InvalidRequest("a JSON-RPC message must be an object")
    if value.get("jsonrpc") != "2.0":
        raise InvalidRequest('"jsonrpc" must be exactly "2.0"')
    has_id = "id" in value
    if has_id and not _valid_id(value["id"]):
        raise InvalidRequest('"id" must be a string or an integer within +-(2^53-1)')
    if "method" in value:
        if not isinstance(value["method"], str) or not value["method"]:
            raise InvalidRequest('"method" must be a non-empty string')
        if "params" in value and not isinstance(value["params"], dict):
            raise InvalidRequest('"params" must be an object')
        if "result" in value or "error" in value:
            raise InvalidRequest("a message cannot be both a request and a response")
        return Message(value, "request" if has_id else "notification")
    if "result" in value or "error" in value:
        if ("result" in value) == ("error" in value):
            raise InvalidRequest('a response has exactly one of "result" and "error"')
        if not has_id:
            raise InvalidRequest('a response needs an "id"')
        if "error" in value:
            err = value["error"]
            if not (isinstance(err, dict) and isinstance(err.get("code"), int)
                    and isinstance(err.get("message"), str)):
                raise InvalidRequest('"error" must be an object with integer "code" and string "message"')
        return Message(value, "response")
    raise InvalidRequest('a JSON-RPC message needs "method", "result" or "error"')


def parse_message(body: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES,
                  max_depth: int = DEFAULT_MAX_DEPTH) -> Message:
    """Strictly parse and validate one JSON-RPC message."""
    return validate_message(loads_strict(body, max_bytes=max_bytes, max_depth=max_depth))


def best_effort_id(body: bytes) -> str | int | None:
    """The request id to echo in an error answer, when the body is parseable enough to have one."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(value, dict) and _valid_id(value.get("id")):
        rid: str | int = value["id"]
        return rid
    return None


def error_response(rid: str | int | None, error: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": error}


def result_response(rid: str | int | None, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "result": result}
