"""servers.<name>.credentials: each kind's keys and defaults, and every mistake named by its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import DEFAULT_CONFIG_PATH, ConfigError, GatewayConfig, parse_config
from gateway.credentials.config import (
    ACCESS_TOKEN_TYPE,
    NoCredentials,
    StaticCredentials,
    TokenExchangeCredentials,
    UserStoreCredentials,
    credential_secrets,
)


def _config(credentials: Any, *, secrets: tuple[str, ...] = ("UP_KEY", "STS_SECRET", "STORE_KEY"),
            kind: str = "url", **extra: Any) -> GatewayConfig:
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    kinds: dict[str, dict[str, Any]] = {
        "url": {"url": "https://crm.example:8443/v1/mcp"},
        "module": {"module": "m", "instances": [{"port": 9201}]},
        "command": {"command": ["crm-mcp"], "instances": [{"port": 9201}]}}
    server = kinds[kind]
    if credentials is not ...:
        server["credentials"] = credentials
    raw["servers"] = {"crm": server}
    raw.pop("virtual_servers", None)
    raw["secrets"] = [*raw.get("secrets", []), *secrets]
    raw.update(extra)
    return parse_config(raw, base_dir=Path("/srv/gw"))


def test_default_is_none() -> None:
    """A server without credentials gets none (and no secret is needed for it)."""
    creds = _config(...).server("crm").credentials
    assert creds == NoCredentials() and creds.header is None
    assert credential_secrets(creds) == ()


def test_static_names_a_secret_and_a_header() -> None:
    """static: the header, the secret's name (never a value) and an optional prefix."""
    creds = _config({"kind": "static", "header": "x-api-key", "secret": "UP_KEY"}).server("crm").credentials
    assert creds == StaticCredentials("x-api-key", "UP_KEY", "")
    creds = _config({"kind": "static", "secret": "UP_KEY", "prefix": "Bearer "}).server("crm").credentials
    assert isinstance(creds, StaticCredentials) and creds.header == "authorization"
    assert credential_secrets(creds) == ("UP_KEY",)


def test_token_exchange_defaults() -> None:
    """token_exchange: audience defaults to the upstream (the server's URL), the client token
    as subject, an access token requested, Bearer in Authorization."""
    raw = {"kind": "token_exchange", "token_endpoint": "https://sts.example/token",
           "client_id": "gateway", "client_secret": "STS_SECRET"}
    creds = _config(raw).server("crm").credentials
    assert isinstance(creds, TokenExchangeCredentials)
    assert creds.audience == "https://crm.example:8443/v1/mcp"
    assert creds.subject == "client_token" and creds.requested_token_type == ACCESS_TOKEN_TYPE
    assert (creds.header, creds.prefix, creds.timeout_ms) == ("authorization", "Bearer ", 250)
    custom = _config({**raw, "audience": "urn:crm", "resource": "https://crm.example/",
                      "scope": "read", "subject": "assertion"},
                     identity={"assertion": True}).server("crm").credentials
    assert isinstance(custom, TokenExchangeCredentials)
    assert (custom.audience, custom.resource, custom.scope, custom.subject) == \
        ("urn:crm", "https://crm.example/", "read", "assertion")


def test_user_store_defaults_to_the_state_dir() -> None:
    """user_store: the SQLite file under state_dir unless a path is given, the key's secret."""
    creds = _config({"kind": "user_store", "key": "STORE_KEY"}, state_dir="/var/gw").server("crm").credentials
    assert creds == UserStoreCredentials("/var/gw/credentials.sqlite", "STORE_KEY")
    creds = _config({"kind": "user_store", "key": "STORE_KEY", "path": "creds.db"}).server("crm").credentials
    assert isinstance(creds, UserStoreCredentials) and creds.path == "/srv/gw/creds.db"


EXCHANGE = {"kind": "token_exchange", "token_endpoint": "https://sts.example/token",
            "client_id": "gateway", "client_secret": "STS_SECRET"}


