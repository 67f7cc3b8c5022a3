"""The caller assertion: a short-lived JWT the gateway signs for every allowed request, which an
upstream verifies instead of trusting bare identity headers (docs/identity.md).

ext_authz mints one per allowed request (:class:`AssertionSigner`, ES256 with the first key of
the gateway's key file; header ``kid``; the caller's scope and token expiry ride along as
``scope`` and ``caller_exp``, the assertion's own ``exp`` unchanged); Envoy forwards it in ``x-mcp-assertion``
(``gateway.wire.ASSERTION_HEADER``). An MCP server verifies it (:class:`AssertionVerifier`):
signature by a key of the gateway's published JWKS, ``iss`` = the gateway, ``aud`` = the
server's own resource id, ``exp`` with a small leeway, a lifetime of at most
:data:`MAX_TTL_SECONDS`, and a ``jti`` never seen before within its lifetime (a bounded replay
cache). The caller is built from the verified claims only.

The key file is a JWK set of private EC P-256 keys: the first signs, all are published (the
public halves, :meth:`KeyRing.public_jwks`), so a new key is published before it signs and an
old one stays published until every assertion it signed has expired (rotation:
docs/identity.md).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from jwt.algorithms import ECAlgorithm

from gateway.caller import MAX_ROLES, Caller
from gateway.config import ConfigError, IdentityConfig
from gateway.errors import UNAUTHORIZED, GatewayError

logger = logging.getLogger(__name__)

ALGORITHM = "ES256"
# The issue's bound: an assertion is good for a minute at most.
MAX_TTL_SECONDS = 60
DEFAULT_TTL_SECONDS = 60
# Clock skew tolerated on exp/iat between the gateway and a server.
DEFAULT_LEEWAY_SECONDS = 5
# An assertion is a few hundred bytes; anything much larger is not ours and is refused before
# any base64 or JSON work.
MAX_ASSERTION_BYTES = 8 * 1024
# jtis remembered per verifier; more live assertions than this within a lifetime (~1.6k/s
# sustained per server process) and new ones are refused rather than risking a replay.
DEFAULT_REPLAY_CACHE_SIZE = 100_000
# How often the signer looks at its key file for a change (one stat() per interval).
KEY_FILE_POLL_SECONDS = 2.0
MAX_KEY_FILE_BYTES = 256 * 1024
MAX_KEYS = 16
# Claim names beyond the registered ones.
CLAIM_TENANT = "tenant"
CLAIM_ROLES = "roles"
CLAIM_CLIENT_ID = "client_id"
CLAIM_DECISION_ID = "decision_id"
CLAIM_TOOL = "tool"
# The issuer of the client's token: a subject is unique only within its identity provider, so a
# server binding state to a user needs both (gateway.caller.SessionOwner).
CLAIM_CALLER_ISSUER = "caller_iss"
# The client token's OAuth scopes and expiry, for a server that acts for the caller (the workflow
# server, docs/workflows.md): it may grant only what the caller holds, and not for longer.
CLAIM_SCOPE = "scope"
CLAIM_CALLER_EXP = "caller_exp"
# The audit_redact obligation of the decision (gateway.telemetry.audit.REDACTABLE_FIELDS): the
# fields the server leaves out of its own audit entry of the call, as ext_authz does of its own.
CLAIM_AUDIT_REDACT = "audit_redact"
MAX_REDACT_FIELDS = 16
# A longer scope string is left out (the assertion must stay under MAX_ASSERTION_BYTES); a server
# that needs it then refuses to act for the caller.
MAX_SCOPE_CHARS = 4096
_REQUIRED = ["iss", "aud", "sub", "exp", "iat", "jti"]
# Who the gateway's own catalog fetch acts for (the bare-header form is
# gateway.catalog.client.CATALOG_IDENTITY).
CATALOG_CALLER = Caller(sub="system:mcp-gateway-catalog", roles=("gateway-catalog",),
                        client_id="mcp-gateway")


class InvalidAssertion(GatewayError):
    """An assertion the server refuses; ``code`` says why (logged, and the JSON-RPC error's
    ``data.reason``): missing, malformed, oversized, forged, unknown_kid, expired,
    wrong_audience, wrong_issuer, replayed, lifetime_too_long, invalid_claims,
    replay_cache_full, keys_unavailable."""

    code = "invalid_assertion"
    rpc_code = UNAUTHORIZED
    http_status = 401

    def __init__(self, message: str, *, code: str, http_status: int = 401) -> None:
        super().__init__(message, code=code, http_status=http_status)


class KeyFileError(ValueError):
    """The key file cannot be used (the message names the file and the problem)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# A compact JWS: three unpadded base64url segments (header and payload non-empty; an empty
