"""Streamable HTTP transport: every bad input gets its HTTP status and JSON-RPC error, and the
server keeps answering afterwards."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import orjson
import pytest

from mcp_servers.core import ServerSettings
from mcp_servers.core.settings import LOOPBACK_HOSTS
from tests.mcp_servers.core.conftest import Served, start

PING = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call"}', 400, -32700),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"a":' + b"[" * 100 + b"]" * 100 + b"}}",
            400,
            -32700,
        ),
        (b'{"jsonrpc":"2.0","id":1,"method":"p\xffing"}', 400, -32700),
        (b'{"jsonrpc":"2.0","id":1,"method":"ping"', 400, -32700),
        (b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]', 400, -32600),
        (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', 400, -32600),
        (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', 400, -32600),
    ],
    ids=["duplicate-keys", "deep-nesting", "invalid-utf8", "truncated", "batch", "bad-version", "bool-id"],
)
async def test_malformed_bodies_are_rejected(served: Served, body: bytes, status: int, code: int) -> None:
    """Duplicate keys, deep nesting, invalid UTF-8, batches: clear error, right status, server lives."""
    await served.client.initialize()
    got_status, got = await served.client.raw(body)
    assert got_status == status
    assert got["error"]["code"] == code
    assert await served.client.ping_ok()


async def test_oversized_body_gets_413(served: Served) -> None:
    """A body over max_body_bytes is refused with 413 before it is parsed."""
    await served.client.initialize()
    big = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"' + b"a" * (5 * 1024 * 1024) + b'"}}'

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    for payload in (io.BytesIO(big), chunked()):  # with and without Content-Length
        async with served.http.post(served.url, data=payload, headers=served.client.headers()) as resp:
            assert resp.status == 413
            body = await resp.json()
        assert body["error"]["code"] == -32700
        assert body["error"]["data"]["reason"] == "payload_too_large"
    assert await served.client.ping_ok()


async def test_bad_origin_is_forbidden(served: Served) -> None:
    """A browser Origin that is neither allowed nor a loopback host gets 403."""
    await served.client.initialize()
    status, body = await served.client.raw(PING, served.client.headers({"Origin": "https://evil.example"}))
    assert status == 403
    assert body["error"]["data"]["reason"] == "origin_not_allowed"
    status, _ = await served.client.raw(PING, served.client.headers({"Origin": "http://localhost:3000"}))
    assert status == 200
    assert await served.client.ping_ok()


async def test_bad_host_is_rejected(served: Served) -> None:
    """A Host header that is not an allowed name (DNS rebinding) gets 421."""
    await served.client.initialize()
    status, body = await served.client.raw(PING, served.client.headers({"Host": "evil.example:80"}))
    assert status == 421
    assert body["error"]["data"]["reason"] == "host_not_allowed"
    assert await served.client.ping_ok()


async def test_host_forwarded_by_the_dev_gateway_is_accepted(served: Served) -> None:
    """Envoy forwards the public Host (127.0.0.1:8443 in the dev stack): loopback names pass by default."""
    await served.client.initialize()
    for host in ("127.0.0.1:8443", "localhost:8443", "[::1]:8443"):
        status, _ = await served.client.raw(PING, served.client.headers({"Host": host}))
        assert status == 200, host


async def test_allowed_hosts_admits_a_public_gateway_name() -> None:
    """--allowed-hosts adds the gateway's public name (port ignored); other names still get 421."""
    s = await start(ServerSettings(allowed_hosts=(*LOOPBACK_HOSTS, "mcp.example.com")))
    try:
        await s.client.initialize()
        status, _ = await s.client.raw(PING, s.client.headers({"Host": "mcp.example.com:443"}))
        assert status == 200
        status, _ = await s.client.raw(PING, s.client.headers({"Host": "evil.example.com"}))
        assert status == 421
    finally:
        await s.http.close()
        await s.runner.cleanup()


async def test_unsupported_protocol_version_gets_400(served: Served) -> None:
    """An MCP-Protocol-Version the server does not speak gets 400 and the supported list."""
    await served.client.initialize()
    status, body = await served.client.raw(
        PING, served.client.headers({"MCP-Protocol-Version": "1999-01-01"})
    )
    assert status == 400
    assert body["error"]["code"] == -32022
    assert "2025-11-25" in body["error"]["data"]["supported"]
    assert await served.client.ping_ok()


