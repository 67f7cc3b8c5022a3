"""The upstream credential of one allowed request: ``servers.<name>.credentials`` turned into
the header(s) ext_authz sets on the request to that server.

The client's own token is never among them: ext_authz removes ``authorization`` from every
request to a server, and sets it again only with the credential resolved here. A credential that
cannot be had fails the request closed (``gateway.credentials.errors``); credential values are
never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from gateway.caller import Caller
from gateway.credentials.config import (
    ACCESS_TOKEN_TYPE,
    JWT_TOKEN_TYPE,
    CredentialsConfig,
    NoCredentials,
    StaticCredentials,
    TokenExchangeCredentials,
    UserStoreCredentials,
)
from gateway.credentials.errors import CredentialMissing, CredentialUnavailable, TokenExchangeRefused
from gateway.credentials.exchange import TokenExchangeClient, subject_expiry
from gateway.credentials.metrics import CREDENTIALS
from gateway.credentials.store import CredentialStore, StoreError, derive_keys

if TYPE_CHECKING:
    from gateway.assertion import AssertionSigner

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

    def __init__(self, servers: Mapping[str, CredentialsConfig], environ: Mapping[str, str], *,
                 signer: AssertionSigner | None = None) -> None:
        self._signer = signer
        self._static: dict[str, Mapping[str, str] | None] = {}
        self._exchange: dict[str, TokenExchangeClient | None] = {}
        self._stores: dict[str, CredentialStore | None] = {}
        opened: dict[tuple[str, str], CredentialStore | None] = {}
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
            elif isinstance(creds, TokenExchangeCredentials):
                secret = environ.get(creds.client_secret, "")
                if not secret:
                    logger.error("server %s: token exchange is refused until the secret %s (the "
                                 "gateway's client secret at %s) is set in ext_authz's environment",
                                 name, creds.client_secret, creds.token_endpoint)
                self._exchange[name] = TokenExchangeClient(name, creds, secret) if secret else None
            elif isinstance(creds, UserStoreCredentials):
                where = (creds.path, creds.key)
                if where not in opened:
                    opened[where] = _open_store(name, creds, environ.get(creds.key, ""))
                self._stores[name] = opened[where]
            elif not isinstance(creds, NoCredentials):
                raise ValueError(f"servers.{name}.credentials.kind {creds.kind} is not supported")

    def use_signer(self, signer: AssertionSigner | None) -> None:
        """The gateway's assertion signer (identity.assertion), for token exchanges whose
        subject is the caller assertion; None: such exchanges are refused (503)."""
        self._signer = signer

    async def headers(self, server: str, caller: Caller, token: str, *,
                      decision_id: str = "") -> Mapping[str, str]:
        """The credential headers for ``caller`` (whose verified bearer token is ``token``) on
        ``server``; raises a ``GatewayError`` when the credential cannot be had. ``decision_id``
        goes into a caller assertion minted as a token exchange's subject."""
        creds = self._configs.get(server)
        if creds is None or isinstance(creds, NoCredentials):
            return NO_HEADERS
        if isinstance(creds, StaticCredentials):
            static = self._static.get(server)
            CREDENTIALS.labels(server, creds.kind, "sent" if static else "unavailable").inc()
            if static is None:
                raise CredentialUnavailable(
                    f"the gateway has no usable credential for server {server} (its secret is not "
                    f"set); ask the gateway's operator", data={"server": server})
            return static
        if isinstance(creds, TokenExchangeCredentials):
            return await self._exchanged(server, creds, caller, token, decision_id)
        if isinstance(creds, UserStoreCredentials):
            return await self._registered(server, creds, caller)
        raise CredentialUnavailable(f"server {server}: credential kind {creds.kind} unavailable",
                                    data={"server": server})

    async def _exchanged(self, server: str, creds: TokenExchangeCredentials, caller: Caller,
                         token: str, decision_id: str) -> Mapping[str, str]:
        client = self._exchange.get(server)
        if client is None:
            raise CredentialUnavailable(
                f"the gateway cannot exchange tokens for server {server} (its client secret is "
                f"not set); ask the gateway's operator", data={"server": server})
        # An exchanged token is dropped when the client's token expires, whichever the subject.
        not_after = subject_expiry(caller.claims)
        if creds.subject == "assertion":
            signer = self._signer
            if signer is None:
                raise CredentialUnavailable(
                    f"server {server} exchanges the gateway's caller assertion, which is off "
                    f"(identity.assertion); ask the gateway's operator", data={"server": server})
            # A fresh assertion per exchange (unique jti) whose audience is the token endpoint
            # (RFC 8693: the STS is the subject token's audience), never an upstream, so neither
            # the endpoint nor its traffic holds an assertion an upstream would accept. The cache
            # is keyed by who the caller is, since the assertion itself differs every time.
            def mint() -> str:
                try:
                    return signer.mint(caller, creds.token_endpoint, decision_id)
                except (ValueError, OSError) as exc:  # the key file went missing or bad
                    logger.error("server %s: no caller assertion could be minted: %s", server, exc)
                    raise CredentialUnavailable(
                        f"the gateway cannot sign a caller assertion for server {server} now",
                        data={"server": server}) from None

            issued = await client.token(
                mint, JWT_TOKEN_TYPE, key=client.cache_key(caller_key(caller), creds.audience),
                not_after=not_after)
        else:
            # The client's verified token: the cache is keyed by its digest.
            issued = await client.token(token, ACCESS_TOKEN_TYPE,
                                        key=client.cache_key(token, creds.audience),
                                        not_after=not_after)
        value = header_value(creds.prefix, issued)
        if value is None:
            raise TokenExchangeRefused(f"the token endpoint issued an unusable token for server "
                                       f"{server}", data={"server": server, "error": "invalid_answer"})
        return {creds.header: value}

    async def _registered(self, server: str, creds: UserStoreCredentials, caller: Caller
                          ) -> Mapping[str, str]:
        store = self._stores.get(server)
        if store is None:
            CREDENTIALS.labels(server, creds.kind, "unavailable").inc()
            raise CredentialUnavailable(
                f"the gateway cannot read registered credentials for server {server}; ask the "
                f"gateway's operator", data={"server": server})
        try:
            value = await asyncio.to_thread(store.get, caller.issuer or "", caller.sub, server)
        except StoreError as exc:
            logger.error("server %s: the credential store failed closed: %s", server, exc)
            CREDENTIALS.labels(server, creds.kind, "unavailable").inc()
            raise CredentialUnavailable(
                f"the registered credential for server {server} cannot be read now; ask the "
                f"gateway's operator", data={"server": server}) from None
        CREDENTIALS.labels(server, creds.kind, "missing" if value is None else "sent").inc()
        if value is None:
            raise CredentialMissing(
                f"you have no credential registered for server {server}: register one for this "
                f"server (`mcp-gateway credentials set --server {server} --sub <your user>`, "
                f"run by the gateway's operator), then retry",
                data={"server": server, "action": "register_credential"})
        header = header_value(creds.prefix, value)
        if header is None:
            raise CredentialUnavailable(f"the registered credential for server {server} cannot "
                                        f"be sent (not one line of printable ASCII); register it "
                                        f"again", data={"server": server})
        return {creds.header: header}

    async def close(self) -> None:
        """Release the token endpoints' connections and the stores' files."""
        for client in self._exchange.values():
            if client is not None:
                await client.close()
        for store in {id(s): s for s in self._stores.values() if s is not None}.values():
            store.close()


def caller_key(caller: Caller) -> str:
    """Who the caller is, for the exchange cache of assertion subjects: everything an
    assertion says about them (a change of roles or tenant is another caller)."""
    text = "\0".join((caller.issuer or "", caller.sub, caller.tenant or "", caller.client_id or "",
                      ",".join(caller.roles)))
    return hashlib.sha256(text.encode()).hexdigest()


def _open_store(name: str, creds: UserStoreCredentials, secret: str) -> CredentialStore | None:
    """The store of a server, or None (refused per request) with the reason logged."""
    try:
        return CredentialStore(creds.path, derive_keys(secret))
    except ValueError as exc:
        logger.error("server %s: registered credentials are refused until the secret %s is set "
                     "in ext_authz's environment (%s)", name, creds.key, exc)
    except StoreError as exc:
        logger.error("server %s: %s", name, exc)
    return None
