"""Static upstream credentials through ext_authz (both transports) and the rendered Envoy routes:
the credential replaces the client's token in its header, never beside it, on the credentialed
server only; every other server still loses the client's token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml

from ext_authz.http_front import answer
from ext_authz.response import Verdict
from ext_authz.servicer import AuthorizationServicer
from ext_authz.settings import Settings
from gateway.assertion import new_private_jwk
from gateway.caller import Caller
from gateway.config import GatewayConfig
from gateway.credentials.config import StaticCredentials
from gateway.credentials.errors import CredentialUnavailable
from gateway.credentials.provider import CredentialProvider
from gateway.wire import REMOVE_HEADER
from gatewayctl import envoy_config
from gatewayctl.tokens import SigningKey
from tests.ext_authz.conftest import (
    Harness,
    JwksServer,
    StubEngine,
    build,
    check_request,
    denial,
    make_config,
    token_for,
    upstream,
)
from tests.gateway.credentials.sts import TokenServer

SECRET = "up-secret-value-42"
CALLER = Caller(sub="alice", issuer="https://idp", tenant="acme", client_id="c", roles=("analyst",))


def _config(jwks_url: str, credentials: dict[str, Any], transport: str = "grpc") -> GatewayConfig:
    return make_config(jwks_url, secrets=["UP_KEY"], ext_authz={"transport": transport,
                                                                 "instances": [{"port": 9101}]},
                       servers={"files": {"url": "http://127.0.0.1:9201/mcp",
                                          "credentials": credentials},
                                "database": {"module": "m", "instances": [{"port": 9211}]}})


def _harness(jwks_url: str, session: aiohttp.ClientSession, credentials: dict[str, Any],
             environ: dict[str, str]) -> Harness:
    settings = Settings.from_config(_config(jwks_url, credentials), port=0, host="127.0.0.1")
    harness = build(settings, session, StubEngine())
    # The servicer as app.py builds it: the provider reads the secrets from the environment.
    harness.servicer = AuthorizationServicer(
        settings, harness.servicer._verifier, harness.servicer._limiter, harness.engine,
        credentials=CredentialProvider(settings.credentials, environ))
    return harness


async def test_static_authorization_replaces_the_client_token(
        jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: SigningKey) -> None:
    """On the credentialed server Authorization is overwritten with the credential and not
    removed; on the other server the client's token is removed as before."""
    authz = _harness(jwks_server.url, session, {"kind": "static", "secret": "UP_KEY",
                                                "prefix": "Bearer "}, {"UP_KEY": SECRET})
    token = token_for(rsa_key)
    headers, removed = upstream(await authz.check(check_request("post_tools_call_files", token)))
    assert headers["authorization"] == f"Bearer {SECRET}"
    assert "authorization" not in removed
    assert token not in "".join(headers.values())
    db_token = token_for(rsa_key, server="database")
    headers, removed = upstream(await authz.check(check_request(
        "post_tools_call_files", db_token, path="/mcp/database")))
    assert "authorization" in removed and "authorization" not in headers


async def test_static_other_header_keeps_stripping_the_token(
        jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: SigningKey) -> None:
    """A credential in its own header (x-api-key) leaves the token's removal in place."""
    authz = _harness(jwks_server.url, session, {"kind": "static", "secret": "UP_KEY",
                                                "header": "x-api-key"}, {"UP_KEY": SECRET})
    headers, removed = upstream(await authz.check(check_request("post_tools_call_files",
                                                                token_for(rsa_key))))
    assert headers["x-api-key"] == SECRET
    assert "authorization" in removed and "authorization" not in headers


async def test_missing_secret_fails_closed(
        jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: SigningKey) -> None:
    """A static credential whose secret is not set answers 503 with a reason, never allows."""
    authz = _harness(jwks_server.url, session, {"kind": "static", "secret": "UP_KEY"}, {})
    status, headers, body = denial(await authz.check(check_request("post_tools_call_files",
                                                                   token_for(rsa_key))))
    assert status == 503 and headers["retry-after"] == "1"
    assert body["error"]["data"]["reason"] == "upstream_credential_unavailable"
    assert body["error"]["data"]["server"] == "files"


@pytest.mark.parametrize("secret", ["two\nlines", "", " padded"])
async def test_unusable_secret_is_refused(secret: str) -> None:
    """A secret that cannot be a header value is never sent."""
    provider = CredentialProvider({"files": StaticCredentials("authorization", "UP_KEY")},
                                  {"UP_KEY": secret})
    with pytest.raises(CredentialUnavailable):
        await provider.headers("files", CALLER, "client-token")


def test_http_front_sets_the_credential_and_does_not_remove_it() -> None:
    """Over Envoy's HTTP mode the credential is an answer header and not in the removal list."""
    verdict = Verdict.allow({"x-mcp-user": "alice"}, credentials={"authorization": "Bearer up"})
    resp = answer(verdict)
    assert resp.headers["authorization"] == "Bearer up"
    assert "authorization" not in resp.headers[REMOVE_HEADER].split(",")
    plain = answer(Verdict.allow({"x-mcp-user": "alice"}))
    assert "authorization" in plain.headers[REMOVE_HEADER].split(",")
    assert "authorization" not in plain.headers


