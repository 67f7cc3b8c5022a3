"""Tokens of a delegation issuer (``issuers[].delegation``): a gateway service acting for a caller.
The caller is the one the token names (its ``caller_iss`` and ``sub``), never the service's
issuer; the actor reaches the policy input and the decision log; a token without the caller's
issuer or the actor is refused."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from ext_authz.decision_log import LOGGER_NAME
from ext_authz.jwt import TokenVerifier
from ext_authz.ratelimit import MemoryRateLimiter
from ext_authz.servicer import AuthorizationServicer
from ext_authz.settings import Settings
from gateway.config import ConfigError
from gateway.jwks import JwksClient
from gatewayctl.tokens import SigningKey
from tests.ext_authz.conftest import (
    ISSUER,
    Harness,
    JwksServer,
    StubEngine,
    check_request,
    denial,
    make_config,
    resource,
    token_for,
    upstream,
)

DELEGATION = "urn:test:delegation"
ACT = {"sub": "svc-workflow", "workflow": "order", "run": "r1"}


def settings_with_delegation(jwks_url: str, **entry: Any) -> Settings:
    issuers = [{"issuer": ISSUER, "jwks_url": jwks_url},
               {"issuer": DELEGATION, "jwks_url": jwks_url, "delegation": True,
                "algorithms": ["ES256"], "audiences": [resource("files")], **entry}]
    return Settings.from_config(make_config(jwks_url, issuers=issuers), port=0, host="127.0.0.1")


def build_two(settings: Settings, session: aiohttp.ClientSession) -> Harness:
    entries = {}
    for issuer in settings.issuers:
        jwks = JwksClient(issuer.jwks_url, session, cooldown=30, timeout=2, max_bytes=65536,
                          issuer=issuer.issuer)
        entries[issuer.issuer] = (issuer, jwks)
    engine = StubEngine()
    servicer = AuthorizationServicer(settings, TokenVerifier(entries, settings.auth),
                                     MemoryRateLimiter(), engine)
    return Harness(servicer, engine, entries[ISSUER][1])


@pytest.fixture
def authz(jwks_server: JwksServer, session: aiohttp.ClientSession) -> Harness:
    return build_two(settings_with_delegation(jwks_server.url), session)


def delegated(key: SigningKey, **extra: Any) -> str:
    claims: dict[str, Any] = {"caller_iss": ISSUER, "act": ACT}
    claims.update(extra)
    return token_for(key, issuer=DELEGATION, ttl=60,
                     extra_claims={k: v for k, v in claims.items() if v is not None})


@pytest.fixture
def decisions() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    log = logging.getLogger(LOGGER_NAME)
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.INFO)
    try:
        yield out
    finally:
        log.removeHandler(handler)
        log.setLevel(old)


async def test_delegated_caller_keeps_its_own_issuer(authz: Harness, ec_key: SigningKey,
                                                     decisions: io.StringIO) -> None:
    """The delegated token's caller is (caller_iss, sub): the upstream, the policy's
    ``input.token.iss`` and the session owner name the caller's issuer; ``input.token.act`` and
    the decision log name who acted (with the delegation issuer as ``act.iss``)."""
    headers, _ = upstream(await authz.check(check_request("post_tools_call_files",
                                                          delegated(ec_key))))
    assert headers["x-mcp-user"] == "alice" and headers["x-mcp-issuer"] == ISSUER
    token = authz.engine.inputs[-1]["token"]
    assert token["iss"] == ISSUER and "caller_iss" not in token
    assert token["act"] == {**ACT, "iss": DELEGATION}
    line = orjson.loads(decisions.getvalue().splitlines()[-1])
    assert line["sub"] == "alice" and line["act"] == {**ACT, "iss": DELEGATION}


async def test_own_token_has_no_actor(authz: Harness, ec_key: SigningKey,
                                      decisions: io.StringIO) -> None:
    """A caller's own token: no act in the policy input or the decision log."""
    upstream(await authz.check(check_request("post_tools_call_files", token_for(ec_key))))
    assert "act" not in authz.engine.inputs[-1]["token"]
    assert orjson.loads(decisions.getvalue().splitlines()[-1])["act"] is None


@pytest.mark.parametrize("extra", [
    {"caller_iss": None}, {"caller_iss": ""}, {"caller_iss": DELEGATION},
    {"caller_iss": "https://unknown.example"}, {"act": None}, {"act": "svc"}, {"act": {"x": 1}},
])
async def test_delegated_token_without_caller_or_actor_is_refused(
        authz: Harness, ec_key: SigningKey, extra: dict[str, Any]) -> None:
    """No caller's issuer (or one that is not a caller issuer: the delegation issuer itself, an
    unknown one) or no actor: 401 invalid_delegation, and the policy is never asked."""
    status, _, body = denial(await authz.check(check_request("post_tools_call_files",
                                                             delegated(ec_key, **extra))))
    assert status == 401 and body["error"]["data"]["reason"] == "invalid_delegation"
    assert not authz.engine.inputs


async def test_caller_claims_on_an_ordinary_issuer_mean_nothing(authz: Harness,
                                                                ec_key: SigningKey) -> None:
    """caller_iss in a token of an ordinary issuer does not change who the caller is."""
    token = token_for(ec_key, extra_claims={"caller_iss": "https://other.example"})
    headers, _ = upstream(await authz.check(check_request("post_tools_call_files", token)))
    assert headers["x-mcp-issuer"] == ISSUER


@pytest.mark.parametrize(("entry", "key"), [
    ({"advertise": True}, "advertise"),
    ({"audiences": None}, "audiences"),
    ({"audiences": ["https://gw.example.test/mcp"]}, "audiences"),
])
def test_delegation_issuer_config_is_checked(jwks_server: JwksServer, entry: dict[str, Any],
                                             key: str) -> None:
    """A delegation issuer is never advertised, lists its audiences and never names /mcp."""
    issuer = {"issuer": DELEGATION, "jwks_url": jwks_server.url, "delegation": True,
              "audiences": [resource("files")], **entry}
    issuer = {k: v for k, v in issuer.items() if v is not None}
    with pytest.raises(ConfigError, match=rf"issuers\[1\]\.{key}"):
        make_config(jwks_server.url, issuers=[{"issuer": ISSUER, "jwks_url": jwks_server.url},
                                              issuer])
    with pytest.raises(ConfigError, match="every issuer is a delegation issuer"):
        make_config(jwks_server.url, issuers=[{"issuer": DELEGATION, "jwks_url": jwks_server.url,
                                               "delegation": True,
                                               "audiences": [resource("files")]}])
