"""Typed settings of the ext_authz service, derived once from the gateway config."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import (
    AuditConfig,
    AuthConfig,
    CatalogConfig,
    ConfigError,
    GatewayConfig,
    Instance,
    IssuerConfig,
    PolicyConfig,
    RateLimitConfig,
    TelemetryConfig,
)
from gateway.upstream import UpstreamTarget, targets

# Envoy must never wait on us longer than its own ext_authz timeout; these stay well below the
# default 500 ms so that a slow dependency is answered (closed) instead of timing out in Envoy.
REDIS_TIMEOUT_SECONDS = 0.2
JWKS_MAX_BYTES = 256 * 1024
# Session bindings (ext_authz.sessions): idle time after which a binding is forgotten (at least
# the servers' own session idle timeout) and how many one process keeps in memory.
SESSION_IDLE_SECONDS = 3600.0
MAX_SESSION_BINDINGS = 100_000


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
        )

    def audit_path(self, port: int) -> Path:
        """The audit file of the instance on ``port``: one writer per file, so one per port."""
        return Path(self.audit.dir) / f"ext_authz-{port}.jsonl"

    def resource_url(self, server: str) -> str:
        """The RFC 8707 resource identifier of a server: the audience its tokens must carry."""
        return f"{self.public_url}/mcp/{server}"

    def resource_metadata_url(self, server: str) -> str:
        """The RFC 9728 protected resource metadata URL named in 401 challenges."""
        return f"{self.public_url}/.well-known/oauth-protected-resource/mcp/{server}"
