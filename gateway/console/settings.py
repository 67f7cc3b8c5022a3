"""The console's settings: read once from the gateway config and the command line."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from gateway import inner_tls
from gateway.config import (
    AuthConfig,
    ConfigError,
    ConsoleOidcConfig,
    GatewayConfig,
    IssuerConfig,
    load_config,
)
from gateway.console.service_metrics import MetricsTarget, metrics_targets

# Bounds of what one page reads (docs/console.md, "Bounded reads").
# The session cookie: the __Host- prefix makes browsers insist on Secure, Path=/ and no Domain.
# Envoy's console route hashes on it (gatewayctl.envoy_config renders the name from here).
SESSION_COOKIE = "__Host-mcp-console"
# Its inner TLS identity (gateway.inner_tls): the certificate names console.<inner_tls.domain>.
INNER_TLS_IDENTITY = inner_tls.CONSOLE
MAX_AUDIT_ROWS = 500  # rows one audit page shows
MAX_AUDIT_SCAN = 200_000  # entries one search reads at most, newest first
MAX_EXPORT_ROWS = 100_000  # lines one export writes at most
MAX_SESSIONS = 10_000
ENVOY_TIMEOUT_SECONDS = 2.0
SAMPLE_SECONDS = 5.0  # how often the overview samples Envoy's counters
SAMPLES_KEPT = 120  # ten minutes of samples at SAMPLE_SECONDS


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    host: str
    port: int
    public_url: str
    resource: str  # the token audience: <public_url>/console
    issuers: tuple[IssuerConfig, ...]
    auth: AuthConfig
    policy_dir: str
    authz_entrypoint: str
    console_entrypoint: str
    session_seconds: int
    catalog_path: str
    audit_dir: str
    audit_master_key: str | None  # the secret's name (environment, else state_dir/secrets)
    state_dir: str
    admin_url: str  # Envoy's admin interface
    servers: tuple[str, ...]
    log_level: str = "INFO"
    oidc: ConsoleOidcConfig | None = None
    oidc_client_secret: str | None = None
    audit_signing_key: str | None = None  # signs the checkpoints of the console's own chain
    # Cookies are Secure: the browser talks to Envoy over TLS. Tests on plain loopback HTTP
    # read the Set-Cookie header themselves.
    cookie_name: str = SESSION_COOKIE
    # Where the services serve /metrics (the overview scrapes them).
    metrics_targets: tuple[MetricsTarget, ...] = ()
    # console.matrix_tenants (empty: the tenants the policy data names).
    matrix_tenants: tuple[str, ...] = ()
    # console.envoy_stats_url: Envoy's stats-only listener, read when the admin interface is not.
    envoy_stats_url: str | None = None

    @classmethod
    def from_config(cls, cfg: GatewayConfig, *, host: str | None = None,
                    port: int | None = None) -> ConsoleSettings:
        if not cfg.console.enabled:
            raise ConfigError("console.enabled is false: the config has no console to run")
        inst = cfg.console.instances[0]
        oidc = cfg.console.oidc
        secret = None
        if oidc is not None and oidc.client_secret_env:
            secret = os.environ.get(oidc.client_secret_env)
            if not secret:
                raise ConfigError(f"console.oidc.client_secret_env: {oidc.client_secret_env} is not set "
                                  f"in the environment")
        admin_host = "127.0.0.1" if cfg.admin.host in ("0.0.0.0", "") else cfg.admin.host
        return cls(
            host=host or inst.host, port=inst.port if port is None else port,
            public_url=cfg.public_url.rstrip("/"), resource=cfg.console_url(),
            issuers=cfg.issuers, auth=cfg.auth, policy_dir=cfg.policy.dir,
            authz_entrypoint=cfg.policy.entrypoint, console_entrypoint=cfg.console.entrypoint,
            session_seconds=cfg.console.session_seconds, catalog_path=cfg.catalog.path,
            audit_dir=cfg.audit.dir, audit_master_key=cfg.audit.master_key, state_dir=cfg.state_dir,
            admin_url=f"http://{admin_host}:{cfg.admin.port}",
            servers=tuple(s.name for s in cfg.servers), log_level=cfg.telemetry.log_level,
            oidc=oidc, oidc_client_secret=secret, audit_signing_key=cfg.audit.signing_key,
            metrics_targets=metrics_targets(cfg), matrix_tenants=cfg.console.matrix_tenants,
            envoy_stats_url=cfg.console.envoy_stats_url)

    @classmethod
    def from_argv(cls, argv: list[str]) -> ConsoleSettings:
        parser = argparse.ArgumentParser(prog="python -m gateway.console")
        parser.add_argument("--config", help="gateway config file (default: the embedded dev config)")
        parser.add_argument("--host", help="listen address (default: console.instances[0].host)")
        parser.add_argument("--port", type=int, help="listen port (default: console.instances[0].port)")
        args = parser.parse_args(argv)
        return cls.from_config(load_config(args.config), host=args.host, port=args.port)

    @property
    def secrets_dir(self) -> Path:
        return Path(self.state_dir) / "secrets"
