"""NDJSON framing of a child's stdout: lines, limits and strict parsing."""

from __future__ import annotations

import pytest

from gateway.errors import GatewayError
from mcp_bridge.framing import LineDecoder, LineTooLong, SkipBudget, decode_message, encode_message


def test_partial_lines_join_across_chunks() -> None:
    """A message split over reads comes out once, whole; blank lines and CR are dropped."""
    decoder = LineDecoder(100)
    assert decoder.feed(b'{"a":') == []
    assert decoder.feed(b'1}\r\n\n{"b"') == [b'{"a":1}']
    assert decoder.pending == 4
    assert decoder.feed(b":2}\n") == [b'{"b":2}']
    assert decoder.pending == 0


def test_oversize_line_is_fatal_with_or_without_newline() -> None:
    """More than the limit without a newline, or a complete line over it, raises LineTooLong."""
    with pytest.raises(LineTooLong) as unfinished:
        LineDecoder(8).feed(b"x" * 9)
    assert unfinished.value.limit == 8
    with pytest.raises(LineTooLong):
        LineDecoder(8).feed(b"x" * 9 + b"\n")
    assert LineDecoder(8).feed(b"x" * 8 + b"\n") == [b"x" * 8]


@pytest.mark.parametrize("line", [b"Starting server...", b"[1, 2]", b'{"jsonrpc":"2.0"}',
                                  b'{"jsonrpc":"2.0","id":1,"method":"a","method":"b"}'])
def test_non_json_rpc_lines_are_refused(line: bytes) -> None:
    """Text, batches, shapeless objects and duplicate keys are not messages."""
    with pytest.raises(GatewayError):
        decode_message(line, 1000)


def test_message_round_trip() -> None:
    """encode_message writes one line that decode_message reads back."""
    message = {"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {}}
    line = encode_message(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_message(line.rstrip(b"\n"), 1000) == message


def test_skip_budget_limits_logged_lines() -> None:
    """Past the per-minute budget bad lines are counted, not logged."""
    budget = SkipBudget(2)
    assert [budget.allow() for _ in range(4)] == [True, True, False, False]
    assert budget.suppressed == 2
