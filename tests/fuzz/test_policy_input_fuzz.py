"""Property-based fuzzing of the policy input builders.

The request path is ext_authz's: ``http_request`` (CheckRequest -> HttpRequest), then the strict
parse, ``extract_context`` and ``policy_input`` exactly as the servicer chains them.
``gateway.policy.input.build_policy_input`` is the same document for ``mcp-gateway policy eval``.
"""

from __future__ import annotations

from typing import Any

import orjson
from envoy.service.auth.v3 import external_auth_pb2 as pb
from hypothesis import given
from hypothesis import strategies as st

from ext_authz.request import http_request, policy_input
from gateway.caller import Caller
from gateway.errors import GatewayError
from gateway.jsonrpc import parse_message
from gateway.mcp import McpContext, extract_context
from gateway.policy.input import build_policy_input
from tests.fuzz.strategies import FUZZ, json_ish_bytes, json_values

# Hypothesis never generates these strings by chance: if they appear in the input, a credential leaked.
TOKEN = "fuzz-secret-token-6f1d2c"
COOKIE = "session=fuzz-secret-cookie-93ab"
_CREDENTIALS = {"authorization": f"Bearer {TOKEN}", "proxy-authorization": f"Basic {TOKEN}", "cookie": COOKIE}
_CLAIMS = {"sub": "alice", "iss": "https://idp.example", "aud": "https://gw.example/mcp/files", "exp": 2**31}

_header_names = st.sampled_from(["mcp-method", "mcp-name", "mcp-protocol-version", "mcp-session-id",
                                 "x-request-id", "x-mcp-user", "content-type"]) \
    | st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=12)
_header_values = st.text(max_size=20)


def _bodies() -> st.SearchStrategy[bytes]:
    call = st.builds(
        lambda name, args, rid: orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call",
                                              "params": {"name": name, "arguments": args}}),
        st.text(max_size=10), st.dictionaries(st.text(max_size=5), json_values(max_leaves=4), max_size=3),
        st.integers(0, 10))
    return st.binary(max_size=200) | json_ish_bytes | call


def _check_request(headers: dict[str, str], body: bytes, raw_headers: bool) -> pb.CheckRequest:
    req = pb.CheckRequest()
    http = req.attributes.request.http
    http.id, http.method, http.path, http.host, http.scheme = "1", "POST", "/mcp/files", "gw", "https"
    if raw_headers:
        # encode_raw_headers: Envoy sends header_map entries with raw byte values.
        for name, value in headers.items():
            hv = http.header_map.headers.add()
            hv.key = name
            hv.raw_value = value.encode("utf-8")
    else:
        http.headers.update(headers)
    http.raw_body = body
    req.attributes.source.address.socket_address.address = "127.0.0.1"
    return req


def _build(check: pb.CheckRequest) -> dict[str, Any] | None:
    """The servicer's chain from CheckRequest to policy input; None when a GatewayError refuses it."""
    req = http_request(check)
    try:
        msg = parse_message(req.body)
        ctx = extract_context(msg, req.headers)
    except GatewayError:
        return None
    return policy_input(req, parsed_body=msg.raw, mcp=ctx, caller=Caller.from_claims(_CLAIMS), server="files",
                        resource="https://gw.example/mcp/files", now=1.0)


def _spelled(name: str, upper: list[bool]) -> str:
    return "".join(c.upper() if u else c for c, u in zip(name, upper + [False] * len(name), strict=False))


def _assert_no_credentials(doc: dict[str, Any]) -> None:
    headers = doc["attributes"]["request"]["http"]["headers"]
    assert not {k.lower() for k in headers} & set(_CREDENTIALS)
    dumped = orjson.dumps(doc)
    assert TOKEN.encode() not in dumped
    assert b"fuzz-secret-cookie" not in dumped


@FUZZ
@given(st.dictionaries(_header_names, _header_values, max_size=6), _bodies(), st.booleans())
def test_ext_authz_input_never_raises_and_hides_credentials(headers: dict[str, str], body: bytes,
                                                            raw_headers: bool) -> None:
    """Any body and headers: a GatewayError or an input without credentials (as Envoy sends headers)."""
    check = _check_request({**headers, **_CREDENTIALS}, body, raw_headers)
    doc = _build(check)
    if doc is not None:
        _assert_no_credentials(doc)
        assert doc["parsed_body"] is not None


@FUZZ
@given(st.sampled_from(sorted(_CREDENTIALS)), st.lists(st.booleans(), min_size=1, max_size=20))
def test_ext_authz_input_hides_credentials_in_any_case(name: str, upper: list[bool]) -> None:
    """A credential header is hidden from the policy whatever the case of its name."""
    spelled = _spelled(name, upper)
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    doc = _build(_check_request({spelled: _CREDENTIALS[name]}, body, raw_headers=False))
    assert doc is not None
    _assert_no_credentials(doc)


@FUZZ
@given(st.dictionaries(_header_names, _header_values, max_size=6), st.lists(st.booleans(), max_size=20),
       json_values(max_leaves=6), st.dictionaries(st.text(max_size=6), json_values(max_leaves=3), max_size=4))
def test_build_policy_input_hides_credentials(headers: dict[str, str], upper: list[bool], body: Any,
                                              claims: dict[str, Any]) -> None:
    """build_policy_input drops credential headers in any case and keeps the input JSON-encodable."""
    sent = {**headers, **{_spelled(k, upper): v for k, v in _CREDENTIALS.items()}}
    ctx = McpContext(kind="request", method="tools/list", id=1)
    caller = Caller.from_claims({**claims, "sub": "alice"})
    doc = build_policy_input(ctx, caller=caller, server_name="files",
                             server_resource="https://gw/mcp/files", body={"params": body},
                             headers=sent, now=0)
    _assert_no_credentials(doc)
    assert orjson.loads(orjson.dumps(doc)) == doc
