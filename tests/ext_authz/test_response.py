"""Pure decision -> CheckResponse translation."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from ext_authz import response
from ext_authz.errors import MissingToken
from ext_authz.response import (
    allowed,
    bearer_challenge,
    denied,
    error_body,
    ext_proc_metadata,
    identity_headers,
    mask_types,
    needs_inspection,
)
from gateway.caller import Caller
from gateway.wire import GATEWAY_HEADERS, IDENTITY_HEADERS, INSPECT_HEADER, decode_identity, encode_identity


def test_allowed_overwrites_and_removes() -> None:
    """Set headers use OVERWRITE_IF_EXISTS_OR_ADD; token and unset gateway headers are removed."""
    resp = allowed({"x-mcp-user": "alice", "x-mcp-decision-id": "d1"})
    assert resp.status.code == 0
    assert all(h.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
               for h in resp.ok_response.headers)
    removed = set(resp.ok_response.headers_to_remove)
    assert removed == {"authorization"} | (set(GATEWAY_HEADERS) - {"x-mcp-user", "x-mcp-decision-id"})
    assert set(IDENTITY_HEADERS) < set(GATEWAY_HEADERS) and INSPECT_HEADER in removed


def _answer(decision_id: str, request_id: str | None, *, sub: str = "alice") -> tuple[
        dict[str, str], dict[str, Any]]:
    claims = {"sub": sub, "tenant": "acme", "roles": ["engineer"]}
    caller = Caller.from_claims(claims)
    md = ext_proc_metadata(method="tools/call", server="files", tool="read_file", caller=caller,
                           resource="https://gw/mcp/files", mask=["email"], decision_id=decision_id,
                           request_id=request_id,
                           obligations={"mask_pii": ["email"], "note": {"n": 1}})
    return {**identity_headers(caller, "read_file", decision_id), INSPECT_HEADER: "1"}, md


def test_repeated_allowed_answers_carry_their_own_ids() -> None:
    """Answers built from the serialized copy of an earlier one are field for field what a fresh
    build gives, with this request's decision id (header and metadata) and request id."""
    response._allowed_cache.clear()
    seen = []
    for decision_id, request_id in (("d1", "r1"), ("d2", "r2"), ("d3", None), ("d4", "r4")):
        headers, md = _answer(decision_id, request_id)
        resp = allowed(headers, metadata=md)
        assert resp == response._build_allowed(headers, md)
        got = {h.header.key: h.header.value for h in resp.ok_response.headers}
        meta = json_format.MessageToDict(resp.dynamic_metadata)
        assert got["x-mcp-decision-id"] == decision_id and meta["decision_id"] == decision_id
        assert meta["request_id"] == request_id
        seen.append(resp)
    assert len(response._allowed_cache) == 1
    # Another caller gets another answer, never the cached one of the first.
    headers, md = _answer("d5", "r5", sub="bob")
    resp = allowed(headers, metadata=md)
    assert {h.header.key: h.header.value for h in resp.ok_response.headers}["x-mcp-user"] == "bob"
    assert json_format.MessageToDict(resp.dynamic_metadata)["sub"] == "bob"
    assert len(response._allowed_cache) == 2


def test_allowed_answer_cache_is_bounded() -> None:
    """Distinct answers beyond the cache size evict the oldest instead of growing memory."""
    response._allowed_cache.clear()
    for n in range(response._ALLOWED_CACHE_SIZE + 5):
        headers, md = _answer(f"d{n}", "r", sub=f"user{n}")
        allowed(headers, metadata=md)
    assert len(response._allowed_cache) == response._ALLOWED_CACHE_SIZE


def test_mask_types_fail_closed() -> None:
    """mask_pii lists pass through; true or a malformed value masks every type, absent none."""
    assert mask_types({"mask_pii": ["email", "card"]}) == ["email", "card"]
    assert mask_types({"mask_pii": []}) == [] and mask_types({}) == []
    assert mask_types({"mask_pii": False}) == []
    for odd in (True, "email", {"email": True}, ["email", 3]):
        assert mask_types({"mask_pii": odd}) == ["all"]


def test_needs_inspection() -> None:
    """Lists always go through ext_proc; any other answer only when something is masked."""
    for method in ("tools/list", "prompts/list", "resources/list", "resources/templates/list"):
        assert needs_inspection(method, [])
    for method in ("tools/call", "resources/read", "prompts/get", "completion/complete", "ping",
                   "initialize", "logging/setLevel", "notifications/initialized", "x/unknown"):
        assert needs_inspection(method, ["email"]) and not needs_inspection(method, [])


@pytest.mark.parametrize("mask", [[], ["email"], ["all"]])
def test_requests_without_a_method_are_always_inspected(mask: list[str]) -> None:
    """A GET stream (which replays earlier answers on Last-Event-ID), DELETE or a client's
    response has no method to decide by: ext_proc sees its answer, masked or not."""
    assert needs_inspection(None, mask)


