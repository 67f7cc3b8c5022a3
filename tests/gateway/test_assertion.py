"""The caller assertion: minted by the gateway, verified by a server, refused when it is not ours."""

from __future__ import annotations

import base64
import hmac
import os
from hashlib import sha256
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization

from gateway.assertion import (
    MAX_ASSERTION_BYTES,
    MAX_SCOPE_CHARS,
    AssertionSigner,
    AssertionVerifier,
    InvalidAssertion,
    JwksFileKeys,
    KeyFile,
    KeyFileError,
    KeyRing,
    ReplayCache,
    StaticKeys,
    new_private_jwk,
)
from gateway.caller import Caller

ISS = "https://gw.example"
AUD = "https://gw.example/mcp/files"
CALLER = Caller(sub="alice", issuer="https://idp.example", tenant="acme", client_id="cli",
                roles=("reader", "writer"))


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ring(n: int = 1) -> KeyRing:
    return KeyRing.from_jwks({"keys": [new_private_jwk() for _ in range(n)]})


def verifier(keys: KeyRing, clock: Clock | None = None, **kw: Any) -> AssertionVerifier:
    return AssertionVerifier(StaticKeys(keys.public_jwks()), issuer=kw.pop("issuer", ISS),
                             audience=kw.pop("audience", AUD), clock=clock or Clock(), **kw)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def reason(v: AssertionVerifier, token: str | None) -> str:
    with pytest.raises(InvalidAssertion) as info:
        await v.verify(token)
    return info.value.code


async def test_round_trip_carries_the_caller() -> None:
    """A minted assertion verifies and names the caller, decision id and tool it was minted for."""
    keys, clock = ring(), Clock()
    token = AssertionSigner(keys, ISS, clock=clock).mint(CALLER, AUD, "d-1", tool="read")
    got = await verifier(keys, clock).verify(token)
    assert got.caller == CALLER
    assert (got.decision_id, got.tool) == ("d-1", "read")
    assert got.expires - got.claims["iat"] == 60
    assert jwt.get_unverified_header(token)["kid"] == keys.signing.kid


async def test_each_assertion_has_its_own_jti() -> None:
    """Two assertions for the same call differ (unique jti), and both verify once."""
    keys, clock = ring(), Clock()
    signer = AssertionSigner(keys, ISS, clock=clock)
    a, b = signer.mint(CALLER, AUD, "d"), signer.mint(CALLER, AUD, "d")
    v = verifier(keys, clock)
    assert (await v.verify(a)).jti != (await v.verify(b)).jti


async def test_replayed_assertion_is_refused() -> None:
    """The same assertion presented twice within its lifetime is refused the second time."""
    keys, clock = ring(), Clock()
    token = AssertionSigner(keys, ISS, clock=clock).mint(CALLER, AUD, "d")
    v = verifier(keys, clock)
    await v.verify(token)
    assert await reason(v, token) == "replayed"


async def test_forged_signature_is_refused() -> None:
    """An assertion signed by another key under the gateway's kid does not verify."""
    keys, other, clock = ring(), ring(), Clock()
    token = AssertionSigner(other, ISS, clock=clock).mint(CALLER, AUD, "d")
    header, payload, sig = token.split(".")
    forged_header = b64(orjson.dumps({"alg": "ES256", "kid": keys.signing.kid, "typ": "JWT"}))
    assert await reason(verifier(keys, clock), f"{forged_header}.{payload}.{sig}") == "forged"


async def test_tampered_claims_are_refused() -> None:
    """Changing the subject of a genuine assertion breaks its signature."""
    keys, clock = ring(), Clock()
    header, payload, sig = AssertionSigner(keys, ISS, clock=clock).mint(CALLER, AUD, "d").split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "mallory"
    assert await reason(verifier(keys, clock), f"{header}.{b64(orjson.dumps(claims))}.{sig}") \
        == "forged"


