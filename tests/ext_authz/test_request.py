"""Pure CheckRequest -> facts / policy input translation."""

from __future__ import annotations

import pytest

from ext_authz.errors import InvalidToken, MissingToken, TokenInQuery
from ext_authz.request import bearer_token, check_query, http_request, policy_input, server_of
from gateway.caller import Caller
from tests.ext_authz.conftest import check_request


def test_http_request_reads_captured_fixture() -> None:
    """Method, path, host, headers, raw body and source address come from the CheckRequest."""
    req = http_request(check_request("post_tools_call_files", "tok"))
    assert (req.method, req.path, req.host, req.scheme) == ("POST", "/mcp/files", "127.0.0.1:18931", "http")
    assert req.headers["authorization"] == "Bearer tok"
    assert req.body.startswith(b'{"jsonrpc":"2.0","id":7')
    assert req.source_address == "127.0.0.1" and req.id


@pytest.mark.parametrize("path,server", [
    ("/mcp/files", "files"), ("/mcp/files/", "files"), ("/mcp/files?x=1", "files"),
    ("/mcp/files/sub/path", "files"), ("/mcp/", None), ("/mcp", None), ("/other/files", None),
])
def test_server_of(path: str, server: str | None) -> None:
    """The server name is the path segment after /mcp/."""
    assert server_of(path) == server


def test_check_query_refuses_access_token() -> None:
    """access_token anywhere in the query string is refused; other parameters pass."""
    check_query("/mcp/files")
    check_query("/mcp/files?session=1&token_hint=2")
    for path in ("/mcp/files?access_token=abc", "/mcp/files?a=1&access_token=",
                 "/mcp/files?access%5Ftoken=x"):
        with pytest.raises(TokenInQuery):
            check_query(path)


def test_bearer_token_parsing() -> None:
    """Only one Bearer token (scheme case-insensitive) is accepted."""
    assert bearer_token({"authorization": "Bearer abc.def.ghi"}) == "abc.def.ghi"
    assert bearer_token({"authorization": "bearer  abc.def.ghi "}) == "abc.def.ghi"
    with pytest.raises(MissingToken):
        bearer_token({})
    with pytest.raises(MissingToken):
        bearer_token({"authorization": "  "})
    for value in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", "Bearer a.b.c,Bearer d.e.f"):
        with pytest.raises(InvalidToken):
            bearer_token({"authorization": value})


def test_policy_input_hides_credentials_and_handles_bodyless_requests() -> None:
    """Authorization and Cookie never reach the policy; GET has mcp.method null."""
    req = http_request(check_request("get_sse_stream", "tok", headers={"cookie": "sid=1"}))
    doc = policy_input(req, parsed_body=None, mcp=None, caller=Caller("a"), server="files",
                       resource="https://gw/mcp/files", now=12.7)
    headers = doc["attributes"]["request"]["http"]["headers"]
    assert "authorization" not in headers and "cookie" not in headers
    assert doc["mcp"]["method"] is None and doc["mcp"]["session_id"] == "3f1c2d9e8b7a4c56"
    assert doc["mcp"]["protocol_version"] == "2025-11-25"
    assert doc["parsed_body"] is None and doc["now"] == 12


def test_policy_input_carries_path_facts() -> None:
    """A tools/call with a path argument reaches the policy with mcp.facts for that path."""
    from gateway.jsonrpc import parse_message
    from gateway.mcp import extract_context
    from gateway.policy.facts import path_facts

    req = http_request(check_request("post_tools_call_files", "tok"))
    msg = parse_message(req.body)
    ctx = extract_context(msg, req.headers)
    doc = policy_input(req, parsed_body=msg.raw, mcp=ctx, caller=Caller("a"), server="files",
                       resource="https://gw/mcp/files", now=1)
    args = doc["mcp"]["arguments"]
    assert isinstance(args, dict) and "path" in args
    assert doc["mcp"]["facts"] == {"arguments": [path_facts(args["path"])]}
