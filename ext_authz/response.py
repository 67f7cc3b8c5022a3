"""Decision -> Envoy CheckResponse (pure functions), via a transport-neutral :class:`Verdict`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf import struct_pb2

from gateway.caller import Caller
from gateway.errors import GatewayError
from gateway.jsonrpc import error_response
from gateway.wire import (
    AGGREGATE_HEADERS,
    ASSERTION_HEADER,
    DECISION_ID_HEADER,
    GATEWAY_HEADERS,
    ID_JSON_HEADER,
    REWRITE_AT_HEADER,
    REWRITE_LEN_HEADER,
    REWRITE_TO_HEADER,
    TOOL_HEADER,
    encode_identity,
)

# google.rpc.Code values: Envoy only needs "not OK" plus the HTTP status of the denied answer.
_RPC_OK = 0
_RPC_PERMISSION_DENIED = 7
_RPC_UNAUTHENTICATED = 16
# Replace whatever the client sent under the same name; never append next to it.
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# List answers are filtered per caller, always; every other answer is masked when the policy
# masks PII. MASKABLE_METHODS are those whose results are MCP content (the usual carriers).
LIST_METHODS = frozenset({"tools/list", "prompts/list", "resources/list", "resources/templates/list"})
MASKABLE_METHODS = frozenset({"tools/call", "resources/read", "prompts/get"})
# The PII type name ext_proc's masker expands to every type it knows.
MASK_ALL = "all"
# The client's credentials stop at the gateway (MCP: no token passthrough). An upstream
# credential in the same header (gateway.credentials) is set in their place, never beside them.
STRIPPED_HEADERS = ("authorization",)
NO_CREDENTIALS: Mapping[str, str] = MappingProxyType({})
# On an aggregate endpoint the routing and rewrite headers are gateway-owned too.
_AGGREGATE_OWNED_HEADERS = (*GATEWAY_HEADERS, *AGGREGATE_HEADERS)
# What an aggregate endpoint's allowed answer sets per request (not worth caching).
_AGGREGATE_PER_REQUEST = frozenset({REWRITE_AT_HEADER, REWRITE_LEN_HEADER, REWRITE_TO_HEADER,
                                    ID_JSON_HEADER, "mcp-session-id", "mcp-name"})
_JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Verdict:
    """One decision as either transport answers it.

    Allowed (``ok``): ``headers`` overwrite the upstream request's, ``metadata`` is the caller
    context for ext_proc. Denied: ``status``, ``headers`` and ``body`` are the client's answer.
    Either way every gateway-owned header not in ``headers`` is removed from the upstream
    request (:data:`GATEWAY_HEADERS`, and :data:`AGGREGATE_HEADERS` on an ``aggregate``
    endpoint), and the client's token too (:data:`STRIPPED_HEADERS`) unless ``keep_token``: a
    request to the aggregator, which presents it to Envoy again for each server (it never
    reaches a server). ``credentials`` are the upstream credential's headers
    (gateway.credentials): set per request, never cached, and a stripped header they name
    (``authorization``) holds the credential instead of being removed.
    """

    ok: bool
    status: int
    headers: Mapping[str, str]
    body: bytes = b""
    metadata: Mapping[str, Any] | None = None
    keep_token: bool = False
    aggregate: bool = False
    credentials: Mapping[str, str] = field(default_factory=lambda: NO_CREDENTIALS)

    @classmethod
    def allow(cls, headers: Mapping[str, str], metadata: Mapping[str, Any] | None = None,
              *, keep_token: bool = False, aggregate: bool = False,
              credentials: Mapping[str, str] = NO_CREDENTIALS) -> Verdict:
        if keep_token and credentials:
            raise ValueError("a request that keeps the client's token carries no credential")
        return cls(True, 200, headers, b"", metadata, keep_token, aggregate, credentials)

    @classmethod
    def deny(cls, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> Verdict:
        return cls(False, status, headers or {}, body)

    def check_response(self) -> pb.CheckResponse:
        """The gRPC transport's answer."""
        if self.ok:
            return allowed(self.headers, metadata=self.metadata, keep_token=self.keep_token,
                           aggregate=self.aggregate, credentials=self.credentials)
        return denied(self.status, self.body, self.headers)

    def removed_headers(self) -> list[str]:
        """Upstream request headers to drop on allow (see :func:`headers_to_remove`)."""
        removed = headers_to_remove(self.headers, keep_token=self.keep_token,
                                    aggregate=self.aggregate)
        return [h for h in removed if h not in self.credentials] if self.credentials else removed

    def upstream_headers(self) -> dict[str, str]:
        """Every header an allowed answer sets on the upstream request, credentials last."""
        return {**self.headers, **self.credentials} if self.credentials else dict(self.headers)