def test_a_request_keeping_the_token_takes_no_credential() -> None:
    """The aggregator's requests keep the client's token: a credential there is a bug."""
    with pytest.raises(ValueError, match="keeps the client's token"):
        Verdict.allow({}, keep_token=True, credentials={"authorization": "Bearer up"})


def _routes(rendered: str) -> dict[str, list[str]]:
    doc = yaml.safe_load(rendered)
    out: dict[str, list[str]] = {}
    for listener in doc["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for flt in chain["filters"]:
                hcm = flt.get("typed_config", {})
                for vhost in hcm.get("route_config", {}).get("virtual_hosts", []):
                    for route in vhost["routes"]:
                        out[route["name"]] = route.get("request_headers_to_remove", [])
    return out


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_rendered_routes_leave_authorization_to_ext_authz_only_where_credentialed(transport: str) -> None:
    """Routes of a server whose credential goes in Authorization do not remove it (ext_authz
    sets it after removing the client's); every other server's routes still remove it; in HTTP
    mode Envoy takes Authorization from ext_authz's answer."""
    config = _config("http://127.0.0.1:1/jwks.json", {"kind": "static", "secret": "UP_KEY"}, transport)
    rendered = envoy_config.render(config, envoy_config.RenderOptions(ext_proc=True))
    routes = _routes(rendered)
    files = [n for n in routes if n.startswith("files_") and "mcp" in n and "metadata" not in n]
    database = [n for n in routes if n.startswith("database_") and "mcp" in n and "metadata" not in n]
    assert files and database
    assert all("authorization" not in routes[n] for n in files)
    assert all("authorization" in routes[n] for n in database)
    if transport == "http":
        assert '{exact: "authorization"}' in rendered


async def test_token_exchange_through_the_check(
        jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: SigningKey) -> None:
    """An allowed check carries the exchanged token in Authorization (the client's token was
    the subject); a second check of the same caller is served from the cache; an endpoint that
    refuses answers 502, one that is down 503 with Retry-After."""
    sts = TokenServer(client_secret=SECRET)
    await sts.start()
    authz = _harness(jwks_server.url, session, {
        "kind": "token_exchange", "token_endpoint": sts.url, "client_id": "gateway",
        "client_secret": "UP_KEY", "audience": "urn:files"}, {"UP_KEY": SECRET})
    try:
        token = token_for(rsa_key)
        for _ in range(2):
            headers, removed = upstream(await authz.check(check_request("post_tools_call_files", token)))
            assert headers["authorization"] == f"Bearer {sts.issued[0].token}"
            assert "authorization" not in removed
        assert len(sts.requests) == 1
        assert sts.issued[0].subject_token == token and sts.issued[0].audience == "urn:files"
        sts.mode = "refuse"
        status, _, body = denial(await authz.check(check_request(
            "post_tools_call_files", token_for(rsa_key, ttl=599))))
        assert status == 502 and body["error"]["data"]["reason"] == "token_exchange_refused"
        assert body["error"]["data"]["error"] == "invalid_grant"
        await sts.stop()
        status, headers, body = denial(await authz.check(check_request(
            "post_tools_call_files", token_for(rsa_key, ttl=598))))
        assert status == 503 and headers["retry-after"] == "1"
        assert body["error"]["data"]["reason"] == "token_exchange_unavailable"
    finally:
        await sts.stop()
        await authz.servicer._credentials.close()


async def test_assertion_subject_through_the_check(
        jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: SigningKey,
        tmp_path: Path) -> None:
    """With identity.assertion on, a server exchanging the caller assertion gets a token issued
    for an assertion the gateway signed (its own signer), never the client's token."""
    keys = tmp_path / "assertion-keys.json"
    keys.write_text(json.dumps({"keys": [new_private_jwk()]}), encoding="utf-8")
    sts = TokenServer(client_secret=SECRET)
    await sts.start()
    config = make_config(
        jwks_server.url, secrets=["UP_KEY"], identity={"assertion": True, "keys": str(keys)},
        servers={"files": {"url": "http://127.0.0.1:9201/mcp", "credentials": {
            "kind": "token_exchange", "token_endpoint": sts.url, "client_id": "gateway",
            "client_secret": "UP_KEY", "subject": "assertion"}}})
    settings = Settings.from_config(config, port=0, host="127.0.0.1")
    harness = build(settings, session, StubEngine())
    servicer = AuthorizationServicer(
        settings, harness.servicer._verifier, harness.servicer._limiter, harness.engine,
        credentials=CredentialProvider(settings.credentials, {"UP_KEY": SECRET}))
    try:
        token = token_for(rsa_key)
        headers, _ = upstream(await servicer.Check(check_request("post_tools_call_files", token), None))
        assert headers["authorization"] == f"Bearer {sts.issued[0].token}"
        form = sts.requests[0]["form"]
        assert form["subject_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
        assert form["subject_token"] != token and token not in form.values()
        assert jwt.decode(form["subject_token"], options={"verify_signature": False})["sub"] == "alice"
    finally:
        await sts.stop()
        await servicer._credentials.close()
