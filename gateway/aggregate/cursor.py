"""Sealed pagination cursors of merged lists on an aggregate endpoint.

One client page is one upstream page: the cursor says which list, for which view and owner, at
which server (its index in the view's server order) and with which upstream cursor to go on. It is
sealed with the session key ring under its own associated data, so a client can neither read nor
alter it, a cursor never opens as a session id (nor the reverse), and another caller's cursor is
refused. Anything that does not open is :class:`InvalidCursor` (JSON-RPC -32602).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from gateway.aggregate.session_token import InvalidSessionId, SessionSealer

CURSOR_AAD = b"mcp-agg-cursor"
_VERSION = 1


class InvalidCursor(ValueError):
    """A cursor this gateway did not seal, sealed for another list, view or owner, or altered."""


@dataclass(frozen=True, slots=True)
class ListCursor:
    """``owner``: an opaque text naming the caller (``SessionOwner.encode()`` decoded), compared
    for equality only; ``server``: index into the view's servers; ``upstream``: that server's
    cursor for its next page (None: its first page)."""

    method: str
    view: str
    owner: str
    server: int
    upstream: str | None = None


def seal_cursor(sealer: SessionSealer, cursor: ListCursor) -> str:
    payload = orjson.dumps({"v": _VERSION, "m": cursor.method, "view": cursor.view,
                            "own": cursor.owner, "i": cursor.server, "up": cursor.upstream})
    return sealer.ring.seal(payload, CURSOR_AAD)


def open_cursor(sealer: SessionSealer, value: str, *, method: str | None = None,
                view: str | None = None, owner: str | None = None) -> ListCursor:
    """The cursor; InvalidCursor when it does not open, or when ``method``/``view``/``owner`` are
    given and it was sealed for others."""
    try:
        raw = sealer.ring.open(value, CURSOR_AAD)
    except InvalidSessionId:
        raise InvalidCursor("invalid cursor") from None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidCursor("invalid cursor") from None
    if not isinstance(doc, dict) or doc.get("v") != _VERSION:
        raise InvalidCursor("invalid cursor")
    m, v, own, i, up = doc.get("m"), doc.get("view"), doc.get("own"), doc.get("i"), doc.get("up")
    if not (isinstance(m, str) and isinstance(v, str) and isinstance(own, str)
            and isinstance(i, int) and not isinstance(i, bool) and i >= 0
            and (up is None or isinstance(up, str))):
        raise InvalidCursor("invalid cursor")
    cursor = ListCursor(method=m, view=v, owner=own, server=i, upstream=up)
    if (method is not None and cursor.method != method) or (view is not None and cursor.view != view) \
            or (owner is not None and cursor.owner != owner):
        raise InvalidCursor("invalid cursor")
    return cursor