def headers_to_remove(set_headers: Mapping[str, str], *, keep_token: bool = False,
                      aggregate: bool = False) -> list[str]:
    """The client's token (unless ``keep_token``) and every gateway-owned header an allowed
    answer does not set (the aggregate endpoints' own ones too when ``aggregate``)."""
    owned = [h for h in (_AGGREGATE_OWNED_HEADERS if aggregate else GATEWAY_HEADERS)
             if h not in set_headers]
    return owned if keep_token else [*STRIPPED_HEADERS, *owned]


def identity_headers(caller: Caller, tool: str | None, decision_id: str) -> dict[str, str]:
    """The identity headers for the upstream (``Caller.to_headers``), the tool and the decision id.

    A subject is unique only within its issuer: a server that binds state to a user (sessions)
    needs both, so the issuer travels too."""
    out = caller.to_headers()
    out[DECISION_ID_HEADER] = decision_id
    if tool:
        out[TOOL_HEADER] = encode_identity(tool)
    return out


def mask_types(obligations: Mapping[str, Any]) -> list[str]:
    """The PII types to mask from the policy's ``mask_pii`` obligation.

    A list of names passes through; ``true`` or a value of any other shape means every type:
    an obligation the gateway cannot read must never turn masking off.
    """
    value = obligations.get("mask_pii")
    if value is None or value is False:
        return []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return [MASK_ALL]


def needs_inspection(method: str | None, mask: list[str], http_method: str = "POST") -> bool:
    """Whether ext_proc must see the answer to a request of ``method``.

    No method, or not a POST (a GET: the session's stream, which replays earlier answers of any
    method on resumption with Last-Event-ID, whatever JSON-RPC its body may hold; DELETE; a
    client's response): always, since only the answer says what it holds and a replayed list is
    filtered like the original. A list: always. Any other answer (a completion, a log
    notification on the same SSE stream): when PII is masked.
    """
    return http_method != "POST" or method is None or method in LIST_METHODS or bool(mask)


def ext_proc_metadata(*, method: str | None, server: str, tool: str | None, caller: Caller,
                      resource: str, mask: list[str], decision_id: str, request_id: str | None,
                      obligations: Mapping[str, Any], http_method: str = "POST") -> dict[str, Any]:
    """The dynamic metadata ext_proc reads (Envoy files it under envoy.filters.http.ext_authz).

    Where ext_proc may ask the list policy (a list, or an answer whose content only the answer
    tells: see :func:`needs_inspection`), the caller's claims and the server's resource go too,
    so the list filter's input is built from what this decision's input was."""
    lists = http_method != "POST" or method is None or method in LIST_METHODS
    out = {
        "mcp_method": method, "server": server, "tool": tool,
        **caller.to_metadata(with_token=lists),
        "mask": mask, "decision_id": decision_id, "request_id": request_id,
        "obligations": obligations,
    }
    if lists:
        out["resource"] = resource
    return out


_OBLIGATIONS_CACHE_SIZE = 256
_obligations_cache: dict[bytes, bytes] = {}


def _fill_struct(struct: struct_pb2.Struct, values: Mapping[str, Any]) -> None:
    # Struct.update() goes through a generic, recursive setter that costs ~25 us for this
    # document; typed setters for the flat fields and a cache of serialized obligations (they
    # repeat per role) keep it to a few.
    fields = struct.fields
    for key, value in values.items():
        if isinstance(value, str):
            fields[key].string_value = value
        elif value is None:
            fields[key].null_value = struct_pb2.NULL_VALUE
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            list_value = fields[key].list_value
            list_value.SetInParent()  # an empty list stays a list, not an unset value
            items = list_value.values
            for v in value:
                items.add().string_value = v
        elif isinstance(value, Mapping):
            fields[key].struct_value.MergeFromString(_obligations_bytes(value))
        else:
            struct.update({key: value})


