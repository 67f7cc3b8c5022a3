"""Parsing ext_authz's dynamic metadata into the caller context."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ext_authz.http_front import context_text
from ext_authz.response import allowed, ext_proc_metadata
from ext_proc.errors import MetadataInvalid, MetadataMissing
from ext_proc.metadata import CONTEXT_KEY, NAMESPACE, CallerContext, parse_caller_context
from gateway.caller import Caller
from tests.ext_proc.conftest import caller


def parsed(meta: dict[str, Any]) -> Any:
    req = pb.ProcessingRequest()
    req.metadata_context.filter_metadata[NAMESPACE].update(meta)
    return parse_caller_context(req.metadata_context.filter_metadata)


def test_full_context() -> None:
    """Every field arrives typed; mask types are canonicalised (aliases, order)."""
    ctx = parsed(caller(mask=["credit_card", "email"], scope="tools:call:files/*"))
    assert ctx.mcp_method == "tools/call" and ctx.server == "files" and ctx.tool == "read_file"
    assert ctx.caller.roles == ("viewer",) and ctx.mask == ("email", "card")
    assert ctx.caller.scope == "tools:call:files/*" and ctx.request_id == "r-1"


def test_optional_fields_may_be_absent_or_null() -> None:
    """tool, tenant, scope and request_id are optional (null counts as absent)."""
    ctx = parsed(caller(tool=None, tenant=..., request_id=...))
    assert ctx.tool is None and ctx.request_id is None
    assert ctx.caller.tenant is None and ctx.caller.scope is None


def test_missing_namespace() -> None:
    """No ext_authz namespace at all is MetadataMissing."""
    with pytest.raises(MetadataMissing):
        parse_caller_context(pb.ProcessingRequest().metadata_context.filter_metadata)


@pytest.mark.parametrize("overrides", [
    {"mcp_method": ...}, {"server": ...}, {"server": ""}, {"sub": ...}, {"decision_id": ...},
    {"mask": ...}, {"roles": ...}, {"roles": "admin"}, {"roles": [1]}, {"mask": ["shoe_size"]},
    {"mcp_method": 3}, {"tool": ["x"]}, {"roles": ["r"] * 65},
])
def test_malformed_context(overrides: dict[str, Any]) -> None:
    """Missing required fields, wrong types and unknown PII types are refused."""
    with pytest.raises(MetadataInvalid):
        parsed(caller(**overrides))


def test_parsing_leaves_the_forwarded_struct_alone() -> None:
    """Optional fields that are absent stay absent: parsing looks them up, never adds them."""
    req = pb.ProcessingRequest()
    req.metadata_context.filter_metadata[NAMESPACE].update(caller(tool=None, tenant=..., request_id=...))
    before = req.SerializeToString(deterministic=True)
    parse_caller_context(req.metadata_context.filter_metadata)
    assert req.SerializeToString(deterministic=True) == before


def test_unknown_mask_type_is_refused_every_time() -> None:
    """The canonical mask lists are cached, refusals are not: a bad list fails on every parse."""
    for _ in range(2):
        with pytest.raises(MetadataInvalid):
            parsed(caller(mask=["email", "shoe_size"]))
    assert parsed(caller(mask=["email"])).mask == ("email",)


# ------------------------------------------- the JSON text form (ext_authz.transport: http)

def json_parsed(text: str, **struct_fields: Any) -> CallerContext:
    """Parse metadata holding the caller context as JSON text under CONTEXT_KEY."""
    req = pb.ProcessingRequest()
    req.metadata_context.filter_metadata[NAMESPACE].update({CONTEXT_KEY: text, **struct_fields})
    return parse_caller_context(req.metadata_context.filter_metadata)


@pytest.mark.parametrize("meta", [
    caller(),
    caller(mask=["credit_card", "email"], scope="tools:call:files/*"),
    caller(tool=None, tenant=..., request_id=..., scope=None),
    caller(tool="", tenant="", request_id="", roles=[], mask=[]),
    caller(sub="zoë", tenant="東京", roles=["анализ"], obligations={"mask_pii": True}),
], ids=["full", "aliases", "optional-absent", "empty-optional", "non-ascii"])
def test_json_text_gives_the_same_context_as_the_struct(meta: dict[str, Any]) -> None:
    """The JSON text form parses to exactly the CallerContext the struct form gives."""
    expected = parsed(meta)
    assert json_parsed(orjson.dumps(meta).decode()) == expected
    assert json_parsed(json.dumps(meta)) == expected  # \\u escapes, as a header carries them


@pytest.mark.parametrize("text", [
    "", "not json", "{", '{"mcp_method": "tools/call",}', "[]", '["a"]', '"text"', "null", "1",
    "true",
])
def test_json_text_that_is_not_an_object_is_refused(text: str) -> None:
    """Invalid JSON and JSON that is not an object are MetadataInvalid."""
    with pytest.raises(MetadataInvalid):
        json_parsed(text)


@pytest.mark.parametrize("value", [3, True, None, ["{}"], {"mcp_method": "tools/call"}])
def test_json_key_that_is_not_a_string_is_refused(value: Any) -> None:
    """The context key holding anything but a string is MetadataInvalid."""
    req = pb.ProcessingRequest()
    req.metadata_context.filter_metadata[NAMESPACE].update({CONTEXT_KEY: value})
    with pytest.raises(MetadataInvalid):
        parse_caller_context(req.metadata_context.filter_metadata)


@pytest.mark.parametrize("overrides", [
    {"mcp_method": ...}, {"server": ...}, {"server": ""}, {"sub": ...}, {"decision_id": ...},
    {"mask": ...}, {"roles": ...}, {"sub": None}, {"decision_id": 7},
    {"server": ["files"]}, {"mcp_method": 3}, {"tool": ["x"]}, {"tenant": 1}, {"scope": {}},
    {"request_id": False}, {"roles": "admin"}, {"roles": {"a": 1}}, {"roles": [1]},
    {"roles": ["ok", None]}, {"mask": [["email"]]}, {"mask": ["shoe_size"]},
    {"roles": ["r"] * 65},
])
def test_malformed_json_context(overrides: dict[str, Any]) -> None:
    """Missing required fields, non-string values, wrong-typed list items, unknown PII types and
    overlong lists are refused in the JSON form too."""
    with pytest.raises(MetadataInvalid):
        json_parsed(orjson.dumps(caller(**overrides)).decode())


def test_invalid_json_text_never_falls_back_to_struct_fields() -> None:
    """With the context key present, only it counts: a broken one fails closed even when valid
    struct fields sit next to it."""
    assert json_parsed(orjson.dumps(caller(sub="bob")).decode(), **caller()).caller.sub == "bob"
    with pytest.raises(MetadataInvalid):
        json_parsed("{not json", **caller())
    with pytest.raises(MetadataInvalid):
        json_parsed(orjson.dumps(caller(sub=...)).decode(), **caller())


# ------------------------------------------- requests without a JSON-RPC method (issue 13, 6)

@pytest.mark.parametrize("value", [None, ""], ids=["null", "empty"])
def test_method_less_request_has_no_method(value: Any) -> None:
    """A GET stream's context (mcp_method null, or empty from an older sender) parses with no
    method, in both forms; only an absent field is a broken hand-over."""
    meta = caller(mcp_method=value, tool=None)
    assert parsed(meta).mcp_method is None
    assert json_parsed(orjson.dumps(meta).decode()).mcp_method is None


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_ext_authz_context_of_a_get_reaches_ext_proc(transport: str) -> None:
    """What ext_authz sends for a GET (no method, the policy's mask obligation) is what ext_proc
    parses, over either ext_authz transport."""
    metadata = ext_proc_metadata(
        method=None, server="erp", tool=None, decision_id="d-9", request_id="r-9",
        caller=Caller.from_claims({"sub": "alice", "tenant": "acme", "roles": ["analyst"],
                                   "scope": "mcp"}), resource="https://gw/mcp/erp",
        mask=["email", "card"], obligations={"mask_pii": ["email", "card"]})
    req = pb.ProcessingRequest()
    if transport == "grpc":
        check = allowed({"x-mcp-decision-id": "d-9"}, metadata=metadata)
        req.metadata_context.filter_metadata[NAMESPACE].CopyFrom(check.dynamic_metadata)
    else:
        req.metadata_context.filter_metadata[NAMESPACE].update(
            {CONTEXT_KEY: context_text(metadata)})
    ctx = parse_caller_context(req.metadata_context.filter_metadata)
    assert ctx.mcp_method is None and ctx.server == "erp" and ctx.mask == ("email", "card")
    assert ctx.caller.roles == ("analyst",) and ctx.decision_id == "d-9"
