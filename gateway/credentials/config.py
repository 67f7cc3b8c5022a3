"""``servers.<name>.credentials``: what the gateway presents to one upstream on the caller's behalf.

Parsed once with the rest of the config (``gateway.config`` calls :func:`parse_credentials`);
errors are :class:`CredentialsConfigError` naming the key, which the config loader reports as
its own ``ConfigError``. This module imports nothing from ``gateway.config`` (that one imports
this), so it has its own small readers.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

CREDENTIAL_KINDS = ("none", "static", "token_exchange", "user_store")
# What the token exchange presents as its subject: the client's own verified token, or the
# gateway's signed caller assertion (gateway.assertion).
SUBJECT_KINDS = ("client_token", "assertion")
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105  # a URN
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105  # a URN
# Bounds of the exchange client (docs/upstream-credentials.md).
DEFAULT_EXCHANGE_TIMEOUT_MS = 250
DEFAULT_EXCHANGE_CACHE_SIZE = 10_000
MAX_EXCHANGE_CACHE_SIZE = 1_000_000
DEFAULT_REFRESH_BEFORE_SECONDS = 30
DEFAULT_STORE_FILE = "credentials.sqlite"

_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
_TOKEN_TYPE = re.compile(r"^urn:ietf:params:oauth:token-type:[a-z0-9_-]+$")
# Headers a credential may not set: Envoy's, the gateway's, the protocol's and hop-by-hop ones.
_RESERVED = frozenset({
    "host", "content-length", "content-type", "transfer-encoding", "connection", "te", "upgrade",
    "mcp-session-id", "mcp-protocol-version", "mcp-method", "mcp-name", "accept", "traceparent",
    "tracestate", "cookie", "origin"})


class CredentialsConfigError(ValueError):
    """``servers.<name>.credentials`` is invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class NoCredentials:
    """The upstream gets no credential from the gateway (and never the client's token)."""

    kind: str = "none"

    @property
    def header(self) -> str | None:
        return None


@dataclass(frozen=True, slots=True)
class StaticCredentials:
    """One header whose value is ``prefix`` + the value of the secret ``secret``."""

    header: str
    secret: str
    prefix: str = ""
    kind: str = "static"


@dataclass(frozen=True, slots=True)
class TokenExchangeCredentials:
    """RFC 8693 token exchange at ``token_endpoint``; the issued token goes in ``header`` as
    ``prefix`` + token. The gateway authenticates as ``client_id`` with the secret named by
    ``client_secret`` (client_secret_basic)."""

    token_endpoint: str
    client_id: str
    client_secret: str  # a secret's name
    audience: str
    resource: str | None = None
    scope: str | None = None
    subject: str = "client_token"
    requested_token_type: str = ACCESS_TOKEN_TYPE
    header: str = "authorization"
    prefix: str = "Bearer "
    timeout_ms: int = DEFAULT_EXCHANGE_TIMEOUT_MS
    cache_size: int = DEFAULT_EXCHANGE_CACHE_SIZE
    refresh_before_seconds: int = DEFAULT_REFRESH_BEFORE_SECONDS
    ca_file: str | None = None  # an https endpoint's CA bundle (None: the system store)
    kind: str = "token_exchange"


@dataclass(frozen=True, slots=True)
class UserStoreCredentials:
    """Credentials users registered for this upstream (``mcp-gateway credentials set``), kept
    encrypted in the SQLite file ``path`` under the key(s) in the secret ``key``."""

    path: str
    key: str  # a secret's name
    header: str = "authorization"
    prefix: str = "Bearer "
    kind: str = "user_store"


CredentialsConfig = NoCredentials | StaticCredentials | TokenExchangeCredentials | UserStoreCredentials

_KEYS: dict[str, set[str]] = {
    "none": {"kind"},
    "static": {"kind", "header", "secret", "prefix"},
    "token_exchange": {"kind", "token_endpoint", "client_id", "client_secret", "audience",
                       "resource", "scope", "subject", "requested_token_type", "header", "prefix",
                       "timeout_ms", "cache_size", "refresh_before_seconds", "ca_file"},
    "user_store": {"kind", "path", "key", "header", "prefix"},
}