def _obligations_bytes(value: Mapping[str, Any]) -> bytes:
    key = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    cached = _obligations_cache.get(key)
    if cached is None:
        doc = struct_pb2.Struct()
        doc.update(value)
        cached = doc.SerializeToString()
        if len(_obligations_cache) < _OBLIGATIONS_CACHE_SIZE:
            _obligations_cache[key] = cached
    return cached


# Per request only the decision id (a header and a metadata field) and the request id change;
# the rest of an allowed answer repeats per caller, tool and policy answer. Building it through
# the protobuf API costs ~20 us, parsing a serialized copy and writing the ids in ~4 us, so each
# distinct rest is built once and kept serialized (bounded, oldest dropped first).
# The caller assertion (a fresh jti each time) is per request too.
_PER_REQUEST_HEADERS = (DECISION_ID_HEADER, ASSERTION_HEADER)
_PER_REQUEST_METADATA = ("decision_id", "request_id")
_ALLOWED_CACHE_SIZE = 1024
_allowed_cache: dict[bytes, tuple[bytes, tuple[tuple[int, str], ...]]] = {}


def allowed(set_headers: Mapping[str, str], *, metadata: Mapping[str, Any] | None = None,
            keep_token: bool = False, aggregate: bool = False,
            credentials: Mapping[str, str] = NO_CREDENTIALS) -> pb.CheckResponse:
    """OK: overwrite the given headers, remove the token (unless ``keep_token``) and unset
    gateway-owned headers (see :func:`headers_to_remove`); then set the upstream credential's
    headers, which no removal names (they hold the credential, not the client's value)."""
    resp = _allowed_rest(set_headers, metadata, keep_token, aggregate)
    if credentials:
        ok = resp.ok_response
        for name, value in credentials.items():
            opt = ok.headers.add()
            opt.header.key = name
            opt.header.value = value
            opt.append_action = OVERWRITE
        kept = [h for h in ok.headers_to_remove if h not in credentials]
        del ok.headers_to_remove[:]
        ok.headers_to_remove.extend(kept)
    return resp


def _allowed_rest(set_headers: Mapping[str, str], metadata: Mapping[str, Any] | None,
                  keep_token: bool, aggregate: bool) -> pb.CheckResponse:
    if aggregate:
        # The rewrite, the ids and the session vary per request: added to the cached rest.
        varying = {k: v for k, v in set_headers.items() if k in _AGGREGATE_PER_REQUEST}
        if varying:
            stable = {k: v for k, v in set_headers.items() if k not in varying}
            resp = _allowed(stable, metadata, keep_token, aggregate, tuple(varying))
            ok = resp.ok_response
            for name, value in varying.items():
                opt = ok.headers.add()
                opt.header.key = name
                opt.header.value = value
                opt.append_action = OVERWRITE
            return resp
    return _allowed(set_headers, metadata, keep_token, aggregate, ())


def _allowed(set_headers: Mapping[str, str], metadata: Mapping[str, Any] | None,
             keep_token: bool, aggregate: bool, added: tuple[str, ...]) -> pb.CheckResponse:
    """:func:`allowed` without the headers named in ``added`` (set by the caller afterwards)."""
    key = _allowed_key(set_headers, metadata, keep_token, aggregate, added)
    if key is not None:
        cached = _allowed_cache.get(key)
        if cached is not None:
            template, header_indexes = cached
            resp = pb.CheckResponse.FromString(template)
            for header_index, header_name in header_indexes:
                resp.ok_response.headers[header_index].header.value = set_headers[header_name]
            if metadata:
                fields = resp.dynamic_metadata.fields
                for name in _PER_REQUEST_METADATA:
                    if name in metadata:
                        value = metadata[name]
                        if value is None:
                            fields[name].null_value = struct_pb2.NULL_VALUE
                        else:
                            fields[name].string_value = value
            return resp
    resp = _build_allowed(set_headers, metadata, keep_token, aggregate, added)
    if key is not None:
        if len(_allowed_cache) >= _ALLOWED_CACHE_SIZE:
            del _allowed_cache[next(iter(_allowed_cache))]
        names = list(set_headers)
        indexes = tuple((names.index(h), h) for h in _PER_REQUEST_HEADERS if h in set_headers)
        _allowed_cache[key] = (resp.SerializeToString(), indexes)
    return resp


