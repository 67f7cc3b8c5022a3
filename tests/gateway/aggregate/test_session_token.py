"""Sealed aggregate session ids: round trip, tampering, foreign keys, rotation, canonical form."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.aggregate.session_token import (
    MAX_TOKEN_CHARS,
    AggregateSession,
    InvalidSessionId,
    KeyRing,
    SessionSealer,
    new_key,
    parse_keys,
)

K1, K2, K3 = (bytes([i]) * 32 for i in (1, 2, 3))
SESSION = AggregateSession(
    issuer="https://idp", subject="alice", tenant="acme", view="", protocol_version="2025-11-25",
    capabilities={"elicitation": {}}, upstream={"files": "sid-1", "db": "abc=="}, issued_at=1700000000)


def test_round_trip() -> None:
    """What is sealed opens unchanged; the id is visible ASCII (base64url)."""
    sealer = SessionSealer([K1])
    sid = sealer.seal(SESSION)
    assert sealer.open(sid) == SESSION
    assert all("\x21" <= c <= "\x7e" for c in sid) and "=" not in sid


def test_same_session_seals_differently_each_time() -> None:
    """A fresh nonce per token: two seals of one session differ."""
    sealer = SessionSealer([K1])
    assert sealer.seal(SESSION) != sealer.seal(SESSION)


@given(st.builds(
    AggregateSession,
    issuer=st.none() | st.text(max_size=20), subject=st.none() | st.text(max_size=20),
    tenant=st.none() | st.text(max_size=20), view=st.text(max_size=10),
    protocol_version=st.text(max_size=12),
    capabilities=st.dictionaries(st.text(max_size=8), st.dictionaries(st.text(max_size=4), st.booleans())),
    upstream=st.dictionaries(st.text(max_size=10), st.text(max_size=40), max_size=4),
    issued_at=st.integers(min_value=0, max_value=2**40)))
def test_round_trip_any_session(session: AggregateSession) -> None:
    """Any text in any field survives sealing."""
    sealer = SessionSealer([K1])
    assert sealer.open(sealer.seal(session)) == session


def test_every_single_character_change_is_refused() -> None:
    """Altering any character of the id makes it not exist."""
    sealer = SessionSealer([K1])
    sid = sealer.seal(SESSION)
    for i in range(len(sid)):
        swapped = "A" if sid[i] != "A" else "B"
        with pytest.raises(InvalidSessionId):
            sealer.open(sid[:i] + swapped + sid[i + 1:])


@pytest.mark.parametrize("mutate", [
    lambda s: s[:-1], lambda s: s + "A", lambda s: s + "=", lambda s: s + "==", lambda s: "",
    lambda s: s.replace("-", "+").replace("_", "/") + "+/", lambda s: " " + s, lambda s: s[:20],
    lambda s: "A" * (MAX_TOKEN_CHARS + 1),
])
def test_malformed_ids_are_refused(mutate: object) -> None:
    """Truncated, extended, padded, other-alphabet or oversized ids are refused."""
    sealer = SessionSealer([K1])
    with pytest.raises(InvalidSessionId):
        sealer.open(mutate(sealer.seal(SESSION)))  # type: ignore[operator]  # parametrized lambda


def test_non_canonical_spelling_of_a_valid_token_is_refused() -> None:
    """Unused trailing bits set differently decode to the same bytes but are another spelling:
    refused, so an ended id cannot come back under a second name."""
    sealer = SessionSealer([K1])
    # The payload's length decides whether the last character has unused bits.
    sid = next(t for t in (sealer.seal(AggregateSession(None, "a" * n, None, "", "x"))
                           for n in range(3)) if len(t) % 4 in (2, 3))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = sid[:-1] + alphabet[alphabet.index(sid[-1]) ^ 1]  # the lowest bit is unused
    assert base64.urlsafe_b64decode(twin + "=" * (-len(twin) % 4)) == \
        base64.urlsafe_b64decode(sid + "=" * (-len(sid) % 4))
    assert sealer.open(sid).subject is not None
    with pytest.raises(InvalidSessionId):
        sealer.open(twin)


def test_foreign_key_is_refused() -> None:
    """A token sealed by another gateway's key does not open."""
    with pytest.raises(InvalidSessionId):
        SessionSealer([K2]).open(SessionSealer([K1]).seal(SESSION))