async def test_unknown_session_gets_404(served: Served) -> None:
    """A session id the server never issued is answered 404."""
    await served.client.initialize()
    status, body = await served.client.raw(PING, served.client.headers({"Mcp-Session-Id": "nope"}))
    assert status == 404
    assert body["error"]["code"] == -32004
    assert await served.client.ping_ok()


async def test_deleted_session_gets_404(served: Served) -> None:
    """DELETE ends a session; any later use of it is 404, and a new initialize works."""
    await served.client.initialize()
    async with served.http.delete(served.url, headers=served.client.headers()) as resp:
        assert resp.status == 200
    status, body = await served.client.raw(PING)
    assert status == 404
    assert body["error"]["code"] == -32004
    await served.client.initialize()
    assert await served.client.ping_ok()


async def test_session_of_another_user_is_404(served: Served) -> None:
    """A session is bound to x-mcp-user: another user (or none) presenting it gets 404."""
    await served.client.initialize(user="alice")
    served.client.user = None
    for other in ({"x-mcp-user": "mallory"}, {}):
        status, body = await served.client.raw(PING, served.client.headers(other))
        assert status == 404, other
        assert body["error"]["code"] == -32004
    status, _ = await served.client.raw(PING, served.client.headers({"x-mcp-user": "alice"}))
    assert status == 200


async def test_missing_session_is_400(served: Served) -> None:
    """A pre-2026 request without a session (and without initialize) is a 400."""
    status, body = await served.client.raw(PING, served.client.headers())
    assert status == 400
    assert body["error"]["data"]["reason"] == "session_required"


@pytest.mark.parametrize(
    "headers",
    [{"Mcp-Method": "tools/list"}, {"Mcp-Method": "tools/call", "Mcp-Name": "other"}],
    ids=["method", "name"],
)
async def test_header_mismatch_gets_32020(served: Served, headers: dict[str, str]) -> None:
    """Mcp-Method / Mcp-Name that disagree with the body are rejected with -32020."""
    await served.client.initialize()
    body = orjson.dumps(
        {
            "jsonrpc": "2.0",
            "id": 5,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "x"}},
        }
    )
    status, got = await served.client.raw(body, served.client.headers(headers))
    assert status == 400
    assert got["error"]["code"] == -32020
    assert got["id"] == 5
    assert await served.client.ping_ok()


async def test_notifications_and_responses_get_202(served: Served) -> None:
    """Notifications and (unsolicited) responses are accepted with 202 and no body."""
    await served.client.initialize()
    for msg in (
        {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"},
        {"jsonrpc": "2.0", "id": "srv-unknown", "result": {}},
    ):
        async with served.http.post(
            served.url, data=orjson.dumps(msg), headers=served.client.headers()
        ) as resp:
            assert resp.status == 202
            assert await resp.read() == b""


async def test_wrong_content_type_and_accept(served: Served) -> None:
    """A non-JSON Content-Type is 415; an Accept without JSON or SSE is 406."""
    await served.client.initialize()
    status, _ = await served.client.raw(PING, served.client.headers({"Content-Type": "text/plain"}))
    assert status == 415
    status, _ = await served.client.raw(PING, served.client.headers({"Accept": "text/html"}))
    assert status == 406
    assert await served.client.ping_ok()


async def test_unsupported_http_method_is_405(served: Served) -> None:
    """PUT on the MCP endpoint is 405 with an Allow header."""
    async with served.http.put(served.url, headers={"Host": "127.0.0.1"}) as resp:
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]


async def test_initialize_negotiates_version(served: Served) -> None:
    """initialize echoes a supported version, falls back to 2025-11-25, and issues a visible-ASCII id."""
    data = await served.client.initialize("2025-06-18")
    assert data["result"]["protocolVersion"] == "2025-06-18"
    assert data["result"]["serverInfo"] == {"name": "core-test", "version": "9.9.9"}
    assert served.client.session_id is not None
    assert all(0x21 <= ord(c) <= 0x7E for c in served.client.session_id)
    data = await served.client.initialize("2024-01-01")
    assert data["result"]["protocolVersion"] == "2025-11-25"
