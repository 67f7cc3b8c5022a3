"""The typed caller: one reading of the claims, and each boundary's encoder beside its decoder."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from google.protobuf import struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from ext_authz.response import allowed, ext_proc_metadata
from ext_proc.errors import MetadataInvalid
from ext_proc.metadata import CONTEXT_KEY, NAMESPACE, parse_caller_context
from gateway.caller import MAX_ROLES, Caller, SessionOwner

# Anything a claim may hold: controls, separators, "%", non-ASCII, the reserved header chars.
text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=24)
callers = st.builds(
    Caller, sub=text, issuer=st.none() | text, tenant=st.none() | text,
    client_id=st.none() | text, roles=st.lists(text, max_size=5).map(tuple),
    scope=st.none() | st.text(max_size=24))


def test_from_claims_reads_each_field_once_with_one_rule() -> None:
    """Non-empty strings count, anything else is absent; client_id falls back to azp; roles keep
    their non-empty strings; the claims stay whole for the policy."""
    claims = {"sub": "alice", "iss": "https://idp", "tenant": "", "azp": "vscode",
              "roles": ["a", 3, "", "b"], "scope": "mcp", "department": "hr"}
    caller = Caller.from_claims(claims)
    assert caller == Caller("alice", issuer="https://idp", client_id="vscode", roles=("a", "b"),
                            scope="mcp")
    assert caller.token() == claims and caller.owner == SessionOwner("https://idp", "alice", None)
    with pytest.raises(ValueError):
        Caller.from_claims({"sub": 7})


def test_token_view_without_claims_names_the_typed_fields() -> None:
    """A caller decoded from a boundary without the claims still gives the policy its fields."""
    assert Caller("bob", tenant="acme", roles=("x",)).token() == \
        {"sub": "bob", "roles": ["x"], "tenant": "acme"}


@given(callers)
def test_headers_round_trip(caller: Caller) -> None:
    """Whatever a claim holds, the identity headers are printable ASCII and decode to the same
    caller (the scope does not travel in headers)."""
    headers = caller.to_headers()
    assert all(v.isascii() and v.isprintable() and v == v.strip() for v in headers.values())
    expected = Caller(caller.sub, issuer=caller.issuer, tenant=caller.tenant,
                      client_id=caller.client_id, roles=caller.roles)
    assert Caller.from_headers(headers.get) == expected


def test_roles_with_separators_stay_whole() -> None:
    """A comma or space inside a role is encoded; a hand-written "a, b" is two roles."""
    caller = Caller("u", roles=("a,b", " c", "d"))
    headers = caller.to_headers()
    assert headers["x-mcp-roles"] == "a%2Cb,%20c,d"
    assert Caller.from_headers(headers.get) == caller
    assert Caller.from_headers({"x-mcp-user": "u", "x-mcp-roles": "dev, ops"}.get) == \
        Caller("u", roles=("dev", "ops"))


@pytest.mark.parametrize("headers", [
    {"x-mcp-user": "%61lice"},                       # an encoding the gateway never produces
    {"x-mcp-user": "a", "x-mcp-roles": "a,,b"},      # an empty role
    {"x-mcp-user": "a", "x-mcp-roles": "a b"},       # an unencoded reserved character
    {"x-mcp-user": "a", "x-mcp-roles": ",".join(["r"] * (MAX_ROLES + 1))},
])
def test_headers_the_gateway_never_sends_are_refused(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Caller.from_headers(headers.get)


def test_edge_spaces_survive_header_trimming() -> None:
    """HTTP trims a header value's edges: " alice" travels as "%20alice", never as "alice"."""
    caller = Caller(" alice ", tenant=" ")
    headers = caller.to_headers()
    assert headers["x-mcp-user"] == "%20alice%20" and headers["x-mcp-tenant"] == "%20"
    assert Caller.from_headers({k: v.strip() for k, v in headers.items()}.get) == caller


def test_no_user_header_is_no_caller() -> None:
    assert Caller.from_headers({"x-mcp-tenant": "acme"}.get) is None


def _metadata(caller: Caller, method: str | None) -> dict[str, Any]:
    return ext_proc_metadata(method=method, server="files", tool=None, caller=caller,
                             resource="https://gw/mcp/files", mask=[], decision_id="d",
                             request_id=None, obligations={})


@given(callers, st.sampled_from(["tools/list", "tools/call", None]), st.booleans())
def test_metadata_round_trips_as_struct_and_as_json(caller: Caller, method: str | None,
                                                    as_json: bool) -> None:
    """ext_authz's metadata, as the gRPC Struct or as the HTTP mode's JSON text, decodes in
    ext_proc to the caller that was encoded (with its claims where lists are filtered)."""
    caller = Caller.from_claims({**caller.token(), "exp": 1_900_000_000})
    metadata = _metadata(caller, method)
    struct = struct_pb2.Struct()
    if as_json:
        struct.update({CONTEXT_KEY: orjson.dumps(metadata).decode()})
    else:
        struct.CopyFrom(allowed({}, metadata=metadata).dynamic_metadata)
    decoded = parse_caller_context({NAMESPACE: struct}).caller
    assert decoded == Caller(caller.sub, issuer=caller.issuer, tenant=caller.tenant,
                             client_id=caller.client_id if method != "tools/call" else None,
                             roles=caller.roles, scope=caller.scope)
    if method == "tools/call":
        assert decoded.claims == {}
    else:
        assert decoded.token() == caller.token()


@pytest.mark.parametrize("token", ["{", "[]", '{"sub": "root"}', "x" * 20_000])
def test_metadata_claims_must_be_this_callers(token: str) -> None:
    """Claims that are not JSON, not an object, another subject's or oversized fail closed."""
    metadata = {**_metadata(Caller("alice"), "tools/list"), "token": token}
    struct = struct_pb2.Struct()
    struct.update(metadata)
    with pytest.raises(MetadataInvalid):
        parse_caller_context({NAMESPACE: struct})


def test_session_owner_encoding_round_trips() -> None:
    for owner in (SessionOwner("i", "s", "t"), SessionOwner("i", "s"), SessionOwner(None, None)):
        assert SessionOwner.decode(owner.encode()) == owner
