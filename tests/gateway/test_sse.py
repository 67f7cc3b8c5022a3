"""Incremental SSE parsing, serialization and transformation."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pii import Masker, mask_jsonrpc_response
from gateway.sse import SseError, SseEvent, SseParser, SseTransformer, serialize


def parse_all(chunks: list[bytes], **kw: int) -> list[SseEvent]:
    parser = SseParser(**kw)
    events = []
    for c in chunks:
        events.extend(parser.feed(c))
    return events


def test_fields_comments_and_multiline_data() -> None:
    """id/event/retry/data fields, comments and multi-line data are parsed per the standard."""
    body = (b": keep-alive\nevent: message\nid: 7\nretry: 1500\ndata: {\"a\":\ndata:  1}\n\n"
            b"data\n\ndata:x\nunknown: y\nid: a\0b\nretry: 1s\n\n")
    events = parse_all([body])
    assert events == [
        SseEvent(data='{"a":\n 1}', event="message", id="7", retry=1500, comments=[" keep-alive"]),
        SseEvent(data=""),
        SseEvent(data="x"),
    ]


def test_all_line_endings() -> None:
    """CRLF, LF and lone CR end lines; a CR at a chunk end followed by LF is one ending."""
    assert parse_all([b"data: a\r\n\r\ndata: b\r\rdata: c\n\n"]) == [
        SseEvent(data="a"), SseEvent(data="b"), SseEvent(data="c")]
    assert parse_all([b"data: a\r", b"\n", b"\r", b"\ndata: b\n\n"]) == [
        SseEvent(data="a"), SseEvent(data="b")]


def test_event_cut_inside_utf8_character() -> None:
    """A chunk boundary inside a multi-byte character is fine."""
    raw = "data: héllo 中文\n\n".encode()
    chunks = [raw[i:i + 1] for i in range(len(raw))]
    assert parse_all(chunks) == [SseEvent(data="héllo 中文")]


def test_leading_bom_is_skipped_even_when_split() -> None:
    """A UTF-8 byte-order mark at the very start is ignored, even split over chunks."""
    assert parse_all([b"\xef", b"\xbb", b"\xbfdata: x\n\n"]) == [SseEvent(data="x")]


def test_invalid_utf8_fails_closed() -> None:
    """Bytes that are not UTF-8 raise instead of being replaced or passed through."""
    with pytest.raises(SseError) as info:
        parse_all([b"data: \xff\n\n"])
    assert info.value.code == "sse_error"


def test_buffer_limit() -> None:
    """An event larger than the buffer limit raises; complete events do not count against it."""
    parser = SseParser(max_buffer=64)
    for _ in range(100):
        assert parser.feed(b"data: " + b"x" * 40 + b"\n\n") == [SseEvent(data="x" * 40)]
    parser.feed(b"data: " + b"y" * 40 + b"\n")
    with pytest.raises(SseError) as info:
        parser.feed(b"data: " + b"y" * 40)
    assert info.value.data == {"limit": 64}


def test_close_returns_unterminated_event() -> None:
    """At end of stream the unterminated last event is returned for the caller to handle."""
    parser = SseParser()
    assert parser.feed(b"data: 1\n\ndata: 2") == [SseEvent(data="1")]
    assert parser.close() == SseEvent(data="2")
    assert SseParser().close() is None


def test_serialize_round_trip_and_line_breaks() -> None:
    """Serialized events parse back to the same events; multi-line data becomes several fields."""
    ev = SseEvent(data="line1\nline2", event="message", id="9", retry=10, comments=["c"])
    raw = serialize(ev)
    assert raw == b":c\nevent: message\nid: 9\nretry: 10\ndata: line1\ndata: line2\n\n"
    assert parse_all([raw]) == [ev]
    with pytest.raises(SseError):
        serialize(SseEvent(id="a\nb"))


def test_transformer_masks_jsonrpc_events_across_chunks() -> None:
    """A filter masks each event's JSON-RPC data and keeps the incomplete tail buffered."""
    masker = Masker(["email", "card"])

    def mask(event: SseEvent) -> SseEvent:
        if event.data:
            msg, _ = mask_jsonrpc_response(orjson.loads(event.data), masker)
            event.data = orjson.dumps(msg).decode()
        return event

    result = {"jsonrpc": "2.0", "id": 1, "result": {"content": [
        {"type": "text", "text": "jane@example.com paid with 4111 1111 1111 1111"}]}}
    body = b": ping\n\nevent: message\r\nid: 1\r\ndata: " + orjson.dumps(result) + b"\r\n\r\n"
    tx = SseTransformer(mask)
    out = bytearray()
    for i in range(0, len(body), 7):
        out += tx.feed(body[i:i + 7])
    out += tx.close()
    events = parse_all([bytes(out)])
    assert events[0] == SseEvent(comments=[" ping"])
    assert events[1].event == "message" and events[1].id == "1"
    assert orjson.loads(events[1].data or "")["result"]["content"][0]["text"] == \
        "[REDACTED:email] paid with [REDACTED:card]"
    assert b"jane" not in out and b"4111" not in out


def test_transformer_drop_and_unterminated() -> None:
    """Returning None drops an event; the unterminated tail is transformed (or dropped) at close."""
    tx = SseTransformer(lambda e: None if e.data == "drop" else e)
    assert tx.feed(b"data: drop\n\ndata: keep\n\ndata: tail") == b"data: keep\n\n"
    assert tx.close() == b"data: tail\n\n"
    tx2 = SseTransformer(lambda e: e, emit_unterminated=False)
    tx2.feed(b"data: tail")
    assert tx2.close() == b""


# --- property: chunking never changes the events -------------------------------------------------
VALUE = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"],
                                       exclude_characters="\r\n\0"), max_size=20)
EVENTS = st.lists(st.builds(
    SseEvent,
    data=st.none() | st.lists(VALUE, min_size=1, max_size=3).map("\n".join),
    event=st.none() | VALUE, id=st.none() | VALUE, retry=st.none() | st.integers(0, 10**6),
    comments=st.lists(VALUE, max_size=2)).filter(lambda e: not e.is_empty()), max_size=6)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[SseEvent], bytes]:
    """Events and one encoding of them with a random line ending per line."""
    events = draw(EVENTS)
    lines: list[str] = []
    for ev in events:
        lines.extend(serialize(ev).decode().split("\n")[:-2])
        lines.append("")
    out: list[str] = []
    prev = ""
    for line in lines:
        ending = draw(st.sampled_from(["\n", "\r\n", "\r"]))
        # CR then a blank line ended by LF reads as one CRLF ending: the format cannot say that.
        if prev == "\r" and line == "" and ending == "\n":
            ending = "\r"
        out.append(line + ending)
        prev = ending
    return events, "".join(out).encode()


@settings(max_examples=300)
@given(stream=streams(), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_any_chunking_yields_the_same_events(stream: tuple[list[SseEvent], bytes],
                                             cuts: list[int]) -> None:
    """However the body is split into chunks, the parser yields exactly the encoded events."""
    events, raw = stream
    points = sorted({c % (len(raw) + 1) for c in cuts})
    chunks = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    assert parse_all(chunks) == events
    assert parse_all([raw]) == events
