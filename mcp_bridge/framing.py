"""Newline-delimited JSON-RPC on a child's stdout: bounded lines, strict parsing.

A line longer than the limit cannot be resynchronised safely (its tail would be read as the next
message), so it is fatal for the child. A line that is not one JSON-RPC message is logged and
skipped, at most ``per_minute`` times a minute, so a chatty server that prints to stdout can't
flood the logs.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.jsonrpc import parse_message


class LineTooLong(Exception):
    """The child wrote more than the limit without a newline."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a stdout line exceeds {limit} bytes ({size} buffered)")
        self.size = size
        self.limit = limit


class LineDecoder:
    """Split a byte stream into lines of at most ``max_line`` bytes (without the newline)."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        lines: list[bytes] = []
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            if end - start > self.max_line:
                raise LineTooLong(end - start, self.max_line)
            lines.append(bytes(self._buffer[start:end]).rstrip(b"\r"))
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > self.max_line:
            raise LineTooLong(len(self._buffer), self.max_line)
        return [line for line in lines if line.strip()]

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line (a partial line at EOF is dropped)."""
        return len(self._buffer)


def decode_message(line: bytes, max_bytes: int) -> dict[str, Any]:
    """One JSON-RPC message from a line, strictly parsed; raises GatewayError otherwise."""
    return parse_message(line, max_bytes=max_bytes + 1).raw


def encode_message(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message) + b"\n"


class SkipBudget:
    """How many bad lines may still be logged this minute."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._window = time.monotonic()
        self._count = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._window >= 60:
            self._window, self._count = now, 0
        self._count += 1
        if self._count > self.per_minute:
            self.suppressed += 1
            return False
        return True

