"""The console: section of the gateway config: validated once, errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from tests.console.conftest import ISSUER, PUBLIC_URL, console_settings


def _raw(tmp_path: Path, console: Any) -> dict[str, Any]:
    return {"public_url": PUBLIC_URL,
            "tls": {"cert_file": str(tmp_path / "c"), "key_file": str(tmp_path / "k")},
            "issuers": [{"issuer": ISSUER, "jwks_url": "http://127.0.0.1:1/jwks.json"}],
            "ext_authz": {"instances": [{"port": 1101}]}, "ext_proc": {"instances": [{"port": 1111}]},
            "servers": {"files": {"module": "mcp_servers.files", "instances": [{"port": 1201}]}},
            "state_dir": str(tmp_path), **({"console": console} if console is not None else {})}


def test_a_console_adds_its_audience_to_the_issuers_defaults(tmp_path: Path) -> None:
    """With a console: section, tokens for <public_url>/console are accepted; without, not."""
    with_console = parse_config(_raw(tmp_path, {"instances": [{"port": 1401}]}), base_dir=tmp_path)
    assert f"{PUBLIC_URL}/console" in with_console.issuers[0].audiences
    assert with_console.console.enabled and with_console.console_url() == f"{PUBLIC_URL}/console"
    without = parse_config(_raw(tmp_path, None), base_dir=tmp_path)
    assert not without.console.enabled
    assert f"{PUBLIC_URL}/console" not in without.issuers[0].audiences


@pytest.mark.parametrize(("console", "key"), [
    ({"instances": [{"port": 1401}], "session_seconds": 10}, "console.session_seconds"),
    ({"instances": []}, "console.instances"),
    ({"instances": [{"port": 1401}], "entrypoint": "x"}, "console.entrypoint"),
    ({"instances": [{"port": 1401}], "colour": "blue"}, "console"),
    ({"instances": [{"port": 1101}]}, "console.instances[0]"),
    ({"instances": [{"port": 1401}, {"port": 1402}]}, "console.instances"),
    ({"instances": [{"port": 1401}], "oidc": {
        "issuer": "https://other.example", "client_id": "c", "authorization_endpoint": "https://a/x",
        "token_endpoint": "https://a/t"}}, "console.oidc.issuer"),
    ({"instances": [{"port": 1401}], "oidc": {
        "issuer": ISSUER, "client_id": "c", "authorization_endpoint": "http://idp.example/authorize",
        "token_endpoint": "https://idp.example/token"}}, "console.oidc.authorization_endpoint"),
], ids=["session-too-short", "no-instances", "bad-entrypoint", "unknown-key", "port-clash", "two-processes",
        "oidc-unknown-issuer", "oidc-plain-http"])
def test_bad_console_settings_are_refused_naming_the_key(tmp_path: Path, console: Any, key: str) -> None:
    """Each mistake is a ConfigError whose message names the offending key."""
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_config(_raw(tmp_path, console), base_dir=tmp_path)


def test_a_missing_client_secret_stops_the_console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """console.oidc.client_secret_env naming an unset variable fails the console's start."""
    monkeypatch.delenv("CONSOLE_TEST_SECRET", raising=False)
    with pytest.raises(ConfigError, match="console.oidc.client_secret_env"):
        console_settings(tmp_path, "http://127.0.0.1:1/jwks.json", oidc={
            "issuer": ISSUER, "client_id": "c", "client_secret_env": "CONSOLE_TEST_SECRET",
            "authorization_endpoint": "https://idp.example/a", "token_endpoint": "https://idp.example/t"})
