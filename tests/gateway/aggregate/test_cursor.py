"""Sealed list cursors: round trip, tampering, and a cursor of another list, view or owner."""

from __future__ import annotations

import pytest

from gateway.aggregate.cursor import InvalidCursor, ListCursor, open_cursor, seal_cursor
from gateway.aggregate.session_token import AggregateSession, SessionSealer

K1, K2 = bytes([1]) * 32, bytes([2]) * 32
CURSOR = ListCursor(method="tools/list", view="", owner='["https://idp","alice",null]', server=2,
                    upstream="page-2")


def test_round_trip() -> None:
    """A cursor opens unchanged, with or without the checks of its list, view and owner."""
    sealer = SessionSealer([K1])
    token = seal_cursor(sealer, CURSOR)
    assert open_cursor(sealer, token) == CURSOR
    assert open_cursor(sealer, token, method="tools/list", view="", owner=CURSOR.owner) == CURSOR
    first = ListCursor("prompts/list", "ops", "o", 0)
    assert open_cursor(sealer, seal_cursor(sealer, first)) == first


@pytest.mark.parametrize("check", [{"method": "prompts/list"}, {"view": "ops"}, {"owner": "bob"}])
def test_cursor_of_another_list_view_or_owner_is_refused(check: dict[str, str]) -> None:
    """A cursor replayed on another list, view or by another caller is invalid."""
    sealer = SessionSealer([K1])
    with pytest.raises(InvalidCursor):
        open_cursor(sealer, seal_cursor(sealer, CURSOR), **check)


def test_tampered_or_foreign_cursor_is_refused() -> None:
    """Altered cursors, cursors of another key and session ids are not cursors."""
    sealer = SessionSealer([K1])
    token = seal_cursor(sealer, CURSOR)
    altered = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    session = sealer.seal(AggregateSession(None, "a", None, "", "2025-11-25"))
    for bad in (altered, "", "abc", session, seal_cursor(SessionSealer([K2]), CURSOR)):
        with pytest.raises(InvalidCursor):
            open_cursor(sealer, bad)


def test_rotation_keeps_cursors() -> None:
    """A cursor sealed before a key rotation still opens after it."""
    token = seal_cursor(SessionSealer([K1]), CURSOR)
    assert open_cursor(SessionSealer([K2, K1]), token) == CURSOR