def parse_credentials(raw: Any, where: str, *, secrets: tuple[str, ...], audience: str,
                      state_dir: str, path: Callable[[str], str]) -> CredentialsConfig:
    """``raw`` is the value of ``servers.<name>.credentials`` (None: absent). ``audience`` is the
    default audience of a token exchange (the upstream), ``state_dir`` where the user store's
    file goes by default, ``path`` resolves a configured path."""
    where = f"{where}.credentials"
    if raw is None:
        return NoCredentials()
    if not isinstance(raw, dict):
        raise CredentialsConfigError(f"{where} must be a mapping with a kind "
                                     f"({', '.join(CREDENTIAL_KINDS)})")
    kind = raw.get("kind", "none")
    if kind not in CREDENTIAL_KINDS:
        raise CredentialsConfigError(f"{where}.kind must be one of {', '.join(CREDENTIAL_KINDS)}, "
                                     f"not {kind!r}")
    unknown = set(raw) - _KEYS[kind]
    if unknown:
        raise CredentialsConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} for "
                                     f"kind {kind}")
    if kind == "none":
        return NoCredentials()
    header = _header(raw, where)
    prefix = _text(raw, "prefix", where, "" if kind == "static" else "Bearer ")
    if kind == "static":
        return StaticCredentials(header, _secret(raw, "secret", where, secrets), prefix)
    if kind == "user_store":
        file = _text(raw, "path", where, "")
        return UserStoreCredentials(path(file) if file else f"{state_dir}/{DEFAULT_STORE_FILE}",
                                    _secret(raw, "key", where, secrets), header, prefix)
    endpoint = _text(raw, "token_endpoint", where)
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment \
            or parts.username is not None or parts.password is not None:
        raise CredentialsConfigError(f"{where}.token_endpoint must be an http(s) URL without "
                                     f"credentials or fragment, got {endpoint!r}")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        # The client secret and the subject token cross this connection.
        raise CredentialsConfigError(f"{where}.token_endpoint: plain http only to a loopback host "
                                     f"(127.0.0.0/8, ::1, localhost); use https for "
                                     f"{parts.hostname!r}")
    client_id = _text(raw, "client_id", where)
    if not client_id:
        raise CredentialsConfigError(f"{where}.client_id must not be empty")
    subject = _text(raw, "subject", where, "client_token")
    if subject not in SUBJECT_KINDS:
        raise CredentialsConfigError(f"{where}.subject must be one of {', '.join(SUBJECT_KINDS)}, "
                                     f"not {subject!r}")
    token_type = _text(raw, "requested_token_type", where, ACCESS_TOKEN_TYPE)
    if not _TOKEN_TYPE.match(token_type):
        raise CredentialsConfigError(f"{where}.requested_token_type must be an RFC 8693 token "
                                     f"type URN (urn:ietf:params:oauth:token-type:...), got "
                                     f"{token_type!r}")
    ca_file = _text(raw, "ca_file", where, "")
    if ca_file and parts.scheme != "https":
        raise CredentialsConfigError(f"{where}.ca_file: only for an https token_endpoint")
    return TokenExchangeCredentials(
        token_endpoint=endpoint, client_id=client_id,
        client_secret=_secret(raw, "client_secret", where, secrets),
        audience=_text(raw, "audience", where, audience) or audience,
        resource=_text(raw, "resource", where, "") or None,
        scope=_text(raw, "scope", where, "") or None, subject=subject,
        requested_token_type=token_type, header=header, prefix=prefix,
        timeout_ms=_int(raw, "timeout_ms", where, DEFAULT_EXCHANGE_TIMEOUT_MS, 1, 60_000),
        cache_size=_int(raw, "cache_size", where, DEFAULT_EXCHANGE_CACHE_SIZE, 0,
                        MAX_EXCHANGE_CACHE_SIZE),
        refresh_before_seconds=_int(raw, "refresh_before_seconds", where,
                                    DEFAULT_REFRESH_BEFORE_SECONDS, 0, 3600),
        ca_file=path(ca_file) if ca_file else None)


def credential_secrets(credentials: CredentialsConfig) -> tuple[str, ...]:
    """The secrets (environment variable names) ext_authz needs for these credentials."""
    if isinstance(credentials, StaticCredentials):
        return (credentials.secret,)
    if isinstance(credentials, TokenExchangeCredentials):
        return (credentials.client_secret,)
    if isinstance(credentials, UserStoreCredentials):
        return (credentials.key,)
    return ()


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _text(raw: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    if key not in raw:
        if default is None:
            raise CredentialsConfigError(f"{where}.{key} is required")
        return default
    value = raw[key]
    if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
        raise CredentialsConfigError(f"{where}.{key} must be a one-line string, got {value!r}")
    return value


def _int(raw: dict[str, Any], key: str, where: str, default: int, low: int, high: int) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise CredentialsConfigError(f"{where}.{key} must be an integer from {low} to {high}, "
                                     f"got {value!r}")
    return value


def _header(raw: dict[str, Any], where: str) -> str:
    name = _text(raw, "header", where, "authorization")
    if not _HEADER_NAME.match(name) or name in _RESERVED \
            or name.startswith(("x-mcp-", "x-envoy-", "mcp-gateway-", ":")):
        raise CredentialsConfigError(f"{where}.header: {name!r} is not a lower-case header name "
                                     f"a credential may set (not the gateway's, Envoy's or the "
                                     f"protocol's own)")
    return name


def _secret(raw: dict[str, Any], key: str, where: str, secrets: tuple[str, ...]) -> str:
    name = _text(raw, key, where)
    if name not in secrets:
        raise CredentialsConfigError(f"{where}.{key}: {name!r} is not listed in secrets (name the "
                                     f"secret, never its value)")
    return name