@pytest.mark.parametrize(("credentials", "message"), [
    ("static", "servers.crm.credentials must be a mapping"),
    ({"kind": "vault"}, "servers.crm.credentials.kind must be one of"),
    ({"kind": "none", "secret": "UP_KEY"}, "servers.crm.credentials: unknown key(s) secret"),
    ({"kind": "static"}, "servers.crm.credentials.secret is required"),
    ({"kind": "static", "secret": "NOT_LISTED"}, "servers.crm.credentials.secret: 'NOT_LISTED' is "
                                                 "not listed in secrets"),
    ({"kind": "static", "secret": "UP_KEY", "header": "x-mcp-user"}, "servers.crm.credentials.header"),
    ({"kind": "static", "secret": "UP_KEY", "header": "Host"}, "servers.crm.credentials.header"),
    ({"kind": "static", "secret": "UP_KEY", "prefix": "a\nb"}, "servers.crm.credentials.prefix"),
    ({**EXCHANGE, "token_endpoint": "ftp://sts"}, "servers.crm.credentials.token_endpoint"),
    ({**EXCHANGE, "token_endpoint": "https://u:p@sts/t"}, "servers.crm.credentials.token_endpoint"),
    ({**EXCHANGE, "client_secret": "s3cr3t"}, "servers.crm.credentials.client_secret"),
    ({**EXCHANGE, "subject": "password"}, "servers.crm.credentials.subject"),
    ({**EXCHANGE, "requested_token_type": "jwt"}, "servers.crm.credentials.requested_token_type"),
    ({**EXCHANGE, "timeout_ms": 0}, "servers.crm.credentials.timeout_ms"),
    ({**EXCHANGE, "timeout_ms": 500}, "servers.crm.credentials.timeout_ms (500) must be less than "
                                      "ext_authz.timeout_ms (500)"),
    ({**EXCHANGE, "cache_size": -1}, "servers.crm.credentials.cache_size"),
    ({**EXCHANGE, "token_endpoint": "http://127.0.0.1/t", "ca_file": "ca.pem"},
     "servers.crm.credentials.ca_file"),
    ({"kind": "user_store"}, "servers.crm.credentials.key is required"),
])
def test_mistakes_are_named(credentials: Any, message: str) -> None:
    """Each invalid credentials entry is refused with a message naming its key."""
    with pytest.raises(ConfigError) as err:
        _config(credentials)
    assert message in str(err.value)


def test_a_credential_header_may_not_clash_with_a_static_url_header() -> None:
    """A url server's static header and its credential may not name the same header."""
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw.pop("virtual_servers", None)
    raw["secrets"] = [*raw.get("secrets", []), "UP_KEY"]
    raw["servers"] = {"crm": {"url": "http://crm:80/mcp", "headers": {"authorization": "Bearer ${UP_KEY}"},
                              "credentials": {"kind": "static", "secret": "UP_KEY"}}}
    with pytest.raises(ConfigError, match=r"servers\.crm\.credentials\.header: authorization is also"):
        parse_config(raw, base_dir=Path("/srv/gw"))


def test_assertion_subject_needs_the_assertion_on() -> None:
    """subject: assertion without identity.assertion is refused naming both keys."""
    raw = {**EXCHANGE, "subject": "assertion"}
    with pytest.raises(ConfigError, match=r"servers\.crm\.credentials\.subject: assertion needs "
                                          r"identity\.assertion: true"):
        _config(raw, identity=None)  # no identity: section
    with pytest.raises(ConfigError, match="identity.assertion"):
        _config(raw, identity={"assertion": False})


def _servers(servers: dict[str, Any], **extra: Any) -> GatewayConfig:
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw.pop("virtual_servers", None)
    raw["secrets"] = [*raw.get("secrets", []), "UP_KEY", "STS_SECRET", "STORE_KEY"]
    raw["servers"] = servers
    raw.update(extra)
    return parse_config(raw, base_dir=Path("/srv/gw"))


