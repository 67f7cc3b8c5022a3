"""The RFC 8693 exchange client against a real (test) token endpoint: the request it sends, the
cache (hits, expiry, the subject's own expiry, its bound), coalesced misses, and failing closed
when the endpoint is down, slow, failing or refusing. Nothing secret is ever logged."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

import jwt
import pytest
from jwt.algorithms import ECAlgorithm
from prometheus_client import REGISTRY

from gateway.assertion import AssertionSigner, KeyRing, new_private_jwk
from gateway.caller import Caller
from gateway.credentials.config import ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE, TokenExchangeCredentials
from gateway.credentials.errors import (
    CredentialUnavailable,
    TokenExchangeRefused,
    TokenExchangeUnavailable,
)
from gateway.credentials.exchange import GRANT_TYPE, TokenExchangeClient
from gateway.credentials.provider import CredentialProvider
from tests.gateway.credentials.sts import TokenServer
from tests.ports import free_port

SECRET = "sts-client-secret"  # noqa: S105  # a test value
SUBJECT = "eyJhbGciOi.subject-token.signature"  # noqa: S105  # a test value


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def sts() -> AsyncIterator[TokenServer]:
    server = TokenServer(client_secret=SECRET)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _config(url: str, **kw: object) -> TokenExchangeCredentials:
    base = TokenExchangeCredentials(token_endpoint=url, client_id="gateway", client_secret="STS",
                                    audience="https://crm.example/mcp", timeout_ms=2000)
    return replace(base, **kw)  # type: ignore[arg-type]  # test-only overrides


async def _token(client: TokenExchangeClient, subject: str = SUBJECT, *,
                 not_after: float | None = None) -> str:
    return await client.token(subject, ACCESS_TOKEN_TYPE,
                              key=client.cache_key(subject, "https://crm.example/mcp"),
                              not_after=not_after)


async def test_request_follows_rfc_8693(sts: TokenServer) -> None:
    """A form POST with the grant type, subject, types, audience, resource and scope, and the
    client authenticated with client_secret_basic; the issued token is returned."""
    client = TokenExchangeClient("crm", _config(sts.url, resource="https://crm.example/",
                                                scope="read write"), SECRET)
    try:
        token = await _token(client)
    finally:
        await client.close()
    assert token == sts.issued[0].token
    (req,) = sts.requests
    assert req["content_type"] == "application/x-www-form-urlencoded"
    assert req["form"] == {"grant_type": GRANT_TYPE, "subject_token": SUBJECT,
                           "subject_token_type": ACCESS_TOKEN_TYPE,
                           "requested_token_type": ACCESS_TOKEN_TYPE,
                           "audience": "https://crm.example/mcp", "resource": "https://crm.example/",
                           "scope": "read write"}
    assert base64.b64decode(req["authorization"].removeprefix("Basic ")) == f"gateway:{SECRET}".encode()


async def test_cached_until_shortly_before_expiry(sts: TokenServer) -> None:
    """One exchange serves the same caller until refresh_before_seconds before expires_in."""
    clock = Clock()
    sts.expires_in = 300
    client = TokenExchangeClient("crm", _config(sts.url, refresh_before_seconds=30), SECRET,
                                 clock=clock)
    try:
        first = await _token(client)
        clock.now += 269
        assert await _token(client) == first and len(sts.requests) == 1
        clock.now += 1  # 30 s before expiry: exchanged again
        second = await _token(client)
        assert second != first and len(sts.requests) == 2
        other = await _token(client, "another-subject")  # another caller: its own exchange
        assert other not in (first, second) and len(sts.requests) == 3
    finally:
        await client.close()


async def test_never_outlives_the_subject_nor_caches_without_expiry(sts: TokenServer) -> None:
    """The subject's own expiry caps the cache; an answer without expires_in is not cached."""
    clock = Clock()
    client = TokenExchangeClient("crm", _config(sts.url), SECRET, clock=clock)
    try:
        await _token(client, not_after=clock.now + 10)
        clock.now += 10
        await _token(client, not_after=clock.now + 10)
        assert len(sts.requests) == 2
        sts.expires_in = None
        await _token(client, "s2")
        await _token(client, "s2")
        assert len(sts.requests) == 4
    finally:
        await client.close()