async def test_expired_assertion_is_refused() -> None:
    """An assertion past exp plus the leeway is refused as expired."""
    keys, clock = ring(), Clock()
    token = AssertionSigner(keys, ISS, ttl=10, clock=clock).mint(CALLER, AUD, "d")
    clock.now += 10 + 6
    assert await reason(verifier(keys, clock, leeway=5), token) == "expired"


async def test_wrong_audience_is_refused() -> None:
    """An assertion for another server is refused by this one."""
    keys, clock = ring(), Clock()
    token = AssertionSigner(keys, ISS, clock=clock).mint(CALLER, f"{ISS}/mcp/db", "d")
    assert await reason(verifier(keys, clock), token) == "wrong_audience"


async def test_wrong_issuer_is_refused() -> None:
    """An assertion from another gateway (same key, other iss) is refused."""
    keys, clock = ring(), Clock()
    token = AssertionSigner(keys, "https://other.example", clock=clock).mint(CALLER, AUD, "d")
    assert await reason(verifier(keys, clock), token) == "wrong_issuer"


async def test_alg_none_is_refused() -> None:
    """An unsigned assertion (alg none) is refused before any key lookup."""
    keys, clock = ring(), Clock()
    claims = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": int(clock.now),
              "exp": int(clock.now) + 30, "jti": "abcdefgh12345678"}
    header = b64(orjson.dumps({"alg": "none", "kid": keys.signing.kid}))
    assert await reason(verifier(keys, clock), f"{header}.{b64(orjson.dumps(claims))}.") == "forged"


async def test_hs256_with_the_public_key_as_secret_is_refused() -> None:
    """The classic key confusion: HMAC keyed with the published public key is refused."""
    keys, clock = ring(), Clock()
    public_pem = keys.signing.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": int(clock.now),
              "exp": int(clock.now) + 30, "jti": "abcdefgh12345678"}
    signing_input = (f"{b64(orjson.dumps({'alg': 'HS256', 'kid': keys.signing.kid}))}."
                     f"{b64(orjson.dumps(claims))}")
    sig = b64(hmac.new(public_pem, signing_input.encode(), sha256).digest())
    assert await reason(verifier(keys, clock), f"{signing_input}.{sig}") == "forged"


async def test_unknown_kid_is_refused() -> None:
    """An assertion naming a kid the JWKS does not hold is refused."""
    keys, other, clock = ring(), ring(), Clock()
    token = AssertionSigner(other, ISS, clock=clock).mint(CALLER, AUD, "d")
    assert await reason(verifier(keys, clock), token) == "unknown_kid"


async def test_oversized_token_is_refused_unparsed() -> None:
    """A token larger than any the gateway mints is refused before it is decoded."""
    assert await reason(verifier(ring()), "a" * (MAX_ASSERTION_BYTES + 1)) == "oversized"


async def test_missing_and_garbage_are_refused() -> None:
    """No assertion, or one that is not a JWT, is refused with its own reason."""
    v = verifier(ring())
    assert await reason(v, None) == "missing"
    assert await reason(v, "not.a.jwt") == "malformed"


async def test_malformed_segments_are_refused_before_a_key_is_looked_up() -> None:
    """Wrong segment count, non-base64url characters, padding or a header that is not a JSON
    object: refused as malformed by the verifier's own header parse."""
    keys = ring()
    good = AssertionSigner(keys, ISS).mint(CALLER, AUD, "d")
    head, body, sig = good.split(".")
    array_head = base64.urlsafe_b64encode(b"[1]").rstrip(b"=").decode()
    v = verifier(keys)
    for token in (f"{head}.{body}", f"{good}.x", f"{head}!.{body}.{sig}", f"{head}.{body}=.{sig}",
                  f"{head}.{body}.{sig}abc", f"{array_head}.{body}.{sig}", f"{head}.{body}.{sig}\n"):
        assert await reason(v, token) == "malformed", token


