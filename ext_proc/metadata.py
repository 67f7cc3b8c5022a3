"""The caller context ext_authz hands to ext_proc as dynamic metadata (pure parsing).

ext_authz puts one struct into its CheckResponse ``dynamic_metadata``; Envoy stores it under the
filter namespace ``envoy.filters.http.ext_authz`` and, with ``metadata_options
.forwarding_namespaces.untyped`` naming that namespace, sends it to ext_proc in
``ProcessingRequest.metadata_context``. With ``ext_authz.transport: http`` Envoy can only file
strings taken from answer headers, so the same document arrives as JSON text under
:data:`CONTEXT_KEY`. Anything missing or of the wrong type is an error: the caller fails closed
rather than inspect with a guessed context.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from google.protobuf import struct_pb2

from ext_proc.errors import MetadataInvalid, MetadataMissing
from gateway.caller import Caller
from gateway.pii import UnknownPiiType, normalize_types
from gateway.wire import CONTEXT_HEADER, EXT_AUTHZ_NAMESPACE

NAMESPACE = EXT_AUTHZ_NAMESPACE
MAX_LIST_ITEMS = 64  # roles / mask types; a longer list is a bug upstream, not a real caller
# ext_authz's HTTP mode: the caller context as JSON text (gateway.wire.CONTEXT_HEADER).
CONTEXT_KEY = CONTEXT_HEADER


@dataclass(frozen=True, slots=True)
class CallerContext:
    # None: the request carried no JSON-RPC method (a GET stream, DELETE, a client's response),
    # so its answer is inspected message by message (ext_proc.inspect).
    mcp_method: str | None
    server: str
    caller: Caller  # with its claims where ext_proc may ask the list policy
    mask: tuple[str, ...]  # canonical PII type names (gateway.pii), possibly empty
    decision_id: str
    tool: str | None = None
    request_id: str | None = None
    # The server's resource id, sent with the claims: the list policy's input.server.resource.
    resource: str | None = None


def _string(fields: Any, key: str, *, required: bool) -> str | None:
    value = fields.get(key)  # a map lookup, never an insert (``fields[key]`` would add one)
    if value is None:
        if required:
            raise MetadataInvalid(f"ext_authz metadata lacks {key!r}", data={"field": key})
        return None
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        text: str = value.string_value
        return text
    if kind == "null_value" and not required:
        return None
    raise MetadataInvalid(f"ext_authz metadata {key!r} must be a string", data={"field": key})


def _strings(fields: Any, key: str) -> tuple[str, ...]:
    value = fields.get(key)
    if value is None:
        raise MetadataInvalid(f"ext_authz metadata lacks {key!r}", data={"field": key})
    if value.WhichOneof("kind") != "list_value":
        raise MetadataInvalid(f"ext_authz metadata {key!r} must be a list", data={"field": key})
    items = value.list_value.values
    if len(items) > MAX_LIST_ITEMS:
        raise MetadataInvalid(f"ext_authz metadata {key!r} is too long", data={"field": key})
    out: list[str] = []
    for item in items:
        if item.WhichOneof("kind") != "string_value":
            raise MetadataInvalid(f"ext_authz metadata {key!r} must hold strings", data={"field": key})
        out.append(item.string_value)
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _mask_types(raw: tuple[str, ...]) -> tuple[str, ...]:
    # Policies hand out a few fixed type lists, so this is nearly always a hit; a pure function
    # of its argument (an unknown type raises, and exceptions are not cached).
    return normalize_types(raw)


def parse_caller_context(filter_metadata: Any) -> CallerContext:
    """The caller context from ``metadata_context.filter_metadata`` (a map of Structs)."""
    if NAMESPACE not in filter_metadata:
        raise MetadataMissing(f"no {NAMESPACE} metadata: the caller context is unknown")
    struct: struct_pb2.Struct = filter_metadata[NAMESPACE]
    fields = struct.fields
    text = fields.get(CONTEXT_KEY)
    if text is not None:
        return _from_json(text)
    return _build(lambda key, required: _string(fields, key, required=required),
                  lambda key: _strings(fields, key), lambda key: key in fields)


def _from_json(value: Any) -> CallerContext:
    if value.WhichOneof("kind") != "string_value":
        raise MetadataInvalid(f"ext_authz metadata {CONTEXT_KEY!r} must be a string",
                              data={"field": CONTEXT_KEY})
    try:
        doc = orjson.loads(value.string_value)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        raise MetadataInvalid(f"ext_authz metadata {CONTEXT_KEY!r} must be a JSON object",
                              data={"field": CONTEXT_KEY})

    def string(key: str, required: bool) -> str | None:
        item = doc.get(key)
        if isinstance(item, str):
            return item
        if item is None and not required:
            return None
        if item is None:
            raise MetadataInvalid(f"ext_authz metadata lacks {key!r}", data={"field": key})
        raise MetadataInvalid(f"ext_authz metadata {key!r} must be a string", data={"field": key})

    def strings(key: str) -> tuple[str, ...]:
        items = doc.get(key)
        if items is None:
            raise MetadataInvalid(f"ext_authz metadata lacks {key!r}", data={"field": key})
        if not isinstance(items, list):
            raise MetadataInvalid(f"ext_authz metadata {key!r} must be a list", data={"field": key})
        if len(items) > MAX_LIST_ITEMS:
            raise MetadataInvalid(f"ext_authz metadata {key!r} is too long", data={"field": key})
        if not all(isinstance(item, str) for item in items):
            raise MetadataInvalid(f"ext_authz metadata {key!r} must hold strings", data={"field": key})
        return tuple(items)

    return _build(string, strings, lambda key: key in doc)


def _build(string: Callable[[str, bool], str | None],
           strings: Callable[[str], tuple[str, ...]],
           present: Callable[[str], bool]) -> CallerContext:
    # Present, but null (or empty) when the request had no JSON-RPC method: an absent field is a
    # broken hand-over, not a method-less request.
    if not present("mcp_method"):
        raise MetadataInvalid("ext_authz metadata lacks 'mcp_method'", data={"field": "mcp_method"})
    method = string("mcp_method", False) or None
    server = string("server", True)
    decision_id = string("decision_id", True)
    assert server is not None and decision_id is not None
    if not server:
        raise MetadataInvalid("ext_authz metadata 'server' is empty", data={"field": "server"})
    try:
        caller = Caller.from_metadata(string, strings)
    except ValueError as exc:
        raise MetadataInvalid(f"ext_authz metadata: {exc}", data={"field": "caller"}) from None
    try:
        mask = _mask_types(strings("mask"))
    except UnknownPiiType as exc:
        raise MetadataInvalid(str(exc), data={"field": "mask"}) from None
    return CallerContext(
        mcp_method=method, server=server, caller=caller, mask=mask, decision_id=decision_id,
        tool=string("tool", False) or None, request_id=string("request_id", False) or None,
        resource=string("resource", False) or None,
    )