async def test_cache_is_bounded(sts: TokenServer) -> None:
    """Past cache_size entries the least recently used one is dropped."""
    client = TokenExchangeClient("crm", _config(sts.url, cache_size=2), SECRET)
    try:
        for subject in ("a", "b", "c"):
            await _token(client, subject)
        await _token(client, "c")
        await _token(client, "b")
        assert len(sts.requests) == 3
        await _token(client, "a")  # evicted first
        assert len(sts.requests) == 4
    finally:
        await client.close()


async def test_concurrent_misses_are_one_exchange(sts: TokenServer) -> None:
    """Many checks missing the cache for one caller at once cause one exchange."""
    sts.mode = "hang"
    client = TokenExchangeClient("crm", _config(sts.url), SECRET)
    try:
        calls = [asyncio.create_task(_token(client)) for _ in range(10)]
        deadline = time.monotonic() + 5
        while not sts.requests:
            assert time.monotonic() < deadline, "the exchange never reached the endpoint"
            await asyncio.sleep(0.01)
        sts.mode = "ok"
        sts._release.set()
        tokens = await asyncio.wait_for(asyncio.gather(*calls), 5)
    finally:
        await client.close()
    assert len(set(tokens)) == 1 and len(sts.requests) == 1


async def test_endpoint_down_is_503() -> None:
    """Nothing listening at the endpoint: TokenExchangeUnavailable (503), naming the server."""
    client = TokenExchangeClient("crm", _config(f"http://127.0.0.1:{free_port()}/token"), SECRET)
    try:
        with pytest.raises(TokenExchangeUnavailable) as err:
            await _token(client)
    finally:
        await client.close()
    assert err.value.http_status == 503 and err.value.code == "token_exchange_unavailable"
    assert err.value.data == {"server": "crm"}


async def test_slow_endpoint_is_503_within_the_timeout(sts: TokenServer) -> None:
    """An endpoint that does not answer within timeout_ms is unavailable (503)."""
    sts.mode = "hang"
    client = TokenExchangeClient("crm", _config(sts.url, timeout_ms=100), SECRET)
    try:
        with pytest.raises(TokenExchangeUnavailable, match="did not answer in time"):
            await asyncio.wait_for(_token(client), 5)
    finally:
        await client.close()


async def test_server_error_is_503_and_not_cached(sts: TokenServer) -> None:
    """A 5xx answer is unavailable; the next call exchanges again once the endpoint is back."""
    sts.mode = "fail"
    client = TokenExchangeClient("crm", _config(sts.url), SECRET)
    try:
        with pytest.raises(TokenExchangeUnavailable):
            await _token(client)
        sts.mode = "ok"
        assert (await _token(client)).startswith("xchg-")
    finally:
        await client.close()


@pytest.mark.parametrize(("mode", "secret", "code"), [("refuse", SECRET, "invalid_grant"),
                                                      ("ok", "wrong-secret", "invalid_client")])
async def test_error_answer_is_502_with_its_code(sts: TokenServer, mode: str, secret: str,
                                                 code: str) -> None:
    """An RFC 6749 error answer is TokenExchangeRefused (502) carrying the endpoint's code."""
    sts.mode = mode
    client = TokenExchangeClient("crm", _config(sts.url), secret)
    try:
        with pytest.raises(TokenExchangeRefused) as err:
            await _token(client)
    finally:
        await client.close()
    assert err.value.http_status == 502 and err.value.data == {"server": "crm", "error": code}