async def test_lifetime_over_a_minute_is_refused() -> None:
    """A genuinely signed assertion that lives longer than 60 s is refused."""
    keys, clock = ring(), Clock()
    claims = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": int(clock.now),
              "exp": int(clock.now) + 3600, "jti": "abcdefgh12345678"}
    token = jwt.encode(claims, keys.signing.private_key, algorithm="ES256",
                       headers={"kid": keys.signing.kid})
    assert await reason(verifier(keys, clock), token) == "lifetime_too_long"


async def test_missing_jti_is_refused() -> None:
    """A signed assertion without a jti cannot be checked for replay: refused."""
    keys, clock = ring(), Clock()
    claims = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": int(clock.now),
              "exp": int(clock.now) + 30}
    token = jwt.encode(claims, keys.signing.private_key, algorithm="ES256",
                       headers={"kid": keys.signing.kid})
    assert await reason(verifier(keys, clock), token) == "invalid_claims"


def test_replay_cache_forgets_expired_and_refuses_when_full() -> None:
    """Expired jtis leave the cache; a cache full of live ones refuses rather than forgets."""
    cache = ReplayCache(max_entries=2)
    cache.add("a", until=10, now=0)
    cache.add("b", until=10, now=0)
    with pytest.raises(InvalidAssertion) as info:
        cache.add("c", until=10, now=1)
    assert info.value.code == "replay_cache_full" and info.value.http_status == 503
    cache.add("c", until=30, now=11)  # a and b expired
    assert len(cache) == 1


async def test_third_party_pyjwt_verifies_with_the_published_jwks() -> None:
    """Plain PyJWT verifies an assertion with the key from the published JWKS (no gateway code)."""
    keys = ring(2)
    token = AssertionSigner(keys, ISS).mint(CALLER, AUD, "d")
    jwks = orjson.loads(orjson.dumps(keys.public_jwks()))
    assert all("d" not in k for k in jwks["keys"])
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(jwt.PyJWK(k) for k in jwks["keys"] if k["kid"] == kid)
    claims = jwt.decode(token, key, algorithms=["ES256"], audience=AUD, issuer=ISS)
    assert (claims["sub"], claims["tenant"], claims["roles"]) == ("alice", "acme",
                                                                  ["reader", "writer"])


def test_key_file_errors_name_the_problem(tmp_path: Path) -> None:
    """A key file that is missing, not JSON, or holds a public key is refused with a reason."""
    with pytest.raises(KeyFileError, match="No such file"):
        KeyRing.load(tmp_path / "nope.json")
    bad = tmp_path / "keys.json"
    bad.write_text("{", encoding="utf-8")
    with pytest.raises(KeyFileError, match="not JSON"):
        KeyRing.load(bad)
    public = {k: v for k, v in new_private_jwk().items() if k != "d"}
    bad.write_bytes(orjson.dumps({"keys": [public]}))
    with pytest.raises(KeyFileError, match="not a private EC P-256 JWK"):
        KeyRing.load(bad)


async def test_key_file_rotation_is_picked_up_without_restart(tmp_path: Path) -> None:
    """A promoted key in the file signs after the next poll; the old key stays published."""
    old, new = new_private_jwk(), new_private_jwk()
    path = tmp_path / "keys.json"
    path.write_bytes(orjson.dumps({"keys": [old]}))
    mono = Clock(0.0)
    keyfile = KeyFile(path, poll=2.0, clock=mono)
    signer = AssertionSigner(keyfile, ISS)
    assert jwt.get_unverified_header(signer.mint(CALLER, AUD, "d"))["kid"] == old["kid"]
    tmp = tmp_path / "keys.json.tmp"
    tmp.write_bytes(orjson.dumps({"keys": [new, old]}))
    os.replace(tmp, path)
    assert jwt.get_unverified_header(signer.mint(CALLER, AUD, "d"))["kid"] == old["kid"]
    mono.now = 2.5
    token = signer.mint(CALLER, AUD, "d")
    assert jwt.get_unverified_header(token)["kid"] == new["kid"]
    assert [k["kid"] for k in signer.public_jwks()["keys"]] == [new["kid"], old["kid"]]
    path.write_text("{ half written", encoding="utf-8")
    mono.now = 5.0
    assert jwt.get_unverified_header(signer.mint(CALLER, AUD, "d"))["kid"] == new["kid"]


