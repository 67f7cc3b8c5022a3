"""Requests to an aggregate endpoint (``/mcp``, ``/mcp/<virtual>``): where a message goes.

A message aimed at one server (``tools/call``, ``prompts/get``, ``resources/read|subscribe|
unsubscribe``, ``completion/complete``, and the client's answer to a server-to-client request)
takes the fast path: Envoy routes it to that server's route, and its Lua filter makes the one
byte-exact rewrite computed here (the exposed name, URI or id replaced by the server's own). The
rewrite is checked before it is handed out: the body with it applied parses to exactly the
message with that one field replaced, so the upstream reads what was authorized (a decoy
argument holding the same text is never touched, and a name the client escaped is refused rather
than guessed at). Everything else (initialize, lists, ping, notifications, GET, DELETE) goes to
the aggregator, which fans out through the per-server routes.

Pure functions: :func:`resolve` decides, the servicer governs the result with the real server and
tool as it governs ``/mcp/<server>``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.aggregate.naming import decode_request_id, split, split_uri
from gateway.aggregate.views import View
from gateway.errors import INTERNAL_ERROR, INVALID_PARAMS, GatewayError, InvalidRequest
from gateway.jsonrpc import Message
from gateway.wire import (
    ID_JSON_HEADER,
    REWRITE_AT_HEADER,
    REWRITE_LEN_HEADER,
    REWRITE_TO_HEADER,
    ROUTE_HEADER,
)

# Occurrences of the exposed name tried as the rewrite site: a body repeating it more often than
# this (decoys) is refused rather than parsed over and over.
MAX_REWRITE_CANDIDATES = 16
# The rewrite's replacement and the request id travel in headers; bounded far below Envoy's
# header limit (tool names are at most 128 characters in MCP, URIs rarely above 2 KB).
MAX_HEADER_VALUE_CHARS = 8 * 1024
RESOURCE_METHODS = frozenset({"resources/read", "resources/subscribe", "resources/unsubscribe"})


class UnknownTarget(GatewayError):
    """A name, URI or answer id on an aggregate endpoint that names no server of its view, or a
    tool outside a virtual server's selection: MCP's "unknown tool" (-32602)."""

    code = "unknown_target"
    rpc_code = INVALID_PARAMS
    http_status = 400


class NotPlainName(GatewayError):
    """The exposed name is not written as a plain JSON string the gateway can rewrite exactly."""

    code = "name_not_plain"
    rpc_code = INVALID_PARAMS
    http_status = 400


class UpstreamNotInSession(GatewayError):
    """The session has no upstream session of that server (it was down at initialize and has
    not joined since)."""

    code = "server_unavailable"
    rpc_code = INTERNAL_ERROR
    http_status = 503


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Replace ``length`` bytes at byte offset ``at`` of the body with the JSON text ``to``."""

    at: int
    length: int
    to: str

    def apply(self, body: bytes) -> bytes:
        return body[:self.at] + self.to.encode("ascii") + body[self.at + self.length:]


@dataclass(frozen=True, slots=True)
class FastPath:
    """A message for one server. ``target``: its real tool or prompt name or resource URI (None
    for an answer); ``exposed_name``: what the client wrote (name, URI or answer id);
    ``message``: the message as the server receives it; ``id_json``: the client's request id as
    JSON text (None for an answer or an id too long for a header); ``upstream_sid``: the server's
    session id, filled in once the session is opened."""

    server: str
    target: str | None
    rewrite: Rewrite
    id_json: str | None
    upstream_sid: str | None
    exposed_name: str
    message: dict[str, Any]

    def with_upstream_sid(self, sid: str) -> FastPath:
        return FastPath(self.server, self.target, self.rewrite, self.id_json, sid,
                        self.exposed_name, self.message)

    def headers(self) -> dict[str, str]:
        """The routing and rewrite headers for Envoy (gateway.wire)."""
        out = {ROUTE_HEADER: self.server, REWRITE_AT_HEADER: str(self.rewrite.at),
               REWRITE_LEN_HEADER: str(self.rewrite.length), REWRITE_TO_HEADER: self.rewrite.to}
        if self.id_json is not None:
            out[ID_JSON_HEADER] = self.id_json
        return out


@dataclass(frozen=True, slots=True)
class ToAggregator:
    """Everything that is not aimed at one server."""