# signature, as alg "none" has, is refused as forged once the header is read).
_COMPACT_JWS = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)")
# An ES256 signature: r || s, 32 bytes each (RFC 7518 3.4).
_ES256_SIGNATURE_BYTES = 64


@dataclass(frozen=True, slots=True)
class _Jws:
    header: dict[str, Any]
    payload_segment: str
    signing_input: bytes
    signature: bytes


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _parse_jws(token: str) -> _Jws:
    """A compact JWS split once: three strict base64url segments (one regular expression, in
    C), the JOSE header decoded; raises InvalidAssertion ``malformed``. The same bytes are then
    verified and read (:meth:`AssertionVerifier.verify`): nothing is decoded twice."""
    match = _COMPACT_JWS.fullmatch(token)
    if match is None or any(len(seg) % 4 == 1 for seg in match.groups()):
        raise InvalidAssertion("the assertion is not a JWT", code="malformed")
    head, payload, signature = match.groups()
    try:
        header = orjson.loads(_b64decode(head))
        raw_signature = _b64decode(signature)
    except ValueError:  # binascii.Error and orjson's decode error are ValueErrors
        raise InvalidAssertion("the assertion is not a JWT", code="malformed") from None
    if not isinstance(header, dict):
        raise InvalidAssertion("the assertion is not a JWT", code="malformed")
    # One spelling per signature: unused low bits set in the last character would decode to the
    # same bytes (harmless, replay is keyed on the jti, but a JWT has one canonical form).
    if _b64(raw_signature) != signature:
        raise InvalidAssertion("the assertion is not a JWT", code="malformed")
    return _Jws(header, payload, f"{head}.{payload}".encode("ascii"), raw_signature)


def thumbprint(public_jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint of an EC public JWK: the kid of a generated key."""
    canonical = orjson.dumps({m: public_jwk[m] for m in ("crv", "kty", "x", "y")},
                             option=orjson.OPT_SORT_KEYS)
    return _b64(hashlib.sha256(canonical).digest())


def public_jwk(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey, kid: str
               ) -> dict[str, Any]:
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(pub, as_dict=True)
    jwk.update({"kid": kid, "alg": ALGORITHM, "use": "sig"})
    return jwk


def new_private_jwk() -> dict[str, Any]:
    """A fresh P-256 private key as a JWK (kid = its thumbprint), for a key file."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key, as_dict=True)
    kid = thumbprint(jwk)
    jwk.update({"kid": kid, "alg": ALGORITHM, "use": "sig"})
    return jwk


@dataclass(frozen=True, slots=True)
class SigningEntry:
    kid: str
    private_key: ec.EllipticCurvePrivateKey
    header_segment: str  # base64url of {"alg","kid","typ"}: the same for every assertion


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The gateway's assertion keys: ``keys[0]`` signs, every key is published."""

    keys: tuple[SigningEntry, ...]

    @classmethod
    def from_jwks(cls, doc: Any, where: str = "the key file") -> KeyRing:
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list) or not doc["keys"]:
            raise KeyFileError(f'{where}: a JWK set with a non-empty "keys" list is expected')
        if len(doc["keys"]) > MAX_KEYS:
            raise KeyFileError(f"{where}: more than {MAX_KEYS} keys")
        entries: list[SigningEntry] = []
        for i, jwk in enumerate(doc["keys"]):
            if not isinstance(jwk, dict) or jwk.get("kty") != "EC" or jwk.get("crv") != "P-256" \
                    or "d" not in jwk:
                raise KeyFileError(f"{where}: keys[{i}] is not a private EC P-256 JWK")
            kid = jwk.get("kid")
            if not isinstance(kid, str) or not kid or len(kid) > 128:
                raise KeyFileError(f"{where}: keys[{i}] has no kid")
            if any(e.kid == kid for e in entries):
                raise KeyFileError(f"{where}: kid {kid!r} appears twice")
            try:
                key = ECAlgorithm.from_jwk(jwk)
            except (jwt.exceptions.InvalidKeyError, ValueError, TypeError) as exc:
                raise KeyFileError(f"{where}: keys[{i}]: {exc}") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise KeyFileError(f"{where}: keys[{i}] is not a private key")
            header = _b64(orjson.dumps({"alg": ALGORITHM, "kid": kid, "typ": "JWT"}))
            entries.append(SigningEntry(kid, key, header))
        return cls(tuple(entries))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyRing:
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"{p}: {exc.strerror or exc}") from None
        if len(raw) > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"{p}: larger than {MAX_KEY_FILE_BYTES} bytes")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise KeyFileError(f"{p}: not JSON") from None
        return cls.from_jwks(doc, str(p))

    @property
    def signing(self) -> SigningEntry:
        return self.keys[0]

    def public_jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk(e.private_key, e.kid) for e in self.keys]}