async def test_jwks_file_reloads_on_unknown_kid_rate_limited(tmp_path: Path) -> None:
    """A server's JWKS file is re-read for an unknown kid, at most once per cooldown."""
    first, second = ring(), ring()
    path = tmp_path / "jwks.json"
    path.write_bytes(orjson.dumps(first.public_jwks()))
    mono = Clock(0.0)
    source = JwksFileKeys(path, cooldown=1.0, clock=mono)
    wall = Clock()
    v = AssertionVerifier(source, issuer=ISS, audience=AUD, clock=wall)
    token = AssertionSigner(second, ISS, clock=wall).mint(CALLER, AUD, "d")
    path.write_bytes(orjson.dumps({"keys": [*first.public_jwks()["keys"],
                                            *second.public_jwks()["keys"]]}))
    assert await reason(v, token) == "unknown_kid"  # within the cooldown: not re-read
    mono.now = 1.5
    assert (await v.verify(token)).caller.sub == "alice"


def test_signer_refuses_a_ttl_over_a_minute() -> None:
    """The signer cannot be configured to mint assertions living longer than 60 s."""
    with pytest.raises(ValueError, match="ttl"):
        AssertionSigner(ring(), ISS, ttl=61)


def _signed(keys: KeyRing, claims: dict[str, Any], **header: Any) -> str:
    return jwt.encode(claims, keys.signing.private_key, algorithm="ES256",
                      headers={"kid": keys.signing.kid, **header})


def _claims(clock: Clock, **extra: Any) -> dict[str, Any]:
    return {"iss": ISS, "aud": AUD, "sub": "alice", "iat": int(clock.now),
            "exp": int(clock.now) + 30, "jti": "abcdefgh12345678", **extra}


async def test_a_signed_assertion_for_several_audiences_is_refused() -> None:
    """The gateway mints one audience per assertion; a validly signed one whose aud is a list
    (even naming this server) is not one of ours."""
    keys, clock = ring(), Clock()
    token = _signed(keys, _claims(clock, aud=[AUD, "https://gw.example/mcp/other"]))
    assert await reason(verifier(keys, clock), token) == "wrong_audience"


async def test_jws_extensions_and_future_nbf_are_refused() -> None:
    """A critical-extension header and an unencoded-payload header are refused although the
    signature verifies (the gateway never mints them); so is a not-before in the future."""
    keys, clock = ring(), Clock()
    crit = _signed(keys, _claims(clock), crit=["exp"])
    assert await reason(verifier(keys, clock), crit) == "malformed"
    later = _signed(keys, _claims(clock, nbf=int(clock.now) + 600))
    assert await reason(verifier(keys, clock), later) == "invalid_claims"


async def test_a_signature_of_the_wrong_length_or_encoding_is_forged() -> None:
    """A DER-encoded ECDSA signature (not the JWS r || s form), or one cut short, does not
    verify; neither does a segment with a character outside base64url."""
    keys, clock = ring(), Clock()
    header, payload, sig = AssertionSigner(keys, ISS, clock=clock).mint(CALLER, AUD, "d").split(".")
    raw = base64.urlsafe_b64decode(sig + "==")
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    v = verifier(keys, clock)
    assert await reason(v, f"{header}.{payload}.{b64(der)}") == "forged"
    assert await reason(v, f"{header}.{payload}.{b64(raw[:40])}") == "forged"
    assert await reason(v, f"{header}.{payload}.{sig[:-2]}+/") == "malformed"


