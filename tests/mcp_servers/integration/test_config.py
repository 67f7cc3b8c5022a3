from __future__ import annotations

import argparse

import pytest

from mcp_servers.integration.credentials import ApiKey, OAuthClientCredentials
from mcp_servers.integration.openapi import OpenAPIError
from mcp_servers.integration.server import add_arguments, credentials_from_args


def _ns(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--openapi", "api.json", *argv])


def test_exactly_one_credential_source_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials, or two kinds at once, is a start-up error (fail closed)."""
    monkeypatch.setenv("K", "v")
    with pytest.raises(OpenAPIError, match="exactly one"):
        credentials_from_args(_ns())
    with pytest.raises(OpenAPIError, match="exactly one"):
        credentials_from_args(_ns("--api-key-env", "K", "--oauth-token-url", "http://t"))


def test_secrets_come_from_set_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unset secret variable is refused; set ones give API-key or OAuth credentials."""
    monkeypatch.delenv("MISSING", raising=False)
    with pytest.raises(OpenAPIError, match="MISSING"):
        credentials_from_args(_ns("--api-key-env", "MISSING"))
    monkeypatch.setenv("K", "v")
    assert isinstance(credentials_from_args(_ns("--api-key-env", "K")), ApiKey)
    with pytest.raises(OpenAPIError, match="--client-id"):
        credentials_from_args(_ns("--oauth-token-url", "http://t/token"))
    creds = credentials_from_args(_ns("--oauth-token-url", "http://t/token", "--client-id", "c",
                                      "--client-secret-env", "K"))
    assert isinstance(creds, OAuthClientCredentials)
