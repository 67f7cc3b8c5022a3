"""Sessions are bound to issuer + user + tenant (the gateway's identity headers, decoded once):
any other caller gets the answer of a session that does not exist, on POST, GET and DELETE."""

from __future__ import annotations

import pytest

from mcp_servers.core.transport import identity_value
from tests.mcp_servers.core.conftest import Served

PING = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
SESSION_NOT_FOUND = -32004
OWNER = {"x-mcp-issuer": "https://idp-a.test", "x-mcp-tenant": "acme"}
# What another caller with the session id changes; "" means the header is absent.
OTHERS = [
    pytest.param({"x-mcp-tenant": "globex"}, id="other-tenant"),
    pytest.param({"x-mcp-tenant": ""}, id="no-tenant"),
    pytest.param({"x-mcp-tenant": "ACME"}, id="tenant-case"),
    pytest.param({"x-mcp-issuer": "https://idp-b.test"}, id="other-issuer"),
    pytest.param({"x-mcp-issuer": ""}, id="no-issuer"),
    pytest.param({"x-mcp-user": "mallory"}, id="other-user"),
    pytest.param({"x-mcp-user": ""}, id="no-user"),
]


def _as(served: Served, changes: dict[str, str], accept: str | None = None) -> dict[str, str]:
    headers = served.client.headers() if accept is None else served.client.headers(accept=accept)
    for name, value in changes.items():
        if value:
            headers[name] = value
        else:
            headers.pop(name, None)
    return headers


@pytest.mark.parametrize("changes", OTHERS)
async def test_another_caller_cannot_use_the_session(served: Served, changes: dict[str, str]) -> None:
    """POST, GET and DELETE from anyone but the owner: 404 session_not_found; the owner carries on."""
    await served.client.initialize(user="alice", identity=OWNER)
    headers = _as(served, changes)
    status, body = await served.client.raw(PING, headers)
    assert status == 404 and body["error"]["code"] == SESSION_NOT_FOUND
    async with served.http.get(served.url, headers=_as(served, changes, "text/event-stream")) as resp:
        assert resp.status == 404
    async with served.http.delete(served.url, headers=headers) as resp:
        assert resp.status == 404
    assert await served.client.ping_ok()


async def test_a_foreign_session_looks_like_an_unknown_one(served: Served) -> None:
    """Another tenant's session and a session that never existed get the same answer."""
    await served.client.initialize(user="alice", identity=OWNER)
    foreign = await served.client.raw(PING, _as(served, {"x-mcp-tenant": "globex"}))
    unknown = await served.client.raw(PING, {**_as(served, {}), "Mcp-Session-Id": "never-issued"})
    assert foreign == unknown


async def test_percent_encoded_identity_is_decoded_once(served: Served) -> None:
    """Non-ASCII identity arrives percent-encoded; handlers and the binding see the decoded value."""
    await served.client.initialize(user="zo%C3%AB", identity={"x-mcp-tenant": "acm%C3%A9"})
    status, body = await served.client.call("tools/call", {"name": "whoami", "arguments": {}})
    assert status == 200
    assert body["result"]["structuredContent"]["user"] == "zoë"
    assert body["result"]["structuredContent"]["tenant"] == "acmé"


@pytest.mark.parametrize("spelling", ["%7Ao%C3%AB", "zo%c3%ab", "zo%C3%AB%", "zo%FF", "zo%zz"],
                         ids=["encoded-ascii", "lower-hex", "dangling", "not-utf8", "bad-hex"])
async def test_other_spellings_of_an_identity_are_refused(served: Served, spelling: str) -> None:
    """Only the gateway's own encoding is accepted: another spelling of a user is 400, never a match."""
    await served.client.initialize(user="zo%C3%AB")
    status, body = await served.client.raw(PING, served.client.headers({"x-mcp-user": spelling}))
    assert status == 400 and body["error"]["data"]["reason"] == "invalid_identity_header"
    assert await served.client.ping_ok()


def test_identity_value_inverts_the_gateway_encoding() -> None:
    """Plain values pass unchanged; %25 is a literal "%"; UTF-8 escapes decode."""
    assert identity_value(None) is None
    assert identity_value("alice@example.com") == "alice@example.com"
    assert identity_value("100%25") == "100%"
    assert identity_value("%E2%82%AC") == "€"