async def test_a_kid_naming_a_non_p256_key_is_refused() -> None:
    """A key source that answers a kid with an RSA key (a JWKS shared with other issuers)
    never verifies an ES256 assertion with it."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    keys, clock = ring(), Clock()

    class RsaKeys:
        async def get(self, kid: str) -> Any:
            return rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()

    v = AssertionVerifier(RsaKeys(), issuer=ISS, audience=AUD, clock=clock)
    token = AssertionSigner(keys, ISS, clock=clock).mint(CALLER, AUD, "d")
    assert await reason(v, token) == "forged"


async def test_a_non_canonical_signature_spelling_is_refused() -> None:
    """A signature segment whose last character carries set unused bits decodes to the same
    bytes; it is refused, so each assertion has exactly one accepted spelling."""
    keys, clock = ring(), Clock()
    header, payload, sig = AssertionSigner(keys, ISS, clock=clock).mint(CALLER, AUD, "d").split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # 64 bytes -> 86 characters; the last carries 4 bits of data and 2 unused bits.
    last = alphabet.index(sig[-1])
    twin = sig[:-1] + alphabet[last | 0b11]
    assert twin != sig and base64.urlsafe_b64decode(twin + "==") == base64.urlsafe_b64decode(sig + "==")
    assert await reason(verifier(keys, clock), f"{header}.{payload}.{twin}") == "malformed"
    await verifier(keys, clock).verify(f"{header}.{payload}.{sig}")  # the canonical one passes


async def test_the_callers_scope_and_token_expiry_ride_along() -> None:
    """The client token's scope and exp reach the server (``scope``, ``caller_exp``), the
    assertion's own lifetime unchanged; a scope too long for an assertion is left out."""
    keys, clock = ring(), Clock()
    caller = Caller(sub="alice", issuer="https://idp.example", scope="tools:call:erp/* openid",
                    expires=int(clock.now) + 3600)
    token = AssertionSigner(keys, ISS, clock=clock).mint(caller, AUD, "d-1")
    got = await verifier(keys, clock).verify(token)
    assert got.caller.scope == "tools:call:erp/* openid"
    assert got.caller.expires == int(clock.now) + 3600
    assert got.expires - got.claims["iat"] == 60
    wide = Caller(sub="alice", scope="s" * (MAX_SCOPE_CHARS + 1))
    got = await verifier(keys, clock).verify(AssertionSigner(keys, ISS, clock=clock).mint(wide, AUD, "d"))
    assert got.caller.scope is None and got.caller.expires is None


@pytest.mark.parametrize("extra", [{"scope": 5}, {"scope": "s" * (MAX_SCOPE_CHARS + 1)},
                                   {"caller_exp": "1"}, {"caller_exp": True}])
async def test_bad_scope_or_caller_exp_is_refused(extra: dict[str, Any]) -> None:
    """A scope that is not a bounded string or a caller_exp that is not an integer: invalid_claims."""
    keys, clock = ring(), Clock()
    assert await reason(verifier(keys, clock), _signed(keys, _claims(clock, **extra))) == "invalid_claims"


async def test_the_audit_redact_obligation_rides_along_signed() -> None:
    """ext_authz signs the decision's audit_redact obligation into the assertion (a short list
    of short names as is, anything else as one unknown name, which redacts every field); the
    verified assertion hands it to the server; a list longer than any policy needs is invalid."""
    from ext_authz.servicer import _redaction

    keys, clock = ring(), Clock()
    signer, v = AssertionSigner(keys, ISS, clock=clock), verifier(keys, clock)
    assert _redaction(None) is None
    assert _redaction(["sub", "args_digest"]) == ["sub", "args_digest"]
    assert _redaction("sub") == ["invalid"] and _redaction([1]) == ["invalid"]
    assert _redaction(["x" * 65]) == ["invalid"] and _redaction(["sub"] * 17) == ["invalid"]
    got = await v.verify(signer.mint(CALLER, AUD, "d", "echo", _redaction(["sub"])))
    assert got.audit_redact == ["sub"]
    assert (await v.verify(signer.mint(CALLER, AUD, "d", "echo"))).audit_redact is None
    too_many = await v.verify(signer.mint(CALLER, AUD, "d", "echo", ["sub"] * 17))
    assert too_many.audit_redact == "invalid"
