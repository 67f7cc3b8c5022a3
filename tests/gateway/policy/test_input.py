"""build_policy_input: the document every decision sees."""

from __future__ import annotations

from gateway.caller import Caller
from gateway.jsonrpc import parse_message
from gateway.mcp import extract_context
from gateway.policy.input import build_policy_input


def test_input_shape_and_no_credentials() -> None:
    """The input has the documented sections and never carries the bearer token or cookies."""
    body = b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"stat","arguments":{"path":"a"}}}'
    msg = parse_message(body)
    headers = {"authorization": "Bearer secret", "cookie": "s=1", "mcp-session-id": "abc",
               "x-request-id": "r1"}
    ctx = extract_context(msg, headers)
    caller = Caller.from_claims({"sub": "alice", "roles": ["viewer"]})
    inp = build_policy_input(ctx, caller=caller, server_name="files",
                             server_resource="https://gw/mcp/files", body=msg.raw, headers=headers,
                             path="/mcp/files", request_id="r1", now=1764000000)
    http = inp["attributes"]["request"]["http"]
    assert "authorization" not in http["headers"] and "cookie" not in http["headers"]
    assert http["headers"]["mcp-session-id"] == "abc"
    assert inp["mcp"]["tool"] == "stat" and inp["mcp"]["arguments"] == {"path": "a"}
    assert inp["mcp"]["session_id"] == "abc"
    assert inp["token"]["sub"] == "alice"
    assert inp["server"] == {"name": "files", "resource": "https://gw/mcp/files"}
    assert inp["parsed_body"]["id"] == 3
    assert inp["now"] == 1764000000
    assert "session" not in inp


def test_input_carries_path_facts() -> None:
    """mcp.facts holds the facts of the path arguments (the same builder as ext_authz)."""
    body = (b'{"jsonrpc":"2.0","id":3,"method":"tools/call",'
            b'"params":{"name":"stat","arguments":{"path":"a/b"}}}')
    msg = parse_message(body)
    ctx = extract_context(msg, {})
    inp = build_policy_input(ctx, caller=Caller("alice"), server_name="files",
                             server_resource="https://gw/mcp/files", body=msg.raw, now=1)
    assert inp["mcp"]["facts"] == {"arguments": [{"well_formed": True, "prefixes": ["", "a", "a/b"]}]}
