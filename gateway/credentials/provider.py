"""The upstream credential of one allowed request: ``servers.<name>.credentials`` turned into
the header(s) ext_authz sets on the request to that server.

The client's own token is never among them: ext_authz removes ``authorization`` from every
request to a server, and sets it again only with the credential resolved here. A credential that
cannot be had fails the request closed (``gateway.credentials.errors``); credential values are
never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType

from gateway.caller import Caller
from gateway.credentials.config import (
    CredentialsConfig,
    NoCredentials,
    StaticCredentials,
)
from gateway.credentials.errors import CredentialUnavailable

logger = logging.getLogger(__name__)

NO_HEADERS: Mapping[str, str] = MappingProxyType({})
# A credential becomes a header value: visible ASCII and spaces only, bounded.
MAX_CREDENTIAL_CHARS = 16 * 1024


def header_value(prefix: str, credential: str) -> str | None:
    """``prefix`` + ``credential`` as a header value, or None when it cannot be one."""
    value = prefix + credential
    if not credential or len(value) > MAX_CREDENTIAL_CHARS \
            or not all(" " <= c <= "~" for c in value) or value != value.strip():
        return None
    return value


class CredentialProvider:
    """Per server, the credential headers of an allowed request (see the module docstring).

    ``environ`` holds the secrets (ext_authz's environment). A server whose secret is missing
    or unusable is refused per request (503) with the reason logged once at start, so one
    misconfigured upstream does not take the others down."""

    def __init__(self, servers: Mapping[str, CredentialsConfig], environ: Mapping[str, str]) -> None:
        self._static: dict[str, Mapping[str, str] | None] = {}
        self._configs = dict(servers)
        for name, creds in servers.items():
            if isinstance(creds, StaticCredentials):
                value = header_value(creds.prefix, environ.get(creds.secret, ""))
                if value is None:
                    logger.error("server %s: its static credential is refused until the secret %s "
                                 "is set in ext_authz's environment as one line of printable "
                                 "ASCII", name, creds.secret)
                    self._static[name] = None
                else:
                    self._static[name] = MappingProxyType({creds.header: value})
            elif not isinstance(creds, NoCredentials):
                raise ValueError(f"servers.{name}.credentials.kind {creds.kind} is not supported")

    def header_of(self, server: str) -> str | None:
        """The header a server's credential goes in (None: the server gets none)."""
        creds = self._configs.get(server)
        return creds.header if creds is not None else None

    async def headers(self, server: str, caller: Caller, token: str) -> Mapping[str, str]:
        """The credential headers for ``caller`` (whose verified bearer token is ``token``) on
        ``server``; raises a ``GatewayError`` when the credential cannot be had."""
        creds = self._configs.get(server)
        if creds is None or isinstance(creds, NoCredentials):
            return NO_HEADERS
        if isinstance(creds, StaticCredentials):
            static = self._static.get(server)
            if static is None:
                raise CredentialUnavailable(
                    f"the gateway has no usable credential for server {server} (its secret is not "
                    f"set); ask the gateway's operator", data={"server": server})
            return static
        raise CredentialUnavailable(f"server {server}: credential kind {creds.kind} unavailable",
                                    data={"server": server})

    async def close(self) -> None:
        """Release connections and files (nothing for static credentials)."""