async def test_secrets_and_tokens_are_never_logged(sts: TokenServer,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Neither the subject, the issued token nor the client secret reach a log line."""
    caplog.set_level(logging.DEBUG)
    client = TokenExchangeClient("crm", _config(sts.url), SECRET)
    try:
        issued = await _token(client)
        sts.mode = "refuse"
        with pytest.raises(TokenExchangeRefused):
            await _token(client, "second-subject")
    finally:
        await client.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "refused" in text
    for secret in (SUBJECT, "second-subject", issued, SECRET):
        assert secret not in text


async def test_assertion_as_subject(sts: TokenServer) -> None:
    """subject: assertion exchanges a fresh gateway-signed assertion (a JWT whose audience is
    the token endpoint, not the upstream, naming the caller); the cache is per caller, so a
    repeat costs nothing, while another caller (other roles) is exchanged anew; without a signer
    the call is refused."""
    key = new_private_jwk()
    signer = AssertionSigner(KeyRing.from_jwks({"keys": [key]}), "https://gw.example")
    creds = _config(sts.url, subject="assertion")
    caller = Caller(sub="alice", issuer="https://idp", tenant="acme", roles=("analyst",),
                    claims={"sub": "alice", "exp": time.time() + 600})
    provider = CredentialProvider({"crm": creds}, {"STS": SECRET}, signer=signer)
    try:
        first = await provider.headers("crm", caller, "client-token", decision_id="d1")
        assert await provider.headers("crm", caller, "other-token", decision_id="d2") == first
        assert len(sts.requests) == 1
        form = sts.requests[0]["form"]
        assert form["subject_token_type"] == JWT_TOKEN_TYPE
        public = ECAlgorithm.from_jwk({k: v for k, v in key.items() if k != "d"})
        claims = jwt.decode(form["subject_token"], public, algorithms=["ES256"],  # type: ignore[arg-type]
                            audience=sts.url, issuer="https://gw.example")
        assert claims["sub"] == "alice" and claims["decision_id"] == "d1"
        assert form["audience"] == "https://crm.example/mcp"
        with pytest.raises(jwt.InvalidAudienceError):
            jwt.decode(form["subject_token"], public, algorithms=["ES256"],  # type: ignore[arg-type]
                       audience="https://crm.example/mcp")
        assert "client-token" not in form.values()
        await provider.headers("crm", replace(caller, roles=("admin",)), "client-token")
        assert len(sts.requests) == 2
        provider.use_signer(None)
        with pytest.raises(CredentialUnavailable, match="identity.assertion"):
            await provider.headers("crm", replace(caller, sub="bob"), "client-token")
    finally:
        await provider.close()


def _count(server: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value("mcp_gateway_upstream_credentials_total",
                                      {"server": server, "kind": "token_exchange", "outcome": outcome})
    return value or 0.0


async def test_outcomes_are_counted(sts: TokenServer) -> None:
    """Exchanged, cached, refused and unavailable answers each move their series."""
    client = TokenExchangeClient("metrics-crm", _config(sts.url), SECRET)
    try:
        await _token(client)
        await _token(client)
        sts.mode = "refuse"
        with pytest.raises(TokenExchangeRefused):
            await _token(client, "s2")
        sts.mode = "fail"
        with pytest.raises(TokenExchangeUnavailable):
            await _token(client, "s3")
    finally:
        await client.close()
    assert [_count("metrics-crm", o) for o in ("exchanged", "cached", "refused", "unavailable")] \
        == [1, 1, 1, 1]


class _BrokenSigner(AssertionSigner):
    def mint(self, caller: Caller, audience: str, decision_id: str, tool: str | None = None,
             audit_redact: Sequence[str] | None = None) -> str:
        raise ValueError("the key file is gone")


async def test_an_assertion_that_cannot_be_minted_fails_closed(sts: TokenServer) -> None:
    """A signer failure (key file gone) answers 503 and asks nothing of the token endpoint."""
    signer = _BrokenSigner(KeyRing.from_jwks({"keys": [new_private_jwk()]}), "https://gw.example")
    provider = CredentialProvider({"crm": _config(sts.url, subject="assertion")}, {"STS": SECRET},
                                  signer=signer)
    try:
        with pytest.raises(CredentialUnavailable, match="cannot sign a caller assertion"):
            await provider.headers("crm", Caller(sub="alice"), "client-token")
    finally:
        await provider.close()
    assert sts.requests == []