def resolve(msg: Message | None, body: bytes, view: View) -> FastPath | ToAggregator:
    """Where ``msg`` (the strictly parsed ``body``; None for GET/DELETE) goes on ``view``; raises
    UnknownTarget, NotPlainName or InvalidRequest."""
    if msg is None:
        return ToAggregator()
    if msg.kind == "response":
        return _answer(msg, body, view)
    method = msg.method
    params = msg.raw.get("params")
    if not isinstance(params, dict):
        return ToAggregator()
    if method == "tools/call":
        return _named(msg, body, view, ("params", "name"), params.get("name"), tool=True)
    if method == "prompts/get":
        return _named(msg, body, view, ("params", "name"), params.get("name"))
    if method in RESOURCE_METHODS:
        return _uri(msg, body, view, ("params", "uri"), params.get("uri"))
    if method == "completion/complete":
        ref = params.get("ref")
        if not isinstance(ref, dict):
            raise InvalidRequest('completion/complete needs "params.ref"')
        if ref.get("type") == "ref/prompt":
            return _named(msg, body, view, ("params", "ref", "name"), ref.get("name"))
        if ref.get("type") == "ref/resource":
            return _uri(msg, body, view, ("params", "ref", "uri"), ref.get("uri"))
        raise InvalidRequest('"params.ref.type" must be "ref/prompt" or "ref/resource"')
    return ToAggregator()


def _named(msg: Message, body: bytes, view: View, path: tuple[str, ...], exposed: Any, *,
           tool: bool = False) -> FastPath:
    if not isinstance(exposed, str):
        raise InvalidRequest(f'"{".".join(path)}" must be a string')
    parts = split(exposed, view.servers)
    allowed = parts is not None and (view.allows(*parts) if tool else view.allows_server(parts[0]))
    if parts is None or not allowed:
        what = "tool" if tool else "prompt"
        raise UnknownTarget(f"unknown {what} {exposed!r} on {view.path()}",
                            data={"name": exposed})
    server, name = parts
    return _fast(msg, body, server, name, path, exposed, name)


def _uri(msg: Message, body: bytes, view: View, path: tuple[str, ...], exposed: Any) -> FastPath:
    if not isinstance(exposed, str):
        raise InvalidRequest(f'"{".".join(path)}" must be a string')
    parts = split_uri(exposed, view.servers)
    if parts is None:
        raise UnknownTarget(f"unknown resource {exposed!r} on {view.path()}", data={"uri": exposed})
    server, uri = parts
    return _fast(msg, body, server, uri, path, exposed, uri)


def _answer(msg: Message, body: bytes, view: View) -> FastPath | ToAggregator:
    rid = msg.raw.get("id")
    if not isinstance(rid, str):
        return ToAggregator()
    decoded = decode_request_id(rid, view.servers)
    if decoded is None:
        # Not an id the fast path gave out: the aggregator's own request (or nobody's).
        return ToAggregator()
    server, upstream_id = decoded
    return _fast(msg, body, server, None, ("id",), rid, upstream_id)


def _fast(msg: Message, body: bytes, server: str, target: str | None, path: tuple[str, ...],
          exposed: str, new: str | int) -> FastPath:
    expected = _replaced(msg.raw, path, new)
    rewrite = find_rewrite(body, exposed, new, expected)
    id_json = None
    if msg.kind == "request":
        id_json = json.dumps(msg.raw.get("id"))
        if len(id_json) > MAX_HEADER_VALUE_CHARS:
            id_json = None
    return FastPath(server=server, target=target, rewrite=rewrite, id_json=id_json,
                    upstream_sid=None, exposed_name=exposed, message=expected)


def find_rewrite(body: bytes, old: str, new: str | int, expected: Mapping[str, Any]) -> Rewrite:
    """The rewrite of one occurrence of the JSON string ``old`` in ``body`` by the JSON value
    ``new`` whose result parses to exactly ``expected``; NotPlainName when none does."""
    to = json.dumps(new)  # ASCII: it travels in a header
    if len(to) > MAX_HEADER_VALUE_CHARS:
        raise NotPlainName(f"the name {old!r} is too long for the aggregate endpoint",
                           data={"name": old})
    new_bytes = to.encode("ascii")
    tried = 0
    for literal in _spellings(old):
        start = 0
        while tried < MAX_REWRITE_CANDIDATES:
            at = body.find(literal, start)
            if at == -1:
                break
            tried += 1
            candidate = body[:at] + new_bytes + body[at + len(literal):]
            try:
                if orjson.loads(candidate) == expected:
                    return Rewrite(at, len(literal), to)
            except orjson.JSONDecodeError:
                pass
            start = at + 1
    raise NotPlainName(
        f"send the name {old!r} as a plain JSON string (no escape sequences) on the aggregate "
        "endpoint", data={"name": old})


def _spellings(value: str) -> list[bytes]:
    # How JSON encoders write a string: UTF-8 as is (orjson, JavaScript) or \u-escaped non-ASCII
    # (Python's json default).
    plain = orjson.dumps(value)
    if value.isascii() and "\x7f" not in value:  # then both encoders write it alike
        return [plain]
    escaped = json.dumps(value).encode("ascii")
    return [plain, escaped]


def _replaced(raw: Mapping[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A copy of ``raw`` with the field at ``path`` set to ``value`` (only the path is copied)."""
    out = dict(raw)
    if len(path) == 1:
        out[path[0]] = value
        return out
    inner = raw[path[0]]
    assert isinstance(inner, dict)
    out[path[0]] = _replaced(inner, path[1:], value)
    return out
