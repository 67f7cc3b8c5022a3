"""The one settings object of an MCP server, validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.jsonrpc import DEFAULT_MAX_BYTES, DEFAULT_MAX_DEPTH

LOOPBACK_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "[::1]", "::1")
RESERVED_PATHS: tuple[str, ...] = ("/health", "/ready", "/metrics")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "notice", "warning", "error", "critical", "alert",
                               "emergency")


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Transport and runtime limits.

    ``allowed_hosts`` are host names (without port) this server answers to; ``"*"`` disables the
    Host check (only behind a proxy that sets Host itself). ``allowed_origins`` are exact
    origins (``https://app.example``); an Origin whose host is an allowed host is also accepted.
    """

    host: str = "127.0.0.1"
    port: int = 0
    path: str = "/mcp"
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    allowed_origins: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BYTES
    max_depth: int = DEFAULT_MAX_DEPTH
    page_size: int = 50
    client_request_timeout: float = 60.0
    cancel_grace: float = 2.0
    session_idle_timeout: float = 3600.0
    max_sessions: int = 10_000
    max_buffered_events: int = 1_000
    sse_retry_ms: int = 1_000
    sse_keepalive: float = 15.0
    shutdown_timeout: float = 30.0
    drain_seconds: float = 0.0
    log_level: str = "INFO"
    # Observability: OTLP/gRPC collector for spans (None: no export), the audit trail file of
    # tools/call, resources/read and prompts/get results (None: no server-side audit).
    otlp_endpoint: str | None = None
    audit_file: str | None = None
    audit_max_bytes: int = 64 * 1024 * 1024
    audit_keep: int = 10
    audit_timeout: float = 5.0
    audit_otlp_export: bool = False
    # Tamper evidence and crypto-shredding, as ext_authz's trail (docs/compliance.md): the Ed25519
    # key (PEM file) signing the chain's checkpoints (None: unsigned) and how often one is written;
    # the master key (32 bytes) sealing the personal fields under per-subject keys kept in
    # subject-keys.sqlite beside the audit file (None: in clear); rotated files' retention in days.
    audit_signing_key: str | None = None
    audit_checkpoint_seconds: float = 60.0
    audit_master_key: bytes | None = field(default=None, repr=False)
    audit_retention_days: float | None = None
    # When a result entry counts as written (gateway.telemetry.audit SYNC_MODES): "batch" fsyncs
    # before the answer; "interval" writes before it (a SIGKILL keeps it) and fsyncs within
    # audit_sync_interval seconds. Standalone the default is batch; the gateway passes
    # audit.result_sync (interval: ext_authz's decision entry is the call's fsync).
    audit_sync: str = "batch"
    audit_sync_interval: float = 0.1
    # The gateway's caller assertion (mcp_servers.core.identity): its published JWKS (a file or
    # an http(s) URL; None: no assertion, the identity headers name the caller), the gateway's
    # issuer (its public URL), this server's resource id (the `aud`), the clock skew allowed.
    assertion_jwks: str | None = None
    assertion_issuer: str | None = None
    assertion_audience: str | None = None
    assertion_leeway: int = 5

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/': {self.path!r}")
        if self.path in RESERVED_PATHS:
            raise ValueError(f"path {self.path!r} collides with the health or metrics endpoints")
        for name in ("max_body_bytes", "max_depth", "page_size", "max_sessions", "max_buffered_events"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("client_request_timeout", "session_idle_timeout", "sse_keepalive",
                     "shutdown_timeout", "audit_max_bytes", "audit_timeout", "audit_checkpoint_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        if self.audit_keep < 0:
            raise ValueError("audit_keep must be >= 0")
        if self.audit_file is not None and not self.audit_file.strip():
            raise ValueError("audit_file is empty")
        if self.audit_file is None and (self.audit_signing_key or self.audit_master_key is not None
                                        or self.audit_retention_days is not None):
            raise ValueError("audit signing, sealing and retention need an audit file")
        if self.audit_master_key is not None and len(self.audit_master_key) != 32:
            raise ValueError("audit_master_key must be 32 bytes")
        if self.audit_retention_days is not None and self.audit_retention_days <= 0:
            raise ValueError("audit_retention_days must be > 0")
        if self.audit_sync not in ("batch", "interval"):
            raise ValueError(f"audit_sync must be 'batch' or 'interval', got {self.audit_sync!r}")
        if not 0 < self.audit_sync_interval <= 60:
            raise ValueError("audit_sync_interval must be in (0, 60] seconds")
        if self.audit_otlp_export and not (self.audit_file and self.otlp_endpoint):
            raise ValueError("audit OTLP export needs an audit file and an OTLP endpoint")
        if self.assertion_jwks is not None and not (self.assertion_issuer and self.assertion_audience):
            raise ValueError("assertion_jwks needs assertion_issuer and assertion_audience (the "
                             "gateway's public URL and this server's resource id)")
        if not 0 <= self.assertion_leeway <= 60:
            raise ValueError("assertion_leeway must be 0..60 seconds")
        if not self.allowed_hosts:
            raise ValueError("allowed_hosts is empty: no request could be served (use '*' to disable)")
