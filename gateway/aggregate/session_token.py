"""The aggregate session id: a sealed token, so any replica of Envoy, ext_authz or the
aggregator can serve the session without shared state.

``sid = base64url(kid[1] | nonce[12] | AES-256-GCM(key, nonce, json, aad))``, unpadded. The key
ring comes from a secret (comma-separated base64url 32-byte keys, newest first): a token is sealed
with the first key and opened with whichever key its ``kid`` names, so a new key is rolled out by
putting it first and an old one retired by removing it once the sessions it sealed have ended.
The ``kid`` is derived from the key (not its position), so reordering the ring never breaks a
token. A client can neither read, forge nor alter a token: any change fails authentication and
the id "does not exist" (404, as for an unknown session). The encoding is canonical (one string
per token), so an ended id cannot be revived under another spelling.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_VERSION = 1
SESSION_AAD = b"mcp-agg"
# Far above a session of a hundred servers (~60 characters per server), far below what a header
# can hold; checked before any decoding.
MAX_TOKEN_CHARS = 16 * 1024
LATE_JOIN_PREFIX = "mcpgw:agg:"
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


class InvalidSessionId(ValueError):
    """Not a token this gateway sealed with a key it still holds (or not a session at all)."""


class KeyRing:
    """AES-GCM over a ring of keys, newest first. ``seal``/``open`` take the associated data that
    separates one kind of token from another (a cursor never opens as a session)."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("the aggregate key ring is empty")
        ring: list[tuple[int, AESGCM]] = []
        for key in keys:
            if len(key) != KEY_BYTES:
                raise ValueError(f"an aggregate session key must be {KEY_BYTES} bytes, not {len(key)}")
            ring.append((key_id(key), AESGCM(key)))
        self._ring = tuple(ring)

    def seal(self, plaintext: bytes, aad: bytes) -> str:
        kid, aead = self._ring[0]
        nonce = os.urandom(_NONCE_BYTES)
        raw = bytes((kid,)) + nonce + aead.encrypt(nonce, plaintext, aad)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def open(self, token: str, aad: bytes) -> bytes:
        """The plaintext; raises InvalidSessionId for anything but a canonical token sealed with
        a key of the ring and the same ``aad``."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS \
                or _B64URL.fullmatch(token) is None:
            raise InvalidSessionId("not an aggregate token")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise InvalidSessionId("not an aggregate token") from None
        # Unused bits at the end of the last character make several spellings of one token.
        if len(raw) < 1 + _NONCE_BYTES + _TAG_BYTES \
                or base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != token:
            raise InvalidSessionId("not an aggregate token")
        kid, nonce, sealed = raw[0], raw[1:1 + _NONCE_BYTES], raw[1 + _NONCE_BYTES:]
        for ring_kid, aead in self._ring:
            if ring_kid != kid:
                continue
            try:
                return aead.decrypt(nonce, sealed, aad)
            except InvalidTag:
                continue  # two keys of the ring may share a kid: try the next
        raise InvalidSessionId("not an aggregate token")


def late_join_key(sid: str, server: str) -> str:
    """The shared-store key (Redis) under which the aggregator keeps the upstream session id of
    ``server`` when it joined the session ``sid`` after initialize; ext_authz reads it when the
    token's ``upstream`` lacks the server. Holds a hash, never the id itself."""
    return f"{LATE_JOIN_PREFIX}{hashlib.sha256(sid.encode()).hexdigest()[:32]}:{server}"


def key_id(key: bytes) -> int:
    """The one-byte key id a token carries: derived from the key, so stable across rotations."""
    return hashlib.sha256(b"mcp-agg-kid" + key).digest()[0]


def parse_keys(secret: str) -> tuple[bytes, ...]:
    """The key ring from the secret's value: comma-separated base64url keys, newest first."""
    keys = []
    for part in secret.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            key = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        except (binascii.Error, ValueError):
            raise ValueError("an aggregate session key is not base64url") from None
        if len(key) != KEY_BYTES:
            raise ValueError(f"an aggregate session key must be {KEY_BYTES} bytes, not {len(key)}")
        keys.append(key)
    if not keys:
        raise ValueError("the aggregate session key secret holds no key")
    return tuple(keys)


def new_key() -> str:
    """A fresh key as the secret spells it."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class AggregateSession:
    """One client session on an aggregate endpoint. ``issuer``/``subject``/``tenant`` name its
    owner (``gateway.caller.SessionOwner``); ``view`` is the view's name; ``upstream`` maps each
    server to the session id its upstream issued (servers that were down at initialize are
    absent); ``issued_at`` in seconds since the epoch."""

    issuer: str | None
    subject: str | None
    tenant: str | None
    view: str
    protocol_version: str
    capabilities: Mapping[str, Any] = field(default_factory=dict)
    upstream: Mapping[str, str] = field(default_factory=dict)
    issued_at: int = 0

    def to_json(self) -> bytes:
        return orjson.dumps({
            "v": _VERSION, "iss": self.issuer, "sub": self.subject, "tenant": self.tenant,
            "view": self.view, "pv": self.protocol_version, "caps": dict(self.capabilities),
            "ups": dict(self.upstream), "iat": self.issued_at})

    @classmethod
    def from_json(cls, raw: bytes) -> AggregateSession:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidSessionId("not an aggregate token") from None
        if not isinstance(doc, dict) or doc.get("v") != _VERSION:
            raise InvalidSessionId("an aggregate token of an unknown version")
        ups, caps, iat = doc.get("ups"), doc.get("caps"), doc.get("iat")
        if not (_opt_str(doc.get("iss")) and _opt_str(doc.get("sub")) and _opt_str(doc.get("tenant"))
                and isinstance(doc.get("view"), str) and isinstance(doc.get("pv"), str)
                and isinstance(caps, dict) and isinstance(ups, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in ups.items())
                and isinstance(iat, int) and not isinstance(iat, bool)):
            raise InvalidSessionId("an aggregate token with a malformed payload")
        return cls(issuer=doc["iss"], subject=doc["sub"], tenant=doc["tenant"], view=doc["view"],
                   protocol_version=doc["pv"], capabilities=caps, upstream=ups, issued_at=iat)


class SessionSealer:
    """Seals and opens :class:`AggregateSession` tokens with one key ring (newest key first)."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        self.ring = KeyRing(keys)

    def seal(self, session: AggregateSession) -> str:
        return self.ring.seal(session.to_json(), SESSION_AAD)

    def open(self, sid: str) -> AggregateSession:
        """The session; raises InvalidSessionId for an altered, foreign or malformed id."""
        return AggregateSession.from_json(self.ring.open(sid, SESSION_AAD))


def _opt_str(value: Any) -> bool:
    return value is None or isinstance(value, str)