@pytest.mark.parametrize("http_method", ["GET", "DELETE", "PUT", "PATCH", "get", "post", ""])
@pytest.mark.parametrize("method", ["ping", "tools/call", "initialize", None])
def test_only_a_posts_answer_is_decided_by_its_message(http_method: str, method: str | None) -> None:
    """Whatever JSON-RPC a GET's (or any non-POST's) body holds, the server answers with the
    session's stream: always inspected, masked or not."""
    assert needs_inspection(method, [], http_method)
    assert not needs_inspection("ping", [], "POST")


def test_ext_proc_metadata_shape() -> None:
    """The metadata struct names everything ext_proc needs; odd claim types are dropped."""
    caller = Caller.from_claims({"sub": "alice", "iss": "https://idp", "tenant": 7,
                                 "roles": ["a", 1, "b"], "scope": "tools:call:files/*"})
    md = ext_proc_metadata(method="tools/call", server="files", tool="read_file", caller=caller,
                           resource="https://gw/mcp/files", mask=["email"], decision_id="d1",
                           request_id="r1", obligations={"mask_pii": ["email"]})
    assert md == {"mcp_method": "tools/call", "server": "files", "tool": "read_file",
                  "sub": "alice", "iss": "https://idp", "tenant": None,
                  "scope": "tools:call:files/*", "roles": ["a", "b"], "mask": ["email"],
                  "decision_id": "d1", "request_id": "r1", "obligations": {"mask_pii": ["email"]}}


@pytest.mark.parametrize(("method", "http_method"), [
    ("tools/list", "POST"), ("prompts/list", "POST"), (None, "POST"), ("tools/call", "GET")])
def test_ext_proc_metadata_carries_the_claims_where_lists_are_filtered(
        method: str | None, http_method: str) -> None:
    """Where ext_proc may ask the list policy, the claims (as JSON text, numbers exact) and the
    server's resource go along, so the list filter reads the token ext_authz's policy read."""
    claims = {"sub": "alice", "iss": "https://idp", "exp": 1_900_000_000, "department": "hr"}
    md = ext_proc_metadata(method=method, server="files", tool=None,
                           caller=Caller.from_claims(claims), resource="https://gw/mcp/files",
                           mask=[], decision_id="d1", request_id=None, obligations={},
                           http_method=http_method)
    assert orjson.loads(md["token"]) == claims and md["resource"] == "https://gw/mcp/files"


def test_identity_headers_from_claims() -> None:
    """sub, tenant, client_id (or azp), roles and tool become headers; junk claims are skipped."""
    h = identity_headers(Caller.from_claims(
        {"sub": "alice", "tenant": "acme", "azp": "vscode", "roles": ["a", 3, "b"]}), "read_file", "d1")
    assert h == {"x-mcp-user": "alice", "x-mcp-tenant": "acme", "x-mcp-client-id": "vscode",
                 "x-mcp-roles": "a,b", "x-mcp-tool": "read_file", "x-mcp-decision-id": "d1"}
    assert identity_headers(Caller.from_claims({"sub": "bob", "tenant": 5, "roles": "admin"}),
                            None, "d") == \
        {"x-mcp-user": "bob", "x-mcp-decision-id": "d"}


def test_header_values_cannot_inject() -> None:
    """Control characters and non-ASCII in claims are percent-encoded."""
    assert encode_identity("alice") == "alice"
    assert encode_identity("a\r\nx-mcp-roles: admin") == "a%0D%0Ax-mcp-roles: admin"
    assert encode_identity("jos\u00e9") == "jos%C3%A9"
    assert encode_identity("100%") == "100%25"
    for value in ("alice", "a\r\nx: y", "jos\u00e9", "100%", "%41"):
        assert decode_identity(encode_identity(value)) == value  # the servers' side inverts it


def test_denied_response_has_status_body_and_headers() -> None:
    """Denied answers carry the HTTP status, a JSON content type and the given headers."""
    body = error_body(5, MissingToken("no token"))
    resp = denied(401, body, {"www-authenticate": "Bearer"})
    assert resp.status.code == 16 and resp.denied_response.status.code == 401
    headers = {h.header.key: h.header.value for h in resp.denied_response.headers}
    assert headers == {"content-type": "application/json", "www-authenticate": "Bearer"}
    assert orjson.loads(resp.denied_response.body)["id"] == 5
    assert denied(403, b"{}").status.code == 7


def test_bearer_challenge_forms() -> None:
    """RFC 6750 / RFC 9728 challenge parameters, quoted."""
    assert bearer_challenge("https://g/prm", None) == 'Bearer resource_metadata="https://g/prm"'
    assert bearer_challenge("https://g/prm", "insufficient_scope", scope="a b") == \
        'Bearer resource_metadata="https://g/prm", error="insufficient_scope", scope="a b"'
    assert bearer_challenge(None, None) == "Bearer"
