"""Parsing ext_authz's dynamic metadata into the caller context."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ext_proc.errors import MetadataInvalid, MetadataMissing
from ext_proc.metadata import NAMESPACE, parse_caller_context
from tests.ext_proc.conftest import caller


def parsed(meta: dict[str, Any]) -> Any:
    req = pb.ProcessingRequest()
    req.metadata_context.filter_metadata[NAMESPACE].update(meta)
    return parse_caller_context(req.metadata_context.filter_metadata)


def test_full_context() -> None:
    """Every field arrives typed; mask types are canonicalised (aliases, order)."""
    ctx = parsed(caller(mask=["credit_card", "email"], scope="tools:call:files/*"))
    assert ctx.mcp_method == "tools/call" and ctx.server == "files" and ctx.tool == "read_file"
    assert ctx.roles == ("viewer",) and ctx.mask == ("email", "card")
    assert ctx.scope == "tools:call:files/*" and ctx.request_id == "r-1"


def test_optional_fields_may_be_absent_or_null() -> None:
    """tool, tenant, scope and request_id are optional (null counts as absent)."""
    ctx = parsed(caller(tool=None, tenant=..., request_id=...))
    assert ctx.tool is None and ctx.tenant is None and ctx.request_id is None and ctx.scope is None


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
