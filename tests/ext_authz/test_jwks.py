"""JWKS fetching against a real aiohttp server: bounded refetch, rotation, key filtering."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from ext_authz.errors import InvalidToken, KeysUnavailable
from gateway.jwks import FAILURE_COOLDOWN_SECONDS, JwksClient, parse_jwks
from gatewayctl.tokens import SigningKey, generate_key
from tests.ext_authz.conftest import JwksServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def client(server: JwksServer, session: aiohttp.ClientSession, clock: Clock,
           cooldown: float = 30.0) -> JwksClient:
    return JwksClient(server.url, session, cooldown=cooldown, timeout=2, max_bytes=65536, clock=clock)


async def test_unknown_kid_flood_fetches_once_per_cooldown(jwks_server: JwksServer,
                                                           session: aiohttp.ClientSession) -> None:
    """500 concurrent lookups of unknown kids cause one fetch; later ones none until the cooldown."""
    clock = Clock()
    keys = client(jwks_server, session, clock)
    await keys.get("rsa-1")
    assert jwks_server.fetches == 1
    flood = [keys.get(f"forged-{i}") for i in range(500)]
    results = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(r, InvalidToken) and r.code == "unknown_kid" for r in results)
    assert jwks_server.fetches == 1  # still inside the cooldown of the first fetch
    clock.now += 31
    results = await asyncio.gather(*(keys.get(f"forged-{i}") for i in range(500)),
                                   return_exceptions=True)
    assert all(isinstance(r, InvalidToken) and r.code == "unknown_kid" for r in results)
    assert jwks_server.fetches == 2
    clock.now += 29
    with pytest.raises(InvalidToken):
        await keys.get("forged-again")
    assert jwks_server.fetches == 2
    clock.now += 2
    with pytest.raises(InvalidToken):
        await keys.get("forged-again")
    assert jwks_server.fetches == 3


async def test_key_rotation(jwks_server: JwksServer, session: aiohttp.ClientSession,
                            rsa_key: SigningKey) -> None:
    """A new key published by the issuer is found by refetching on its unknown kid."""
    clock = Clock()
    keys = client(jwks_server, session, clock)
    await keys.get("rsa-1")
    new = generate_key("RSA", kid="rsa-2")
    jwks_server.set_keys([rsa_key, new])
    clock.now += 31
    assert (await keys.get("rsa-2")).kid == "rsa-2"
    assert keys.kids == {"rsa-1", "rsa-2"}


async def test_removed_key_expires_with_max_age(jwks_server: JwksServer,
                                                session: aiohttp.ClientSession) -> None:
    """A key removed from the JWKS stops being trusted once the cached set is refetched."""
    clock = Clock()
    keys = client(jwks_server, session, clock)
    await keys.get("rsa-1")
    jwks_server.set_keys([])
    clock.now += 3600
    with pytest.raises(InvalidToken):
        await keys.get("rsa-1")


async def test_jwks_unreachable_is_unavailable_and_retried_sooner(
        jwks_server: JwksServer, session: aiohttp.ClientSession) -> None:
    """A failed fetch answers KeysUnavailable and is retried after the short failure cooldown."""
    clock = Clock()
    keys = client(jwks_server, session, clock)
    jwks_server.status = 500
    with pytest.raises(KeysUnavailable):
        await keys.get("rsa-1")
    with pytest.raises(KeysUnavailable):
        await keys.get("rsa-1")
    assert jwks_server.fetches == 1
    jwks_server.status = 200
    clock.now += FAILURE_COOLDOWN_SECONDS
    assert (await keys.get("rsa-1")).kid == "rsa-1"


async def test_stale_keys_survive_idp_outage(jwks_server: JwksServer,
                                             session: aiohttp.ClientSession) -> None:
    """When the max-age refetch fails, the last good key set keeps working."""
    clock = Clock()
    keys = client(jwks_server, session, clock)
    await keys.get("rsa-1")
    jwks_server.status = 503
    clock.now += 3600
    assert (await keys.get("rsa-1")).kid == "rsa-1"


async def test_closed_port_is_unavailable(session: aiohttp.ClientSession) -> None:
    """A JWKS URL nobody listens on gives KeysUnavailable, not an exception from aiohttp."""
    server = JwksServer()
    await server.start()
    url = server.url
    await server.stop()
    keys = JwksClient(url, session, cooldown=30, timeout=2, max_bytes=65536)
    with pytest.raises(KeysUnavailable):
        await keys.get("rsa-1")


async def test_oversized_jwks_refused(jwks_server: JwksServer, session: aiohttp.ClientSession,
                                      rsa_key: SigningKey) -> None:
    """A JWKS document above the byte limit is not parsed."""
    jwks_server.set_keys([rsa_key], extra=[{"kid": f"k{i}", "kty": "oct", "k": "x" * 100}
                                           for i in range(1000)])
    keys = JwksClient(jwks_server.url, session, cooldown=30, timeout=2, max_bytes=4096)
    with pytest.raises(KeysUnavailable):
        await keys.get("rsa-1")


def test_parse_jwks_keeps_only_public_signature_keys(rsa_key: SigningKey, ec_key: SigningKey) -> None:
    """use!=sig, key_ops without verify, oct, private, kid-less and duplicate-kid keys are ignored."""
    enc = generate_key("RSA", kid="enc").public_jwk() | {"use": "enc"}
    ops = generate_key("RSA", kid="ops").public_jwk() | {"key_ops": ["encrypt"]}
    oct_key = {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}
    no_kid = {k: v for k, v in generate_key("EC").public_jwk().items() if k != "kid"}
    dup1 = generate_key("RSA", kid="dup").public_jwk()
    dup2 = generate_key("RSA", kid="dup").public_jwk()
    private_key = generate_key("RSA").private_key
    assert isinstance(private_key, rsa.RSAPrivateKey)
    private = RSAAlgorithm.to_jwk(private_key, as_dict=True) | {"kid": "priv"}
    doc = {"keys": [rsa_key.public_jwk(), ec_key.public_jwk(), enc, ops, oct_key, no_kid,
                    dup1, dup2, private, "junk"]}
    assert set(parse_jwks(doc)) == {"rsa-1", "ec-1"}


def test_parse_jwks_rejects_non_jwks() -> None:
    """A document without a keys list is an error (the fetch counts as failed)."""
    with pytest.raises(ValueError):
        parse_jwks({"keys": "nope"})


def test_the_client_in_gateway_raises_the_errors_ext_authz_maps() -> None:
    """The JWKS client lives in gateway.jwks (servers use it without ext_authz); ext_authz.jwks
    names the same objects, and its errors are ext_authz's InvalidToken / KeysUnavailable."""
    import ext_authz.errors  # noqa: PLC0415
    import ext_authz.jwks  # noqa: PLC0415
    import gateway.errors  # noqa: PLC0415
    import gateway.jwks  # noqa: PLC0415

    assert ext_authz.jwks.JwksClient is gateway.jwks.JwksClient
    assert ext_authz.jwks.VerificationKey is gateway.jwks.VerificationKey
    assert ext_authz.errors.InvalidToken is gateway.errors.InvalidToken
    assert ext_authz.errors.KeysUnavailable is gateway.errors.KeysUnavailable
    assert issubclass(gateway.errors.InvalidToken, ext_authz.errors.AuthError)