def test_key_rotation() -> None:
    """A new key goes first: old tokens still open, new ones use the new key; once the old key is
    removed its tokens stop opening, and reordering the ring changes nothing."""
    old = SessionSealer([K1]).seal(SESSION)
    rotated = SessionSealer([K2, K1])
    new = rotated.seal(SESSION)
    assert rotated.open(old) == SESSION and rotated.open(new) == SESSION
    assert SessionSealer([K2]).open(new) == SESSION
    with pytest.raises(InvalidSessionId):
        SessionSealer([K1]).open(new)
    with pytest.raises(InvalidSessionId):
        SessionSealer([K2, K3]).open(old)
    assert SessionSealer([K3, K1, K2]).open(old) == SESSION


def test_cursor_aad_does_not_open_as_session() -> None:
    """Data sealed under other associated data is not a session."""
    ring = KeyRing([K1])
    token = ring.seal(SESSION.to_json(), b"mcp-agg-cursor")
    with pytest.raises(InvalidSessionId):
        SessionSealer([K1]).open(token)


@pytest.mark.parametrize("payload", [
    b"not json", b"[]", b'{"v":2}', b'{"v":1,"iss":null,"sub":"a","tenant":null,"view":"",'
    b'"pv":"x","caps":{},"ups":{"a":1},"iat":0}',
    b'{"v":1,"iss":null,"sub":"a","tenant":null,"view":"","pv":"x","caps":{},"ups":{},"iat":true}',
])
def test_malformed_payload_is_refused(payload: bytes) -> None:
    """A well-sealed payload of the wrong shape is refused, not half-read."""
    token = KeyRing([K1]).seal(payload, b"mcp-agg")
    with pytest.raises(InvalidSessionId):
        SessionSealer([K1]).open(token)


def test_key_ring_checks_keys() -> None:
    """An empty ring or a key of the wrong size is a configuration error."""
    with pytest.raises(ValueError):
        SessionSealer([])
    with pytest.raises(ValueError):
        SessionSealer([b"short"])


def test_parse_keys() -> None:
    """The secret is comma-separated base64url keys, newest first."""
    a, b = new_key(), new_key()
    keys = parse_keys(f"{a}, {b},")
    assert len(keys) == 2 and all(len(k) == 32 for k in keys)
    assert base64.urlsafe_b64encode(keys[0]).rstrip(b"=").decode() == a
    for bad in ("", " , ", "not base64!", base64.urlsafe_b64encode(b"x" * 16).decode()):
        with pytest.raises(ValueError):
            parse_keys(bad)


def test_size_stays_small() -> None:
    """About 300 characters for three servers, as the design budgets."""
    three = AggregateSession(issuer="https://idp.example.com", subject="alice@example.com",
                             tenant="acme", view="", protocol_version="2025-11-25",
                             capabilities={"elicitation": {}, "roots": {"listChanged": True}},
                             upstream={s: "0123456789abcdef0123456789abcdef" for s in ("a", "b", "c")},
                             issued_at=1700000000)
    assert len(SessionSealer([K1]).seal(three)) < 450


def test_late_join_key() -> None:
    """The store key hashes the id, names the server, and differs per session and server."""
    from gateway.aggregate.session_token import late_join_key
    key = late_join_key("sid-1", "files")
    assert key.startswith("mcpgw:agg:") and key.endswith(":files") and "sid-1" not in key
    assert len({key, late_join_key("sid-2", "files"), late_join_key("sid-1", "db")}) == 3
