"""Server-to-client SSE event streams with replay (SEP-1699 polling and resumption).

A stream outlives the HTTP connection that carries it: when the client disconnects (or the server
closes the connection on purpose to make the client poll), events keep buffering and a GET with
``Last-Event-ID`` picks up where the client left off. Event ids are ``<stream id>.<sequence>``,
so the stream is found from the id alone.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson


def new_token(nbytes: int = 24) -> str:
    """A cryptographically random id of visible ASCII (URL-safe base64)."""
    return secrets.token_urlsafe(nbytes)


def encode_event(event_id: str, data: bytes) -> bytes:
    return b"id: " + event_id.encode("ascii") + b"\nevent: message\ndata: " + data + b"\n\n"


def find_stream(streams: Mapping[str, EventStream], event_id: str) -> tuple[EventStream, int] | None:
    """The stream a ``Last-Event-ID`` (``<stream id>.<sequence>``) names among ``streams``, and the
    sequence to resume after; None for an id no stream of the session issued."""
    stream_id, _, seq = event_id.rpartition(".")
    stream = streams.get(stream_id)
    if stream is None or not seq.isdigit():
        return None
    return stream, int(seq)


class EventStream:
    """One ordered stream of server-to-client messages."""

    def __init__(self, *, max_buffered: int, standalone: bool = False) -> None:
        self.id = new_token(12)
        self.standalone = standalone
        self._seq = 0
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=max_buffered)
        self._changed = asyncio.Condition()
        self._first = asyncio.Event()
        self.finished = False
        self.attached = False
        self._detach_at: int | None = None

    @property
    def has_events(self) -> bool:
        return self._first.is_set()

    def event_id(self, seq: int) -> str:
        return f"{self.id}.{seq}"

    async def publish(self, message: dict[str, Any]) -> None:
        if self.finished:
            return
        self._seq += 1
        self._buffer.append((self._seq, orjson.dumps(message)))
        self._first.set()
        async with self._changed:
            self._changed.notify_all()

    async def finish(self) -> None:
        self.finished = True
        self._first.set()
        async with self._changed:
            self._changed.notify_all()

    async def detach(self) -> None:
        """Close the current HTTP connection but keep the stream for a later resumption."""
        self._detach_at = self._seq
        self._first.set()
        async with self._changed:
            self._changed.notify_all()

    async def wait_first(self) -> None:
        await self._first.wait()

    @property
    def delivered_all(self) -> bool:
        return self.finished and not self.attached

    async def follow(self, after: int, keepalive: float) -> AsyncIterator[tuple[int, bytes] | None]:
        """Yield buffered then live events after sequence ``after``; ``None`` is a keep-alive tick.

        Ends when the stream is finished and drained, or when :meth:`detach` was called.
        """
        self.attached = True
        try:
            while True:
                limit = self._detach_at if self._detach_at is not None else self._seq
                pending = [(s, d) for s, d in self._buffer if after < s <= limit]
                for seq, data in pending:
                    yield seq, data
                    after = seq
                if self._detach_at is not None and after >= self._detach_at:
                    # Events published after the detach point wait for the resumption.
                    self._detach_at = None
                    return
                if pending:
                    continue
                if self.finished:
                    return
                idle = False
                async with self._changed:
                    if not (self._seq > after or self.finished or self._detach_at is not None):
                        try:
                            await asyncio.wait_for(self._changed.wait(), keepalive)
                        except TimeoutError:
                            idle = True
                if idle:
                    yield None
        finally:
            self.attached = False