def _allowed_key(set_headers: Mapping[str, str], metadata: Mapping[str, Any] | None,
                 keep_token: bool = False, aggregate: bool = False,
                 added: tuple[str, ...] = ()) -> bytes | None:
    """What an allowed answer depends on besides the per-request ids; None: do not cache."""
    headers: dict[str, str | None] = dict(set_headers)
    for name in _PER_REQUEST_HEADERS:
        if name in headers:
            headers[name] = None
    meta: dict[str, Any] | None = None
    if metadata is not None:
        meta = dict(metadata)
        for name in _PER_REQUEST_METADATA:
            if name in meta:
                value = meta[name]
                if value is not None and not isinstance(value, str):
                    return None
                meta[name] = None  # present; the value is written per request
    try:
        # The same JSON text means the same Struct (as for the obligations cache above).
        return orjson.dumps((headers, meta, keep_token, aggregate, sorted(added)))
    except TypeError:
        return None


def _build_allowed(set_headers: Mapping[str, str], metadata: Mapping[str, Any] | None,
                   keep_token: bool = False, aggregate: bool = False,
                   added: tuple[str, ...] = ()) -> pb.CheckResponse:
    resp = pb.CheckResponse()
    resp.status.code = _RPC_OK
    ok = resp.ok_response
    for name, value in set_headers.items():
        opt = ok.headers.add()
        opt.header.key = name
        opt.header.value = value
        opt.append_action = OVERWRITE
    kept = {**set_headers, **dict.fromkeys(added, "")} if added else set_headers
    ok.headers_to_remove.extend(headers_to_remove(kept, keep_token=keep_token,
                                                  aggregate=aggregate))
    if metadata:
        _fill_struct(resp.dynamic_metadata, metadata)
    return resp


def denied(http_status: int, body: bytes, headers: Mapping[str, str] | None = None
           ) -> pb.CheckResponse:
    """A denied answer that Envoy sends to the client as-is."""
    resp = pb.CheckResponse()
    resp.status.code = _RPC_UNAUTHENTICATED if http_status == 401 else _RPC_PERMISSION_DENIED
    d = resp.denied_response
    d.status.code = http_status  # envoy.type.v3.StatusCode values are the HTTP codes
    d.body = body.decode("utf-8")
    opt = d.headers.add()
    opt.header.key = "content-type"
    opt.header.value = _JSON
    opt.append_action = OVERWRITE
    for name, value in (headers or {}).items():
        opt = d.headers.add()
        opt.header.key = name
        opt.header.value = value
        opt.append_action = OVERWRITE
    return resp


def error_body(rid: str | int | None, err: GatewayError) -> bytes:
    """A JSON-RPC error answer echoing the request id."""
    return orjson.dumps(error_response(rid, err.to_rpc_error()))


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def bearer_challenge(resource_metadata: str | None, error: str | None,
                     description: str | None = None, scope: str | None = None) -> str:
    """A ``WWW-Authenticate: Bearer`` value (RFC 6750 section 3, RFC 9728 section 5.1)."""
    parts = []
    if resource_metadata is not None:
        parts.append(f"resource_metadata={_quoted(resource_metadata)}")
    if error is not None:
        parts.append(f"error={_quoted(error)}")
    if description is not None:
        parts.append(f"error_description={_quoted(encode_identity(description))}")
    if scope is not None:
        parts.append(f"scope={_quoted(scope)}")
    return "Bearer " + ", ".join(parts) if parts else "Bearer"
