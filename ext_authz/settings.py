"""Typed settings of the ext_authz service, derived once from the gateway config."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.aggregate.session_token import parse_keys
from gateway.aggregate.views import AGGREGATE_PATH, View, views_from_config
from gateway.config import (
    AuditConfig,
    AuthConfig,
    CatalogConfig,
    ConfigError,
    GatewayConfig,
    IdentityConfig,
    Instance,
    IssuerConfig,
    PolicyConfig,
    RateLimitConfig,
    TelemetryConfig,
)
from gateway.credentials.config import CredentialsConfig
from gateway.upstream import UpstreamTarget, targets

logger = logging.getLogger(__name__)

# Envoy must never wait on us longer than its own ext_authz timeout; these stay well below the
# default 500 ms so that a slow dependency is answered (closed) instead of timing out in Envoy.
REDIS_TIMEOUT_SECONDS = 0.2
JWKS_MAX_BYTES = 256 * 1024
# Session bindings (ext_authz.sessions): idle time after which a binding is forgotten (at least
# the servers' own session idle timeout) and how many one process keeps in memory.
SESSION_IDLE_SECONDS = 3600.0
MAX_SESSION_BINDINGS = 100_000
# The secret holding the aggregate session keys when the config does not name one.
DEFAULT_SESSION_KEYS_SECRET = "MCP_GATEWAY_AGGREGATE_KEYS"  # noqa: S105  # a variable name, not a key


@dataclass(frozen=True, slots=True)
class Settings:
    issuers: tuple[IssuerConfig, ...]
    auth: AuthConfig
    policy: PolicyConfig
    rate_limits: RateLimitConfig
    public_url: str
    servers: frozenset[str]
    listen: Instance
    max_request_bytes: int
    telemetry: TelemetryConfig = TelemetryConfig()
    audit: AuditConfig = AuditConfig()
    catalog: CatalogConfig = CatalogConfig()
    # server name -> each of its endpoints (gateway.upstream): catalog refresh goes direct, with
    # the URL, TLS and static headers Envoy uses for a `url` server.
    server_targets: Mapping[str, tuple[UpstreamTarget, ...]] = field(default_factory=dict)
    redis_timeout_seconds: float = REDIS_TIMEOUT_SECONDS
    jwks_max_bytes: int = JWKS_MAX_BYTES
    transport: str = "grpc"  # "grpc" | "http" (Envoy's HTTP mode, ext_authz.http_front)
    session_idle_seconds: float = SESSION_IDLE_SECONDS
    max_session_bindings: int = MAX_SESSION_BINDINGS
    # How many ext_authz processes share the traffic (per-process session bindings warn).
    processes: int = 1
    # The aggregate endpoints (gateway.aggregate): views by name ("" is /mcp), and the key ring
    # that opens their sealed session ids, newest first. No views: /mcp is not served.
    views: Mapping[str, View] = field(default_factory=dict)
    session_keys: tuple[bytes, ...] = ()
    # The caller assertion (gateway.assertion): off here unless the config turns it on; then
    # server name -> the `aud` its assertions carry (servers.<name>.audience or its resource).
    identity: IdentityConfig = IdentityConfig()
    audiences: Mapping[str, str] = field(default_factory=dict)
    # server name -> what ext_authz presents upstream for the caller (gateway.credentials).
    credentials: Mapping[str, CredentialsConfig] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: GatewayConfig, *, port: int | None = None,
                    host: str | None = None) -> Settings:
        first = cfg.ext_authz.instances[0]
        seen: set[str] = set()
        for issuer in cfg.issuers:
            if issuer.issuer in seen:
                # Issuers are selected by `iss`; two entries for one issuer would be ambiguous.
                raise ConfigError(f"issuers: {issuer.issuer!r} is configured twice")
            seen.add(issuer.issuer)
        views, keys = _aggregate(cfg, os.environ)
        return cls(
            issuers=cfg.issuers, auth=cfg.auth, policy=cfg.policy, rate_limits=cfg.rate_limits,
            public_url=cfg.public_url.rstrip("/"),
            servers=frozenset(s.name for s in cfg.servers),
            listen=Instance(host or first.host, first.port if port is None else port),
            max_request_bytes=cfg.max_request_bytes,
            telemetry=cfg.telemetry, audit=cfg.audit, catalog=cfg.catalog,
            server_targets={s.name: targets(s, os.environ) for s in cfg.servers},
            transport=cfg.ext_authz.transport,
            processes=len(cfg.ext_authz.instances),
            views=views, session_keys=keys,
            identity=cfg.identity, audiences={s.name: cfg.server_audience(s.name) for s in cfg.servers},
            credentials={s.name: s.credentials for s in cfg.servers},
        )

    def audit_path(self, port: int) -> Path:
        """The audit file of the instance on ``port``: one writer per file, so one per port."""
        return Path(self.audit.dir) / f"ext_authz-{port}.jsonl"

    def resource_url(self, server: str) -> str:
        """The RFC 8707 resource identifier of a server: the audience its tokens must carry."""
        return f"{self.public_url}/mcp/{server}"

    def audience(self, server: str) -> str:
        """The `aud` of the caller assertions for ``server``."""
        return self.audiences.get(server) or self.resource_url(server)

    def resource_metadata_url(self, server: str) -> str:
        """The RFC 9728 protected resource metadata URL named in 401 challenges."""
        return f"{self.public_url}/.well-known/oauth-protected-resource/mcp/{server}"

    def view_resource(self, view: View) -> str:
        """The resource identifier (token audience) of an aggregate endpoint."""
        return f"{self.public_url}{view.path()}"

    def view_metadata_url(self, view: View) -> str:
        return f"{self.public_url}/.well-known/oauth-protected-resource{view.path()}"

    @property
    def aggregate_resource(self) -> str:
        """The audience of ``/mcp``: the union of the servers, accepted on each of them too."""
        return f"{self.public_url}{AGGREGATE_PATH}"


def _aggregate(cfg: GatewayConfig, environ: Mapping[str, str]
               ) -> tuple[dict[str, View], tuple[bytes, ...]]:
    """The views and the session key ring. Without the keys the aggregate endpoints are not
    served (every session there would be refused anyway), and the log says which secret is
    missing; a malformed key is a configuration error."""
    views = views_from_config(cfg)
    if not views:
        return {}, ()
    secret = getattr(getattr(cfg, "aggregate", None), "session_keys", DEFAULT_SESSION_KEYS_SECRET)
    value = environ.get(secret)
    if not value:
        logger.error("the aggregate endpoint /mcp is not served: the secret %s (aggregate "
                     "session keys) is not in ext_authz's environment", secret)
        return {}, ()
    try:
        return views, parse_keys(value)
    except ValueError as exc:
        raise ConfigError(f"aggregate.session_keys: the secret {secret}: {exc}") from None
