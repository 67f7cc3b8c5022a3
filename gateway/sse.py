"""Incremental ``text/event-stream`` parsing and serialization for response filters.

A filter feeds body chunks as they arrive (events may be cut anywhere, even inside a UTF-8
character or between the CR and LF of one line ending), gets back each complete event, transforms
its ``data`` and re-emits it; the incomplete tail stays buffered. The buffer is bounded: past
``max_buffer`` bytes :class:`SseError` is raised so the caller fails closed instead of either
growing without limit or passing unparsed bytes through.

Parsing follows the WHATWG event-stream rules (CRLF, LF or CR line endings; ``:`` comments; one
leading space stripped from values; ``id`` with NUL ignored; non-digit ``retry`` ignored; a leading
BOM skipped), except that invalid UTF-8 is an error rather than replaced, because the re-serialized
stream must say exactly what was inspected.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.errors import GatewayError

__all__ = ["DEFAULT_MAX_BUFFER", "SseError", "SseEvent", "SseParser", "SseTransformer", "serialize"]

DEFAULT_MAX_BUFFER = 4 * 1024 * 1024
_LINE_END = re.compile(rb"\r\n|\r|\n")


class SseError(GatewayError):
    """The event stream cannot be processed safely (too large, not UTF-8)."""

    code = "sse_error"
    http_status = 502


@dataclass(slots=True)
class SseEvent:
    """One event block: the fields that were present (``None`` when absent) and its comments."""

    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    def is_empty(self) -> bool:
        return (self.data is None and self.event is None and self.id is None and self.retry is None
                and not self.comments)


def _single_line(value: str, what: str) -> None:
    if "\n" in value or "\r" in value:
        raise SseError(f"an SSE {what} cannot contain a line break")


def serialize(event: SseEvent) -> bytes:
    """Encode one event with LF line endings, ended by a blank line."""
    lines: list[str] = []
    for comment in event.comments:
        _single_line(comment, "comment")
        lines.append(f":{comment}")
    if event.event is not None:
        _single_line(event.event, "event name")
        lines.append(f"event: {event.event}")
    if event.id is not None:
        _single_line(event.id, "id")
        lines.append(f"id: {event.id}")
    if event.retry is not None:
        lines.append(f"retry: {int(event.retry)}")
    if event.data is not None:
        # Each line of the data becomes one data: field; the parser joins them back with LF.
        lines.extend(f"data: {line}" for line in re.split(r"\r\n|\r|\n", event.data))
    if not lines:
        return b""
    return ("\n".join(lines) + "\n\n").encode("utf-8")


class SseParser:
    """Feed bytes, get complete events. Not thread-safe; one parser per stream."""

    def __init__(self, *, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self.max_buffer = max_buffer
        self._partial = bytearray()  # bytes of a line not yet ended
        self._skip_lf = False  # the previous chunk ended in CR: an LF right after it is the same ending
        self._start = True  # a BOM is skipped only at the very start of the stream
        self._current = SseEvent()
        self._data_lines: list[str] = []
        self._pending = 0  # bytes of complete lines that belong to the unfinished event

    @property
    def buffered(self) -> int:
        """Bytes held for the event in progress (the limit applies to this)."""
        return self._pending + len(self._partial)

    def feed(self, chunk: bytes) -> list[SseEvent]:
        events: list[SseEvent] = []
        if not chunk:
            return events
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buf = self._partial + chunk if self._partial else bytearray(chunk)
        if self._start:
            if len(buf) < 3 and b"\xef\xbb\xbf".startswith(bytes(buf)):
                self._partial = buf
                return events
            if buf.startswith(b"\xef\xbb\xbf"):
                del buf[:3]
            self._start = False
        pos = 0
        for m in _LINE_END.finditer(buf):
            if m.end() == len(buf) and m.group() == b"\r":
                self._skip_lf = True
            self._line(bytes(buf[pos:m.start()]), m.end() - pos, events)
            pos = m.end()
        self._partial = buf[pos:]
        if self.buffered > self.max_buffer:
            raise SseError(f"an SSE event exceeds the buffer limit of {self.max_buffer} bytes",
                           data={"limit": self.max_buffer})
        return events

    def close(self) -> SseEvent | None:
        """End of stream: the unterminated last event, if any (browsers would drop it).

        The caller decides: inspect and emit it, or drop it. It is never returned unparsed.
        """
        events: list[SseEvent] = []
        if self._partial:
            self._line(bytes(self._partial), len(self._partial), events)
            self._partial = bytearray()
        self._line(b"", 0, events)
        self._start = True
        return events[0] if events else None

    def _line(self, raw: bytes, size: int, events: list[SseEvent]) -> None:
        if not raw:
            ev = self._current
            if self._data_lines:
                ev.data = "\n".join(self._data_lines)
            if not ev.is_empty():
                events.append(ev)
            self._current = SseEvent()
            self._data_lines = []
            self._pending = 0
            return
        self._pending += size
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SseError("an SSE line is not valid UTF-8") from None
        if line[0] == ":":
            self._current.comments.append(line[1:])
            return
        name, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data_lines.append(value)
        elif name == "event":
            self._current.event = value
        elif name == "id":
            if "\0" not in value:
                self._current.id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._current.retry = int(value)
        # Unknown field names are ignored, as the standard says.


Transform = Callable[[SseEvent], "SseEvent | None"]


class SseTransformer:
    """Parse, transform and re-serialize a stream chunk by chunk.

    ``transform`` gets every complete event and returns the event to emit (possibly the same
    object, modified) or ``None`` to drop it. Exceptions propagate: the caller fails closed.
    """

    def __init__(self, transform: Transform, *, max_buffer: int = DEFAULT_MAX_BUFFER,
                 emit_unterminated: bool = True) -> None:
        self._parser = SseParser(max_buffer=max_buffer)
        self._transform = transform
        self._emit_unterminated = emit_unterminated

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        for event in self._parser.feed(chunk):
            result = self._transform(event)
            if result is not None:
                out += serialize(result)
        return bytes(out)

    def close(self) -> bytes:
        event = self._parser.close()
        if event is None or not self._emit_unterminated:
            return b""
        result = self._transform(event)
        return serialize(result) if result is not None else b""