def test_an_exchange_may_not_target_another_servers_assertion_audience() -> None:
    """Neither a token exchange's audience nor its token endpoint may be a URI another server
    accepts caller assertions for (its audience key, else its gateway resource)."""
    files = {"url": "https://files.example/mcp", "audience": "https://files.example/aud"}
    crm = {"url": "https://crm.example/mcp", "credentials": EXCHANGE}
    _servers({"crm": crm, "files": files})
    for key, value, message in (
            ("audience", "https://files.example/aud", "server files"),
            ("audience", "https://127.0.0.1:8443/mcp/docs", "server docs"),
            ("token_endpoint", "https://files.example/aud", "server files")):
        bad = {**crm, "credentials": {**EXCHANGE, key: value}}
        with pytest.raises(ConfigError, match=rf"servers\.crm\.credentials\.{key} .*{message}"):
            _servers({"crm": bad, "files": files, "docs": {"url": "https://docs.example/mcp"}})


@pytest.mark.parametrize("kind", ["module", "command"])
@pytest.mark.parametrize("credentials", [
    {"kind": "static", "secret": "UP_KEY"}, EXCHANGE, {"kind": "user_store", "key": "STORE_KEY"}])
def test_credentials_are_for_url_servers_only(kind: str, credentials: Any) -> None:
    """A module or command server never receives request headers (the stdio bridge forwards
    none, module tools cannot read them): any credential but none is refused at load."""
    assert _config({"kind": "none"}, kind=kind).server("crm").credentials == NoCredentials()
    with pytest.raises(ConfigError, match=rf"servers\.crm\.credentials: kind {credentials['kind']} "
                                          rf"is for url servers only \(a {kind} server"):
        _config(credentials, kind=kind)


@pytest.mark.parametrize("endpoint", ["http://sts.example/token", "http://10.0.0.7:8080/token",
                                      "http://[2001:db8::1]/token", "http://[::ffff:127.0.0.1]/t"])
def test_plain_http_token_endpoint_only_on_loopback(endpoint: str) -> None:
    """The client secret and subject token cross the token endpoint's connection: plain http is
    refused except to a loopback host (127.0.0.0/8, ::1, localhost)."""
    with pytest.raises(ConfigError, match=r"servers\.crm\.credentials\.token_endpoint: plain "
                                          r"http only to a loopback host"):
        _config({**EXCHANGE, "token_endpoint": endpoint})
    for local in ("http://127.0.0.2:8080/token", "http://[::1]/token", "http://localhost/token"):
        creds = _config({**EXCHANGE, "token_endpoint": local}).server("crm").credentials
        assert isinstance(creds, TokenExchangeCredentials) and creds.token_endpoint == local


def test_each_server_has_its_own_assertion_audience() -> None:
    """Two servers may not share a caller assertion audience (explicit, or one's default
    <public_url>/mcp/<name>), nor take the aggregate endpoint's or a virtual server's."""
    files = {"url": "https://files.example/mcp", "audience": "https://files.example/aud"}
    config = _servers({"crm": {"url": "https://crm.example/mcp"}, "files": files})
    assert config.server_audience("files") == "https://files.example/aud"
    for audience, taken in (("https://files.example/aud", "server files"),
                            ("https://127.0.0.1:8443/mcp/files", "server files"),
                            ("https://127.0.0.1:8443/mcp", "the aggregate endpoint /mcp")):
        with pytest.raises(ConfigError, match=rf"servers\.(crm|files)\.audience '.*' is already the "
                                              rf"caller assertion audience of {taken}"):
            _servers({"files": files if "aud" in audience else {"url": "https://files.example/mcp"},
                      "crm": {"url": "https://crm.example/mcp", "audience": audience}})
    raw: dict[str, Any] = {"crm": {"url": "https://crm.example/mcp",
                                   "audience": "https://127.0.0.1:8443/mcp/reports"}}
    with pytest.raises(ConfigError, match=r"servers\.crm\.audience .* of the virtual server reports"):
        _servers(raw, aggregate={"enabled": True, "session_keys": "UP_KEY",
                                 "instances": [{"port": 9301}], "inner_listener": {"port": 9302}},
                 virtual_servers={"reports": {"tools": ["crm/*"]}})
