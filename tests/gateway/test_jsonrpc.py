"""Strict JSON-RPC parsing: every ambiguous or malformed body is rejected with a stable code."""

from __future__ import annotations

import pytest

from gateway.errors import GatewayError
from gateway.jsonrpc import parse_message


@pytest.mark.parametrize(
    ("body", "code", "status"),
    [
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call"}', "parse_error", 400),
        (b"[" * 100_000 + b"]" * 100_000, "parse_error", 400),
        (b'{"a":' * 100 + b"1" + b"}" * 100, "parse_error", 400),
        (b'{"jsonrpc":"2.0","id":1,"method":"\xff"}', "parse_error", 400),
        (b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"ping"}', "parse_error", 400),
        ('{"jsonrpc":"2.0","id":1,"method":"ping"}'.encode("utf-16"), "parse_error", 400),
        (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"\\ud800"}}', "parse_error", 400),
        (b'{"jsonrpc":"2.0","id":NaN,"method":"ping"}', "parse_error", 400),
        (b"not json", "parse_error", 400),
        (b"[]", "invalid_request", 400),
        (b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]', "invalid_request", 400),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', "invalid_request", 400),
        (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', "invalid_request", 400),
        (b'{"jsonrpc":"2.0","id":9999999999999999999,"method":"ping"}', "invalid_request", 400),
        (b'{"jsonrpc":"2.0","id":99999999999999999999,"method":"ping"}', "parse_error", 400),
        (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', "invalid_request", 400),
        (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":[1]}', "invalid_request", 400),
        (b'{"jsonrpc":"2.0","id":1}', "invalid_request", 400),
        (b"x" * (5 * 1024 * 1024), "payload_too_large", 413),
    ],
)
def test_rejects_bad_bodies(body: bytes, code: str, status: int) -> None:
    """Each malformed body maps to a stable error code and HTTP status."""
    with pytest.raises(GatewayError) as info:
        parse_message(body)
    assert info.value.code == code
    assert info.value.http_status == status


def test_escaped_method_is_decoded_before_use() -> None:
    """A unicode-escaped method name is the method it spells, never raw bytes."""
    msg = parse_message(b'{"jsonrpc":"2.0","id":"a","method":"\\u0074ools/call","params":{"name":"x"}}')
    assert msg.method == "tools/call"
    assert msg.kind == "request"


def test_kinds() -> None:
    """Requests, notifications and responses are told apart."""
    assert parse_message(b'{"jsonrpc":"2.0","method":"notifications/initialized"}').kind == "notification"
    assert parse_message(b'{"jsonrpc":"2.0","id":3,"result":{}}').kind == "response"