class KeyFile:
    """A key ring read from a file and re-read when the file changes (checked at most every
    ``poll`` seconds, with one stat(); no read per request). A change that does not parse keeps
    the last good ring and logs why, so a half-written edit never stops signing."""

    def __init__(self, path: str | os.PathLike[str], *, poll: float = KEY_FILE_POLL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self._poll = poll
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.ring = KeyRing.load(self.path)  # start-up: a bad file is an error
        self._checked = clock()
        self._gone = False  # the file went missing (warned once until it is back)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def current(self) -> KeyRing:
        now = self._clock()
        if now - self._checked >= self._poll:
            with self._lock:
                if now - self._checked >= self._poll:
                    self._checked = now
                    self._reload_if_changed()
        return self.ring

    def _reload_if_changed(self) -> None:
        stamp = self._stat()
        if stamp is None:
            if not self._gone:
                self._gone = True
                logger.warning("assertion key file %s is gone; still signing with kid %s from "
                               "memory until it is back (a restart would fail)", self.path,
                               self.ring.signing.kid)
            return
        self._gone = False
        if stamp == self._stamp:
            return
        try:
            ring = KeyRing.load(self.path)
        except KeyFileError as exc:
            logger.error("assertion key file changed but is not usable; still signing with "
                         "kid %s: %s", self.ring.signing.kid, exc)
            return
        self._stamp = stamp
        if ring.keys != self.ring.keys:
            logger.info("assertion keys reloaded from %s: signing kid %s, published %s",
                        self.path, ring.signing.kid, [e.kid for e in ring.keys])
        self.ring = ring


def _der_to_raw(der: bytes) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


_SIGN_ALG = ec.ECDSA(hashes.SHA256())


class AssertionSigner:
    """Mints assertions with the first key of ``keys`` (a :class:`KeyRing`, or a
    :class:`KeyFile` followed for rotation). ``issuer`` is the gateway (its public URL)."""

    def __init__(self, keys: KeyRing | KeyFile, issuer: str, *, ttl: int = DEFAULT_TTL_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        if not 1 <= ttl <= MAX_TTL_SECONDS:
            raise ValueError(f"ttl must be 1..{MAX_TTL_SECONDS} seconds, got {ttl}")
        self._keys = keys
        self.issuer = issuer
        self.ttl = ttl
        self._clock = clock

    def _ring(self) -> KeyRing:
        return self._keys.current() if isinstance(self._keys, KeyFile) else self._keys

    def public_jwks(self) -> dict[str, Any]:
        return self._ring().public_jwks()

    def mint(self, caller: Caller, audience: str, decision_id: str,
             tool: str | None = None, audit_redact: Sequence[str] | None = None) -> str:
        """One assertion for ``caller`` towards ``audience`` (a fresh jti each time)."""
        entry = self._ring().signing
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer, "aud": audience, "sub": caller.sub, "iat": now,
            "exp": now + self.ttl, "jti": _b64(os.urandom(16)),
            CLAIM_DECISION_ID: decision_id, CLAIM_ROLES: list(caller.roles)}
        if caller.issuer is not None:
            claims[CLAIM_CALLER_ISSUER] = caller.issuer
        if caller.tenant is not None:
            claims[CLAIM_TENANT] = caller.tenant
        if caller.client_id is not None:
            claims[CLAIM_CLIENT_ID] = caller.client_id
        if caller.scope is not None and len(caller.scope) <= MAX_SCOPE_CHARS:
            claims[CLAIM_SCOPE] = caller.scope
        if caller.expires is not None:
            claims[CLAIM_CALLER_EXP] = caller.expires
        if tool is not None:
            claims[CLAIM_TOOL] = tool
        if audit_redact is not None:
            claims[CLAIM_AUDIT_REDACT] = list(audit_redact)
        signing_input = f"{entry.header_segment}.{_b64(orjson.dumps(claims))}"
        der = entry.private_key.sign(signing_input.encode("ascii"), _SIGN_ALG)
        return f"{signing_input}.{_b64(_der_to_raw(der))}"


@dataclass(frozen=True, slots=True)
class Assertion:
    """A verified assertion: the caller it names and what else it carries."""

    caller: Caller
    decision_id: str | None
    tool: str | None
    jti: str
    expires: int
    claims: Mapping[str, Any]

    @property
    def audit_redact(self) -> Any:
        """The fields the decision redacts from the audit (None: none); anything but a short
        list of names is handed on as is, and the audit writer then redacts every field."""
        value = self.claims.get(CLAIM_AUDIT_REDACT)
        if isinstance(value, list) and len(value) <= MAX_REDACT_FIELDS:
            return value
        return None if value is None else "invalid"


class KeySource(Protocol):
    """Public verification keys by kid (a JWKS file or URL); raises
    :class:`InvalidAssertion` with code ``unknown_kid`` or ``keys_unavailable``."""

    def get(self, kid: str) -> Awaitable[Any]: ...


class StaticKeys:
    """Public keys known up front (tests, a gateway verifying its own ring)."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self._keys = _public_keys(jwks)

    async def get(self, kid: str) -> Any:
        key = self._keys.get(kid)
        if key is None:
            raise InvalidAssertion("the assertion's kid is not in the gateway's JWKS",
                                  code="unknown_kid")
        return key


class JwksFileKeys:
    """The gateway's published JWKS read from a file; re-read on an unknown kid at most once
    per ``cooldown`` seconds (a flood of forged kids costs one stat()+read per cooldown), and
    when the file changed (so a retired key stops being trusted)."""

    def __init__(self, path: str | os.PathLike[str], *, cooldown: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self._cooldown = cooldown
        self._clock = clock
        self._keys: dict[str, Any] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = -1e18
        try:
            self._read()  # start-up: a missing or bad file is an error
        except (OSError, ValueError) as exc:  # orjson's decode error is a ValueError
            raise KeyFileError(f"--assertion-jwks {self.path}: not a readable JWKS file "
                               f"({exc})") from None
        self._checked = clock()

    def _read(self) -> None:
        st = self.path.stat()
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise ValueError(f"{self.path}: larger than {MAX_KEY_FILE_BYTES} bytes")
        doc = orjson.loads(self.path.read_bytes())
        keys = _public_keys(doc)
        if not keys:
            raise ValueError(f"{self.path}: no usable ES256 key")
        self._keys = keys
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._checked < self._cooldown:
            return
        self._checked = now
        try:
            st = self.path.stat()
            if (st.st_mtime_ns, st.st_size, st.st_ino) != self._stamp:
                self._read()
                logger.info("assertion JWKS reloaded from %s: %s", self.path, sorted(self._keys))
        except (OSError, ValueError) as exc:  # orjson's decode error is a ValueError
            logger.error("assertion JWKS %s not reloaded (keeping %s): %s", self.path,
                         sorted(self._keys), exc)

    async def get(self, kid: str) -> Any:
        self._refresh()  # cheap: one stat() per cooldown at most
        key = self._keys.get(kid)
        if key is None:
            raise InvalidAssertion("the assertion's kid is not in the gateway's JWKS",
                                  code="unknown_kid")
        return key


def _public_keys(doc: Any) -> dict[str, Any]:
    """The ES256 verification keys of a JWKS by kid (private members never read)."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise ValueError('a JWKS is an object with a "keys" list')
    out: dict[str, Any] = {}
    for jwk in doc["keys"]:
        if not isinstance(jwk, dict) or jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", ALGORITHM) != ALGORITHM:
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid or kid in out:
            continue
        public = {k: v for k, v in jwk.items() if k != "d"}
        try:
            out[kid] = ECAlgorithm.from_jwk(public)
        except (jwt.exceptions.InvalidKeyError, ValueError, TypeError):
            logger.warning("JWKS key %s ignored: not a valid EC key", kid)
    return out


class ReplayCache:
    """jtis seen, each kept until its assertion's expiry (plus leeway); bounded."""

    def __init__(self, max_entries: int = DEFAULT_REPLAY_CACHE_SIZE) -> None:
        self._max = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()  # insertion order ~ expiry order

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, jti: str, until: float, now: float) -> None:
        """Record ``jti``; raises InvalidAssertion (replayed, or the cache is full)."""
        seen = self._seen
        while seen:
            oldest, expiry = next(iter(seen.items()))
            if expiry > now:
                break
            del seen[oldest]
        if jti in seen:
            raise InvalidAssertion("the assertion was already used (replayed jti)", code="replayed")
        if len(seen) >= self._max:
            # Dropping a live jti would let it be replayed: refuse instead (fail closed).
            raise InvalidAssertion("too many live assertions to remember; retry shortly",
                                  code="replay_cache_full", http_status=503)
        seen[jti] = until


class AssertionVerifier:
    """Verifies assertions for one audience (the server's resource id) from one issuer."""

    def __init__(self, keys: KeySource, *, issuer: str, audience: str,
                 leeway: int = DEFAULT_LEEWAY_SECONDS,
                 replay_cache_size: int = DEFAULT_REPLAY_CACHE_SIZE,
                 clock: Callable[[], float] = time.time) -> None:
        self._keys = keys
        self.issuer = issuer
        self.audience = audience
        self._leeway = leeway
        self._replays = ReplayCache(replay_cache_size)
        self._clock = clock

    async def verify(self, token: str | None) -> Assertion:
        """The verified assertion; raises :class:`InvalidAssertion` naming the reason."""
        if token is None or not token:
            raise InvalidAssertion("no caller assertion (x-mcp-assertion) on the request",
                                  code="missing")
        if len(token) > MAX_ASSERTION_BYTES:
            raise InvalidAssertion("the assertion is larger than any the gateway mints",
                                  code="oversized")
        jws = _parse_jws(token)
        header = jws.header
        # Pinned: "none", HS256 with the public key as a secret, or any other alg is refused
        # before a key is even looked up; so is any JWS extension (crit, unencoded payload),
        # which the gateway never uses.
        if header.get("alg") != ALGORITHM:
            raise InvalidAssertion(f"assertion algorithm {header.get('alg')!r} is not {ALGORITHM}",
                                  code="forged")
        if "crit" in header or "b64" in header:
            raise InvalidAssertion("the assertion uses a JWS extension the gateway never mints",
                                  code="malformed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidAssertion("the assertion has no kid", code="malformed")
        key = await self._keys.get(kid)
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise InvalidAssertion("the assertion's kid names a key that is not a P-256 key",
                                  code="forged")
        now = self._clock()
        # The signature with cryptography (OpenSSL), over the exact bytes received, before the
        # payload is read. PyJWT's decode did the same with a per-character alphabet check in
        # Python that cost about as much as the ECDSA verification itself (docs/identity.md).
        signature = jws.signature
        if len(signature) != _ES256_SIGNATURE_BYTES:
            raise InvalidAssertion("the assertion's signature does not verify", code="forged")
        try:
            key.verify(encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                            int.from_bytes(signature[32:], "big")),
                       jws.signing_input, _SIGN_ALG)
        except InvalidSignature:
            raise InvalidAssertion("the assertion's signature does not verify",
                                  code="forged") from None
        try:
            claims = orjson.loads(_b64decode(jws.payload_segment))
        except ValueError:
            raise InvalidAssertion("the assertion's claims are not JSON",
                                  code="malformed") from None
        if not isinstance(claims, dict):
            raise InvalidAssertion("the assertion's claims are not a JSON object",
                                  code="malformed")
        missing = [name for name in _REQUIRED if name not in claims]
        if missing:
            raise InvalidAssertion(f"the assertion is not acceptable: it lacks {', '.join(missing)}",
                                  code="invalid_claims")
        # One audience, the server's own (the gateway mints exactly one); a list, even one
        # naming this server, is not what the gateway mints.
        if claims["aud"] != self.audience:
            raise InvalidAssertion("the assertion is for another audience",
                                  code="wrong_audience")
        if claims["iss"] != self.issuer:
            raise InvalidAssertion("the assertion's issuer is not the gateway",
                                  code="wrong_issuer")
        nbf = claims.get("nbf")
        if nbf is not None and (not isinstance(nbf, int) or nbf > now + self._leeway):
            raise InvalidAssertion("the assertion is not valid yet", code="invalid_claims")
        exp, iat = claims["exp"], claims["iat"]
        if not isinstance(iat, int) or not isinstance(exp, int):
            raise InvalidAssertion("the assertion's exp/iat are not integers",
                                   code="invalid_claims")
        if exp + self._leeway <= now:
            raise InvalidAssertion("the assertion has expired", code="expired")
        if exp - iat > MAX_TTL_SECONDS:
            raise InvalidAssertion(f"the assertion lives longer than {MAX_TTL_SECONDS} s",
                                  code="lifetime_too_long")
        if iat > now + self._leeway:
            raise InvalidAssertion("the assertion is issued in the future", code="invalid_claims")
        caller = _caller(claims)
        jti = claims["jti"]
        if not isinstance(jti, str) or not 8 <= len(jti) <= 128:
            raise InvalidAssertion("the assertion's jti is not a string", code="invalid_claims")
        # Last: only a verified assertion takes a place in the cache.
        self._replays.add(jti, exp + self._leeway, now)
        decision = claims.get(CLAIM_DECISION_ID)
        tool = claims.get(CLAIM_TOOL)
        return Assertion(caller, decision if isinstance(decision, str) else None,
                         tool if isinstance(tool, str) else None, jti, exp, claims)


def _caller(claims: Mapping[str, Any]) -> Caller:
    sub = claims.get("sub")
    roles = claims.get(CLAIM_ROLES, [])
    if not isinstance(sub, str) or not sub:
        raise InvalidAssertion("the assertion has no subject", code="invalid_claims")
    if not isinstance(roles, list) or len(roles) > MAX_ROLES \
            or not all(isinstance(r, str) and r for r in roles):
        raise InvalidAssertion("the assertion's roles are not a list of names",
                              code="invalid_claims")
    out: dict[str, str | None] = {}
    for name in (CLAIM_CALLER_ISSUER, CLAIM_TENANT, CLAIM_CLIENT_ID):
        value = claims.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidAssertion(f"the assertion's {name} is not a string",
                                  code="invalid_claims")
        out[name] = value
    scope = claims.get(CLAIM_SCOPE)
    if scope is not None and (not isinstance(scope, str) or len(scope) > MAX_SCOPE_CHARS):
        raise InvalidAssertion(f"the assertion's {CLAIM_SCOPE} is not a string",
                               code="invalid_claims")
    caller_exp = claims.get(CLAIM_CALLER_EXP)
    if caller_exp is not None and (not isinstance(caller_exp, int) or isinstance(caller_exp, bool)):
        raise InvalidAssertion(f"the assertion's {CLAIM_CALLER_EXP} is not an integer",
                               code="invalid_claims")
    return Caller(sub=sub, issuer=out[CLAIM_CALLER_ISSUER], tenant=out[CLAIM_TENANT],
                  client_id=out[CLAIM_CLIENT_ID], roles=tuple(roles), scope=scope,
                  expires=caller_exp)


def signer_for(identity: IdentityConfig, issuer: str) -> AssertionSigner:
    """The signer ``identity`` (the config's identity: section) describes, following its key
    file; raises ConfigError naming ``identity.keys`` when the file cannot be used."""
    try:
        keys = KeyFile(identity.keys)
    except KeyFileError as exc:
        raise ConfigError(f"identity.keys: {exc} (`mcp-gateway keys init` creates one; "
                          f"docs/identity.md)") from None
    return AssertionSigner(keys, issuer.rstrip("/"), ttl=identity.ttl_seconds)
