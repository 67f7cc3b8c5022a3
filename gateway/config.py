"""The gateway config file: one YAML document that every component reads its part of.

Loaded and validated once at the edge (CLI / ``__main__``); inner code takes the typed objects.
Unknown keys and contradictions are rejected at load time with a message naming the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, get_args, get_type_hints
from urllib.parse import quote, urlsplit

import yaml

from gateway import inner_tls
from gateway.credentials.config import (
    CredentialsConfig,
    CredentialsConfigError,
    NoCredentials,
    TokenExchangeCredentials,
    parse_credentials,
)

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default_config.yaml")
# Entries of the embedded engine's exact decision cache (gateway/policy/cache.py); 0 turns it off.
DEFAULT_DECISION_CACHE_SIZE = 10000
MAX_DECISION_CACHE_SIZE = 1_000_000
# Embedded engine evaluation off the event loop (gateway/policy/eval_worker.py). A miss costs
# ~0.1-0.5 ms; the deadline leaves room for queueing behind other misses and stays well under
# Envoy's ext_authz timeout (500 ms), so a slow evaluation is our 503, not Envoy's timeout.
DEFAULT_EVAL_TIMEOUT_MS = 150
MAX_EVAL_TIMEOUT_MS = 60_000
# Threads beyond the cores only time-share the CPU; a few spare ones keep misses flowing while
# one or two run long. Abandoned (deadline passed, still running) workers are bounded on top.
DEFAULT_EVAL_WORKERS = 4
DEFAULT_EVAL_MAX_ABANDONED = 8
DEFAULT_EVAL_MAX_WAITING = 256
MAX_EVAL_THREADS = 256


class ConfigError(ValueError):
    """The config file is invalid; the message names the offending key."""


@dataclass(frozen=True, slots=True)
class Instance:
    host: str
    port: int


SERVER_KINDS = ("module", "url", "command")
# How the gateway checks a `url` server: handshake (initialize, ping, end of session: any MCP
# server), discover (a stateless server/discover: servers speaking 2026-07-28), tcp (a connect),
# http (GET health_path answering 2xx).
HEALTH_KINDS = ("handshake", "discover", "tcp", "http")


@dataclass(frozen=True, slots=True)
class UpstreamUrl:
    """One endpoint of a `url` server, split once."""

    url: str
    scheme: str  # http or https
    host: str  # a name or an IP address (IPv6 without brackets)
    port: int
    path: str  # the MCP endpoint's path, "/" at least

    @property
    def authority(self) -> str:
        """host:port as a Host header names it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamTlsConfig:
    """TLS towards an https `url` server: the CA bundle its certificate must chain to (None: the
    system store), the name the certificate must carry and that is sent as SNI (default: the URL's
    host), and a client certificate and key where the upstream requires mTLS."""

    ca_file: str | None = None
    server_name: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None


RUNTIME_KINDS = ("pip", "npm")


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Where a command server's program comes from: ``pip`` packages installed into a venv of
    its own, or ``npm`` packages installed into a folder of its own (gatewayctl.runtimes), never
    into the gateway's environment. ``packages`` are installer arguments (pinned specs)."""

    kind: str  # pip | npm
    packages: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UpstreamTuning:
    """How Envoy treats one MCP server's instances (``envoy.upstream`` for every server,
    ``servers.<name>.envoy`` for one). envoy/README.md has the table of what each changes."""

    connect_timeout_ms: int = 1000
    # The route's timeout for a whole answer. 0: none, because SSE answers and GET streams may
    # stay open as long as the session lives; set it for servers that only answer JSON.
    timeout_seconds: float = 0.0
    # A stream with no bytes either way for this long is reset (0: none; HTTP/2 PING still
    # finds dead peers).
    idle_timeout_seconds: float = 0.0
    # Retries only when the request provably never reached an instance (tools/call is not
    # idempotent), never on the instance that just failed.
    retries: int = 2
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 16  # retries in flight at once, across the cluster
    health_interval_ms: int = 2000
    # Envoy checks idle clusters only every 60 s by default; a dead instance must be found sooner.
    health_no_traffic_interval_ms: int = 5000
    health_timeout_ms: int = 1000
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1
    outlier_consecutive_5xx: int = 5
    outlier_consecutive_gateway_failure: int = 3
    outlier_interval_ms: int = 5000
    outlier_base_ejection_ms: int = 15000
    outlier_max_ejection_percent: int = 50


@dataclass(frozen=True, slots=True)
class EnvoyTuning:
    """The Envoy knobs of the ``envoy:`` section (edge defaults; envoy/README.md)."""

    # The overload manager sheds load near this heap size: keep it below the container's limit.
    max_heap_bytes: int = 1024 * 1024 * 1024
    max_downstream_connections: int = 10_000
    per_connection_buffer_bytes: int = 32 * 1024
    request_headers_timeout_seconds: float = 10.0
    # Time to receive the whole request (not the answer: SSE answers may stream for long).
    request_timeout_seconds: float = 60.0
    # Idle streams are closed after this, except on the MCP routes (their own idle timeout).
    stream_idle_timeout_seconds: float = 300.0
    connection_idle_timeout_seconds: float = 3600.0
    http2_max_concurrent_streams: int = 100
    http2_initial_stream_window_bytes: int = 65536
    http2_initial_connection_window_bytes: int = 1048576
    # Where the JSON access log goes: null for stdout, or a file path.
    access_log_path: str | None = None
    # Headers added to every answer (e.g. strict-transport-security), name -> value.
    response_headers: tuple[tuple[str, str], ...] = ()
    upstream: UpstreamTuning = UpstreamTuning()
    # The escape hatch: a folder whose *.yaml.tmpl files replace the shipped templates of the
    # same name (envoy/templates/), for what the knobs above do not cover. None: shipped only.
    templates_dir: str | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    name: str
    # module: started as `python -m <module> --host H --port P [extra args]`; "" for other kinds.
    module: str
    # module and command: the ports the server (or its bridge) listens on; url: the endpoints.
    instances: tuple[Instance, ...]
    args: tuple[str, ...] = ()
    description: str = ""
    # Names from `secrets` this server's processes receive as environment variables.
    env: tuple[str, ...] = ()
    kind: str = "module"
    # url: every endpoint (one scheme and one path for all), TLS, the Host header the upstream
    # expects (default: each endpoint's host:port), static headers whose values name secrets
    # ("Bearer ${KEY}"), the health check.
    urls: tuple[UpstreamUrl, ...] = ()
    tls: UpstreamTlsConfig | None = None
    host_header: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    health: str = "handshake"
    health_path: str | None = None
    # command: a stdio server's argv, run behind the bridge (mcp_bridge) in workdir.
    command: tuple[str, ...] = ()
    workdir: str | None = None
    # command: the packages its program comes from (None: the command is found on PATH).
    runtime: RuntimeConfig | None = None
    # Envoy's treatment of this server: envoy.upstream with servers.<name>.envoy over it.
    envoy: UpstreamTuning = UpstreamTuning()
    # The resource id the caller assertion names in `aud` (None: <public_url>/mcp/<name>).
    audience: str | None = None
    # What ext_authz presents to the upstream for the caller (docs/upstream-credentials.md).
    credentials: CredentialsConfig = NoCredentials()

    @property
    def upstream_path(self) -> str:
        """The path Envoy sends /mcp/<name> to."""
        return self.urls[0].path if self.urls else "/mcp"


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """An auxiliary service the dev stack runs for an MCP server (e.g. the demo ERP behind the
    integration server). Not routed by Envoy; started before the MCP servers, which may read
    from it at start-up."""

    name: str
    module: str  # started as `python -m <module> --host H --port P [extra args]`
    instance: Instance
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    health_path: str = "/health"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None  # set to require client certificates (mTLS)
    min_version: str = "TLSv1_2"
    # Envoy takes cert_file/key_file through SDS from this file (which the renderer's caller
    # writes: gatewayctl.envoy_config.edge_sds_document) and reads them again whenever their
    # folder changes, e.g. a Kubernetes Secret volume renewed by cert-manager. None: read once.
    sds_file: str | None = None


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    issuer: str
    jwks_url: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    # Named to clients as an authorization server (RFC 9728 metadata). False for an issuer only
    # the gateway's own services use, e.g. the workflow server's per-step tokens.
    advertise: bool = True
    # A service of the gateway acting for a caller (RFC 8693 delegation): its tokens must carry
    # ``caller_iss`` (a non-delegation issuer of this list) and ``act``, and the caller is the
    # one they name (gateway.caller.delegated_claims), not the issuer itself.
    delegation: bool = False


@dataclass(frozen=True, slots=True)
class AuthConfig:
    leeway_seconds: int = 30
    max_token_bytes: int = 8192
    jwks_cooldown_seconds: float = 30.0
    jwks_timeout_seconds: float = 5.0
    token_cache_size: int = 10000


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    engine: str = "embedded"  # "embedded" (regopy) | "opa" (remote OPA REST API)
    dir: str = "policies"
    entrypoint: str = "mcp/authz/decision"
    opa_url: str | None = None
    # The bearer token the gateway sends to a remote OPA that requires one, named as ${SECRET}
    # (a name in `secrets`, read from the environment when the engine starts; never the token).
    opa_token: str | None = None
    dry_run: bool = False
    decision_cache_size: int = DEFAULT_DECISION_CACHE_SIZE  # embedded engine only; 0: off
    # Embedded engine only: misses are evaluated on worker threads under this deadline.
    eval_timeout_ms: int = DEFAULT_EVAL_TIMEOUT_MS
    eval_workers: int = DEFAULT_EVAL_WORKERS
    eval_max_abandoned: int = DEFAULT_EVAL_MAX_ABANDONED
    eval_max_waiting: int = DEFAULT_EVAL_MAX_WAITING


@dataclass(frozen=True, slots=True)
class RateSpec:
    rate_per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    backend: str = "memory"  # "memory" | "redis"
    # May hold Redis's password (filled from a secret): kept out of repr() and so out of logs.
    redis_url: str | None = field(default=None, repr=False)
    per_user: RateSpec | None = RateSpec(50.0, 100)
    per_tool: RateSpec | None = None
    # Envoy's coarse per-process flood guard in front of ext_authz (None: no edge limit).
    edge: RateSpec | None = RateSpec(1000.0, 2000)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """A Python gRPC service run as several processes (ext_authz, ext_proc)."""

    instances: tuple[Instance, ...]
    timeout_ms: int = 500
    # How Envoy calls the service: "grpc", or for ext_authz also "http" (Envoy's HTTP mode, its
    # default: ~40% less CPU per check; docs/configuration.md compares the two).
    transport: str = "grpc"


# Envoy's per-call timeout for ext_authz (one unary Check) and per-message timeout for ext_proc.
# ext_proc's is longer: its messages queue behind CPU-bound masking of other answers on the same
# event loop (a 10 KB masked answer is ~4 ms, an 8 MB one ~0.75 s), and at 64 connections the
# p99 already passed 0.5 s (504s). A hung ext_proc still fails closed, after 2 s.
EXT_AUTHZ_TIMEOUT_MS = 500
EXT_PROC_TIMEOUT_MS = 2000
MAX_SERVICE_TIMEOUT_MS = 60_000  # a check or a message held longer only ties up Envoy's stream


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    otlp_endpoint: str | None = None  # e.g. http://127.0.0.1:4317; tracing is off when unset
    log_level: str = "INFO"
    # gRPC services serve Prometheus /metrics on their gRPC port + this offset, bound to
    # metrics_host (loopback by default; 0.0.0.0 in containers, where Prometheus is another host).
    metrics_port_offset: int = 1000
    metrics_host: str = "127.0.0.1"
    # An Envoy listener on listen.host serving only GET /stats/prometheus (proxied to the loopback
    # admin interface), for a Prometheus that cannot reach loopback; None: no such listener.
    envoy_stats_port: int | None = None
    # Share of requests Envoy starts a trace for (when otlp_endpoint is set); a client's sampled
    # traceparent is always honoured.
    trace_sample_percent: float = 100.0


@dataclass(frozen=True, slots=True)
class AuditConfig:
    dir: str = ".run/audit"  # each process appends to <dir>/<service>-<port>.jsonl
    max_bytes: int = 100 * 1024 * 1024
    keep: int = 10
    otlp_export: bool = False
    # Ed25519 private key (PEM) signing the chain's checkpoints; None: checkpoints are unsigned.
    signing_key: str | None = None
    checkpoint_seconds: float = 60.0
    # The name of a secret (in `secrets`) holding a base64url 32-byte key that wraps the
    # per-subject keys personal fields are encrypted under; None: personal fields in clear.
    master_key: str | None = None
    # Rotated audit files whose newest entry is older than this many days are removed (by each
    # writer, hourly, and by `mcp-gateway audit prune`) unless under legal hold; None: kept.
    retention_days: int | None = None
    # The dev stack's service logs (state_dir/logs: every process's stdout, the decision log
    # included): with a value, `up` starts each log afresh and removes earlier runs' logs last
    # written longer ago than this many days (so does `mcp-gateway audit prune`); None: kept.
    log_retention_days: int | None = None
    # When an entry counts as written (gateway.telemetry.audit SYNC_MODES; docs/compliance.md):
    # "batch": fsync'ed before the answer (survives a power loss); "interval": written to the
    # kernel before the answer (survives a SIGKILL) and fsync'ed within sync_interval_ms. ext_authz
    # writes its decision entry with ``sync`` before the request goes on; the MCP servers write
    # their result entries with ``result_sync``: by default one fsync on each call's path.
    sync: str = "batch"
    result_sync: str = "interval"
    sync_interval_ms: int = 100


@dataclass(frozen=True, slots=True)
class CatalogConfig:
    path: str = ".run/catalog.sqlite"
    mode: str = "tofu"  # "tofu" (trust on first use) | "require_approval"
    refresh_seconds: float = 60.0


# The aggregator's defaults (mcp_aggregator): the secret holding its session keys.
DEFAULT_AGGREGATE_SESSION_KEYS = "MCP_GATEWAY_AGGREGATE_KEYS"
# Names of virtual servers (served at /mcp/<name>); server names share the rule's spirit: no
# "__" (the separator of <server>__<tool>) and no "+" (of <server>+<uri>).
_VIRTUAL_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
# One entry of virtual_servers.<name>.tools: "<server>/<tool glob>" (fnmatch: * ? [...]).
_TOOL_GLOB = re.compile(r"^[A-Za-z0-9_.\-*?\[\]!]+$")


@dataclass(frozen=True, slots=True)
class AggregateConfig:
    """The aggregate endpoint ``/mcp`` (docs/aggregate.md): one MCP server merging the servers a
    caller may use as ``<server>__<tool>``. Calls aimed at one server are routed by Envoy
    itself; initialize, lists, GET streams and DELETE go to the aggregator processes
    (``instances``), which fan out through Envoy's per-server routes on ``inner_listener``.
    ``session_keys`` names a secret in ``secrets``: comma-separated base64url 32-byte AES keys,
    newest first, that seal the aggregate session ids."""

    enabled: bool = True
    instances: tuple[Instance, ...] = ()
    session_keys: str = DEFAULT_AGGREGATE_SESSION_KEYS
    # Envoy's plain-HTTP listener the aggregator calls for its /mcp/<server> legs: the same
    # routes and filters as the edge (the client's bearer token is checked by ext_authz again),
    # without TLS. Loopback unless the aggregator runs on another host (then a private address
    # that only the aggregator can reach). None: no listener (aggregate off).
    inner_listener: Instance | None = None


# The console's Rego decision (policies/console.rego) and its session lifetime bounds.
DEFAULT_CONSOLE_ENTRYPOINT = "mcp/console/decision"
MAX_CONSOLE_MATRIX_TENANTS = 100
CONSOLE_PATH = "/console"


@dataclass(frozen=True, slots=True)
class ConsoleOidcConfig:
    """OpenID Connect sign-in to the console (authorization code + PKCE S256; docs/console.md):
    ``issuer`` is one of ``issuers`` (its access tokens are verified like a pasted one, audience
    ``<public_url>/console``, asked for with the RFC 8707 ``resource`` parameter);
    ``client_secret_env`` names the environment variable holding a confidential client's secret
    (none: a public client)."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    client_id: str
    client_secret_env: str | None = None
    scope: str = "openid"


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    """The web console served behind Envoy at ``<public_url>/console`` (docs/console.md): its
    process (``instances``, one: sessions live in its memory), the
    Rego decision that admits a signed-in user (``entrypoint``) and how long a session lasts at
    most (never past the token's ``exp``)."""

    enabled: bool = False
    instances: tuple[Instance, ...] = ()
    entrypoint: str = DEFAULT_CONSOLE_ENTRYPOINT
    session_seconds: int = 3600
    oidc: ConsoleOidcConfig | None = None
    # The tenants the who-may-call-what matrix is computed for when the policy reads
    # input.token.tenant (empty: the tenants the policy data names).
    matrix_tenants: tuple[str, ...] = ()
    # Envoy's stats-only listener (telemetry.envoy_stats_port) as the console reaches it, e.g.
    # http://envoy:9902/stats/prometheus: the overview reads it when the admin interface does not
    # answer (docker compose, Kubernetes). None: the admin interface only.
    envoy_stats_url: str | None = None


@dataclass(frozen=True, slots=True)
class VirtualServerConfig:
    """A curated selection of tools served at ``/mcp/<name>`` with the aggregate machinery.
    ``tools`` are ``"<server>/<tool glob>"`` (``files/read_*``)."""

    name: str
    tools: tuple[str, ...]
    description: str = ""


INNER_TLS_DEFAULT_DOMAIN = "mcp-gateway.internal"
_DNS_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,200}}$){_DNS_LABEL}(\.{_DNS_LABEL})*$")


@dataclass(frozen=True, slots=True)
class InnerTlsConfig:
    """mTLS on the inner hops (docs/inner-tls.md). ``dir`` holds each component's
    ``<identity>.pem`` / ``<identity>.key`` (identities in gateway.inner_tls) and the CA; Envoy's
    own pair and the CA may live elsewhere (cert_file, key_file, ca_file). Each certificate
    carries the DNS name ``<identity>.<domain>``, which its peer checks."""

    enabled: bool = False
    dir: str = ""
    ca_file: str = ""
    cert_file: str = ""  # Envoy's certificate: its client certificate and the inner listener's
    key_file: str = ""
    domain: str = INNER_TLS_DEFAULT_DOMAIN
    sds_dir: str = ""  # where Envoy reads its SDS resource files (written by the renderer's caller)

    def san(self, identity: str) -> str:
        return f"{identity}.{self.domain}"

    def files(self, identity: str) -> inner_tls.TlsFiles:
        """The certificate, key and CA files of one component (Envoy's are cert_file/key_file)."""
        if identity == inner_tls.ENVOY:
            return inner_tls.TlsFiles(self.cert_file, self.key_file, self.ca_file)
        return inner_tls.TlsFiles(str(Path(self.dir) / f"{identity}.pem"),
                        str(Path(self.dir) / f"{identity}.key"), self.ca_file)


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """The caller assertion (gateway.assertion, docs/identity.md). ``keys``: the private JWK set
    ext_authz signs with (the first key signs); ``jwks_file``: its public half, which Envoy
    publishes at JWKS_PATH and our servers verify with."""

    assertion: bool = False
    ttl_seconds: int = 60
    keys: str = ""
    jwks_file: str = ""


# Where Envoy publishes the assertion keys (unauthenticated GET).
JWKS_PATH = "/.well-known/mcp-gateway/jwks.json"


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listen: Instance
    public_url: str
    admin: Instance
    tls: TlsConfig
    issuers: tuple[IssuerConfig, ...]
    auth: AuthConfig
    policy: PolicyConfig
    rate_limits: RateLimitConfig
    ext_authz: ServiceConfig
    ext_proc: ServiceConfig
    servers: tuple[ServerConfig, ...]
    telemetry: TelemetryConfig = TelemetryConfig()
    audit: AuditConfig = AuditConfig()
    catalog: CatalogConfig = CatalogConfig()
    backends: tuple[BackendConfig, ...] = ()
    envoy: EnvoyTuning = EnvoyTuning()
    # The aggregate endpoint /mcp (off when the config has no aggregate: section).
    aggregate: AggregateConfig = AggregateConfig(enabled=False)
    virtual_servers: tuple[VirtualServerConfig, ...] = ()
    # The caller assertion ext_authz signs for upstreams (docs/identity.md); off when absent.
    identity: IdentityConfig = IdentityConfig()
    inner_tls: InnerTlsConfig = InnerTlsConfig()
    # The web console at /console (off when the config has no console: section).
    console: ConsoleConfig = ConsoleConfig()
    # Names of secrets (environment variables) the dev stack hands to the processes that list
    # them in `env`: taken from its own environment, else generated once into state_dir/secrets.
    secrets: tuple[str, ...] = ()
    state_dir: str = ".run"
    max_request_bytes: int = 1024 * 1024
    source: str = field(default="", compare=False)

    def server(self, name: str) -> ServerConfig:
        for server in self.servers:
            if server.name == name:
                return server
        raise KeyError(name)

    def resource_url(self, server: str) -> str:
        """The RFC 8707 resource identifier (token audience) of one MCP server."""
        return f"{self.public_url.rstrip('/')}/mcp/{server}"

    def server_audience(self, server: str) -> str:
        """The `aud` of the caller assertions for one server: servers.<name>.audience, else its
        resource identifier."""
        return self.server(server).audience or self.resource_url(server)

    def console_url(self) -> str:
        """The resource identifier (token audience) of the web console."""
        return f"{self.public_url.rstrip('/')}{CONSOLE_PATH}"

    def aggregate_url(self, virtual: str | None = None) -> str:
        """The resource identifier of the aggregate endpoint /mcp, or of a virtual server."""
        base = f"{self.public_url.rstrip('/')}/mcp"
        return f"{base}/{virtual}" if virtual else base

    def virtual_server(self, name: str) -> VirtualServerConfig:
        for virtual in self.virtual_servers:
            if virtual.name == name:
                return virtual
        raise KeyError(name)


def _take(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str,
          default: Any = ...) -> Any:
    if key not in data:
        if default is ...:
            raise ConfigError(f"{where}.{key} is required")
        return default
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}.{key} must be {names}, got {type(value).__name__}")
    return value


# Ranges of the numeric settings of the plain sections (auth, policy, telemetry, audit, catalog):
# a value outside is refused naming its key, as a wrong type is (one rule for every field, so a
# new field cannot be added unchecked: a field without a range here must not be numeric).
_RANGES: dict[str, tuple[float, float]] = {
    "auth.leeway_seconds": (0, 3600), "auth.max_token_bytes": (512, 1024 * 1024),
    "auth.jwks_cooldown_seconds": (0, 86400), "auth.jwks_timeout_seconds": (0.1, 120),
    "auth.token_cache_size": (0, 10_000_000),
    "policy.decision_cache_size": (0, MAX_DECISION_CACHE_SIZE),
    "policy.eval_timeout_ms": (1, MAX_EVAL_TIMEOUT_MS), "policy.eval_workers": (1, MAX_EVAL_THREADS),
    "policy.eval_max_abandoned": (0, MAX_EVAL_THREADS), "policy.eval_max_waiting": (0, 100_000),
    "telemetry.metrics_port_offset": (1, 65534), "telemetry.envoy_stats_port": (1, 65535),
    "telemetry.trace_sample_percent": (0, 100),
    "audit.max_bytes": (4096, 1 << 40), "audit.keep": (1, 10_000), "audit.checkpoint_seconds": (1, 86_400),
    "audit.retention_days": (1, 36_500), "audit.log_retention_days": (1, 36_500),
    "audit.sync_interval_ms": (1, 60_000),
    "catalog.refresh_seconds": (1, 86400),
    "envoy.max_heap_bytes": (64 << 20, 1 << 40), "envoy.max_downstream_connections": (1, 10_000_000),
    "envoy.per_connection_buffer_bytes": (1024, 64 << 20),
    "envoy.request_headers_timeout_seconds": (0.1, 300), "envoy.request_timeout_seconds": (1, 3600),
    "envoy.stream_idle_timeout_seconds": (1, 86400),
    "envoy.connection_idle_timeout_seconds": (1, 86400),
    "envoy.http2_max_concurrent_streams": (1, 2_147_483_647),
    # HTTP/2 flow-control windows (RFC 9113 bounds Envoy enforces).
    "envoy.http2_initial_stream_window_bytes": (65535, 2_147_483_647),
    "envoy.http2_initial_connection_window_bytes": (65535, 2_147_483_647),
    "upstream.connect_timeout_ms": (1, 60_000), "upstream.timeout_seconds": (0, 86400),
    "upstream.idle_timeout_seconds": (0, 86400), "upstream.retries": (0, 10),
    "upstream.max_connections": (1, 1_000_000), "upstream.max_pending_requests": (1, 1_000_000),
    "upstream.max_requests": (1, 1_000_000), "upstream.max_retries": (0, 1_000_000),
    "upstream.health_interval_ms": (100, 3_600_000),
    "upstream.health_no_traffic_interval_ms": (100, 3_600_000),
    "upstream.health_timeout_ms": (10, 60_000), "upstream.unhealthy_threshold": (1, 100),
    "upstream.healthy_threshold": (1, 100), "upstream.outlier_consecutive_5xx": (1, 1000),
    "upstream.outlier_consecutive_gateway_failure": (1, 1000),
    "upstream.outlier_interval_ms": (100, 3_600_000),
    "upstream.outlier_base_ejection_ms": (100, 3_600_000),
    "upstream.outlier_max_ejection_percent": (0, 100),
}


def _section(cls: Any, raw: Any, where: str, *, ranges: str | None = None, base: Any = None,
             **overrides: Any) -> Any:
    """A config dataclass from a mapping: unknown keys, wrong types and out-of-range numbers
    are refused naming ``where.key``; absent keys take ``base``'s values (default: the
    dataclass defaults). ``ranges`` names the _RANGES prefix when it is not ``where``."""
    data = _only({} if raw is None else raw, {f.name for f in fields(cls)}, where)
    hints = get_type_hints(cls)
    for key, value in data.items():
        if key in overrides:
            continue
        kinds = _kinds(hints[key])
        ok = any(isinstance(value, k) and not (k in (int, float) and isinstance(value, bool))
                 for k in kinds)
        if not ok:
            names = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds
                                if not (k is int and float in kinds))
            raise ConfigError(f"{where}.{key} must be {names}, got {value!r}")
        bounds = _RANGES.get(f"{ranges or where}.{key}")
        if bounds is not None and value is not None and not bounds[0] <= value <= bounds[1]:
            what = "a number" if float in kinds else "an integer"
            raise ConfigError(f"{where}.{key} must be {what} from {bounds[0]:g} to {bounds[1]:g}, "
                              f"got {value!r}")
    if base is not None:
        return replace(base, **{**data, **overrides})
    return cls(**{**data, **overrides})


def _envoy_tuning(raw: Any, path: Callable[[str], str]) -> EnvoyTuning:
    data = _only({} if raw is None else raw, {f.name for f in fields(EnvoyTuning)}, "envoy")
    upstream = _section(UpstreamTuning, data.get("upstream"), "envoy.upstream", ranges="upstream")
    headers = _take(data, "response_headers", dict, "envoy", {})
    for name, value in headers.items():
        if not (isinstance(name, str) and _HEADER_NAME.match(name) and isinstance(value, str)
                and "\r" not in value and "\n" not in value):
            raise ConfigError(f"envoy.response_headers: {name!r}: a lower-case header name and a "
                              f"one-line string value")
    log = _take(data, "access_log_path", (str, type(None)), "envoy", None)
    if log is not None and not log.startswith("/"):
        raise ConfigError(f"envoy.access_log_path must be an absolute path or null, got {log!r}")
    templates = _take(data, "templates_dir", (str, type(None)), "envoy", None)
    if templates is not None:
        templates = path(templates)
        if not Path(templates).is_dir():
            raise ConfigError(f"envoy.templates_dir: {templates} is not a folder")
    rest = {k: v for k, v in data.items() if k not in ("upstream", "response_headers", "templates_dir")}
    tuning: EnvoyTuning = _section(EnvoyTuning, rest, "envoy", upstream=upstream,
                                   response_headers=tuple(sorted(headers.items())),
                                   templates_dir=templates)
    return tuning


_HEADER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               NoneType: "null"}


def _kinds(hint: Any) -> tuple[type, ...]:
    args = get_args(hint) if isinstance(hint, UnionType) else (hint,)
    kinds = tuple(a for a in args if isinstance(a, type))
    if float in kinds:  # a whole number is a number: 1 where 1.5 could be written
        kinds = tuple(k for k in kinds if k is not int and k is not float)
        return (float, int, *kinds)
    return kinds


def _only(data: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping")
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    return data


def _instance(data: Any, where: str, default_host: str = "127.0.0.1") -> Instance:
    data = _only(data, {"host", "port"}, where)
    port = _take(data, "port", int, where)
    if not 0 < port < 65536:
        raise ConfigError(f"{where}.port must be 1-65535, got {port}")
    return Instance(_take(data, "host", str, where, default_host), port)


def _instances(data: Any, where: str, minimum: int) -> tuple[Instance, ...]:
    if not isinstance(data, list) or len(data) < minimum:
        raise ConfigError(f"{where} must be a list of at least {minimum} instance(s)")
    return tuple(_instance(item, f"{where}[{i}]") for i, item in enumerate(data))


def _rate(data: Any, where: str) -> RateSpec | None:
    if data is None:
        return None
    data = _only(data, {"rate_per_second", "burst"}, where)
    rate = float(_take(data, "rate_per_second", (int, float), where))
    burst = _take(data, "burst", int, where)
    if rate <= 0 or burst < 1:
        raise ConfigError(f"{where}: rate_per_second must be > 0 and burst >= 1")
    return RateSpec(rate, burst)


_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_URL = re.compile(r"^https?://(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})/?$")


def _env(data: dict[str, Any], where: str, secrets: tuple[str, ...]) -> tuple[str, ...]:
    names = _take(data, "env", list, where, [])
    for name in names:
        if name not in secrets:
            raise ConfigError(f"{where}.env: {name!r} is not listed in secrets")
    return tuple(names)


_SERVER_KEYS = {
    "module": {"module", "instances", "args", "description", "env", "audience"},
    "url": {"url", "instances", "description", "tls", "host_header", "headers", "health",
            "health_path", "audience"},
    "command": {"command", "instances", "description", "env", "workdir", "runtime", "audience"},
}
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
_SECRET_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _secret_url(url: str | None, where: str, secrets: tuple[str, ...]) -> str | None:
    """A URL whose ${NAME} parts (names from `secrets`, e.g. a Redis password) are filled from
    the environment, percent-encoded. A name not set here stays as written: tools that never
    connect (config render) work without the secret, and a service connecting with it is refused
    by the server (a rate limit that cannot reach Redis denies)."""
    if url is None:
        return None
    for name in _SECRET_REF.findall(url):
        if name not in secrets:
            raise ConfigError(f"{where}: ${{{name}}} is not listed in secrets")
    return _SECRET_REF.sub(lambda m: quote(os.environ[m.group(1)], safe="")
                           if m.group(1) in os.environ else m.group(0), url)


def secret_value(reference: str, where: str) -> str:
    """The value of a ``${NAME}`` secret reference from the environment, else a ConfigError
    naming the key and the variable."""
    match = _SECRET_REF.fullmatch(reference)
    if match is None:
        raise ConfigError(f"{where} must be ${{NAME}}, a secret's name")
    value = os.environ.get(match.group(1), "")
    if not value:
        raise ConfigError(f"{where}: the secret {match.group(1)} is not set in this process's environment")
    return value
# Headers a static upstream header may not set: Envoy's own, the gateway's, hop-by-hop ones.
_RESERVED_UPSTREAM_HEADERS = frozenset({
    "host", "content-length", "content-type", "transfer-encoding", "connection", "te", "upgrade",
    "mcp-session-id", "mcp-protocol-version", "accept", "traceparent", "tracestate"})


def _server(name: str, data: Any, where: str, secrets: tuple[str, ...],
            path: Callable[[str], str]) -> ServerConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping")
    kinds = [k for k in SERVER_KINDS if k in data]
    instances = data.get("instances")
    if not kinds and isinstance(instances, list) and instances \
            and all(isinstance(i, dict) and "url" in i for i in instances):
        kinds = ["url"]  # instances: [{url: ...}, ...]
    if len(kinds) != 1:
        found = f" (found {', '.join(kinds)})" if kinds else ""
        raise ConfigError(f"{where}: exactly one of module, url, command{found}")
    kind = kinds[0]
    data = _only(data, _SERVER_KEYS[kind], where)
    description = _take(data, "description", str, where, "")
    if kind == "module":
        args = _take(data, "args", list, where, [])
        return ServerConfig(name, _take(data, "module", str, where),
                            _instances(data.get("instances"), f"{where}.instances", 1),
                            tuple(str(a) for a in args), description, _env(data, where, secrets))
    if kind == "command":
        argv = _take(data, "command", list, where)
        if not argv or not all(isinstance(a, str) and a for a in argv):
            raise ConfigError(f"{where}.command must be a non-empty list of strings (the argv)")
        workdir = _take(data, "workdir", str, where, "")
        return ServerConfig(name, "", _instances(data.get("instances"), f"{where}.instances", 1),
                            (), description, _env(data, where, secrets), kind="command",
                            command=tuple(argv), workdir=path(workdir) if workdir else None,
                            runtime=_runtime(data.get("runtime"), f"{where}.runtime"))
    # url: one URL, or instances of {url}
    if "instances" in data:
        raw = data["instances"]
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{where}.instances must be a list of at least 1 instance(s)")
        urls = tuple(_upstream_url(_take(_only(item, {"url"}, f"{where}.instances[{i}]"), "url",
                                         str, f"{where}.instances[{i}]"),
                                   f"{where}.instances[{i}].url")
                     for i, item in enumerate(raw))
        if "url" in data:
            raise ConfigError(f"{where}: url and instances exclude each other (one URL, or "
                              f"instances: [{{url: ...}}, ...])")
    else:
        urls = (_upstream_url(_take(data, "url", str, where), f"{where}.url"),)
    for i, u in enumerate(urls[1:], 1):
        if (u.scheme, u.path) != (urls[0].scheme, urls[0].path):
            raise ConfigError(f"{where}.instances[{i}].url: every instance needs the scheme and "
                              f"path of the first ({urls[0].scheme}://...{urls[0].path})")
    tls = None
    if "tls" in data:
        if urls[0].scheme != "https":
            raise ConfigError(f"{where}.tls: only for an https url")
        tdata = _only(data["tls"], {"ca_file", "server_name", "client_cert_file",
                                    "client_key_file"}, f"{where}.tls")
        cert = _take(tdata, "client_cert_file", str, f"{where}.tls", "")
        key = _take(tdata, "client_key_file", str, f"{where}.tls", "")
        if bool(cert) != bool(key):
            raise ConfigError(f"{where}.tls: client_cert_file and client_key_file go together")
        ca = _take(tdata, "ca_file", str, f"{where}.tls", "")
        tls = UpstreamTlsConfig(path(ca) if ca else None,
                                _take(tdata, "server_name", str, f"{where}.tls", "") or None,
                                path(cert) if cert else None, path(key) if key else None)
    host_header = _take(data, "host_header", str, where, "") or None
    if host_header is not None and not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", host_header):
        raise ConfigError(f"{where}.host_header must be a host or host:port")
    headers = []
    for hname, value in _take(data, "headers", dict, where, {}).items():
        hwhere = f"{where}.headers.{hname}"
        if not isinstance(hname, str) or not _HEADER_NAME.match(hname):
            raise ConfigError(f"{hwhere}: a header name is lower-case token characters")
        if hname in _RESERVED_UPSTREAM_HEADERS or hname.startswith(("x-mcp-", "x-envoy-", ":")):
            raise ConfigError(f"{hwhere}: this header is set by the gateway or the protocol")
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise ConfigError(f"{hwhere} must be a one-line string")
        if "%" in value:
            raise ConfigError(f"{hwhere}: '%' is not allowed (secrets are named as ${{NAME}})")
        for ref in _SECRET_REF.findall(value):
            if ref not in secrets:
                raise ConfigError(f"{hwhere}: ${{{ref}}} is not listed in secrets")
        if "$" in _SECRET_REF.sub("", value):
            raise ConfigError(f"{hwhere}: '$' only as ${{NAME}}, a secret's name")
        headers.append((hname, value))
    health = _take(data, "health", str, where, "http" if "health_path" in data else "handshake")
    if health not in HEALTH_KINDS:
        raise ConfigError(f"{where}.health must be one of {', '.join(HEALTH_KINDS)}, "
                          f"not {health!r}")
    health_path = _take(data, "health_path", str, where, "") or None
    if (health == "http") != (health_path is not None):
        raise ConfigError(f"{where}: health_path is needed for health: http and only there")
    if health_path is not None and not health_path.startswith("/"):
        raise ConfigError(f"{where}.health_path must start with '/'")
    return ServerConfig(name, "", tuple(Instance(u.host, u.port) for u in urls), (), description,
                        kind="url", urls=urls, tls=tls, host_header=host_header,
                        headers=tuple(headers), health=health, health_path=health_path)


def _runtime(data: Any, where: str) -> RuntimeConfig | None:
    """``{pip: [specs]}`` or ``{npm: [specs]}``: exactly one installer, a non-empty list of
    package specs, none of which may pass an option to the installer."""
    if data is None:
        return None
    if not isinstance(data, dict) or len(data) != 1 or next(iter(data)) not in RUNTIME_KINDS:
        found = f" (found {', '.join(map(str, data))})" if isinstance(data, dict) and data else ""
        raise ConfigError(f"{where} must name exactly one of {', '.join(RUNTIME_KINDS)}{found}")
    ((kind, packages),) = data.items()
    if not isinstance(packages, list) or not packages \
            or not all(isinstance(p, str) and p.strip() for p in packages):
        raise ConfigError(f"{where}.{kind} must be a non-empty list of package specs (strings)")
    for spec in packages:
        if spec.lstrip().startswith("-"):
            raise ConfigError(f"{where}.{kind}: {spec!r} is an installer option, not a package")
        if any(c in spec for c in "\r\n\0"):
            raise ConfigError(f"{where}.{kind}: {spec!r} must be one line")
    return RuntimeConfig(kind, tuple(p.strip() for p in packages))


def _upstream_url(value: str, where: str) -> UpstreamUrl:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or "://" not in value:
        raise ConfigError(f"{where}: {value!r} needs a scheme, http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{where}: credentials in the URL are not allowed (use headers with a "
                          f"secret)")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ConfigError(f"{where}: a query or fragment is not allowed")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ConfigError(f"{where}: {value!r} has an invalid port") from None
    if not host or not re.fullmatch(r"[A-Za-z0-9.\-:]+", host):
        raise ConfigError(f"{where}: {value!r} has no valid host")
    path = parts.path or "/"
    if any(c in path for c in " \t\r\n") or "%" in path or "/." in path:
        raise ConfigError(f"{where}: the path must be plain (no spaces, '%' or dot segments)")
    return UpstreamUrl(value, parts.scheme, host, port or (443 if parts.scheme == "https" else 80),
                       path)


def otlp_target(endpoint: str) -> Instance:
    """host and port of an OTLP/gRPC endpoint URL (``http://host:port``)."""
    match = _URL.match(endpoint)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ConfigError(f"telemetry.otlp_endpoint must be http(s)://host:port, got {endpoint!r}")
    return Instance(match["host"].strip("[]"), int(match["port"]))


EXT_AUTHZ_TRANSPORTS = ("http", "grpc")  # the first is the default


def _service(data: Any, where: str, timeout_ms: int, *, transports: tuple[str, ...] = ("grpc",)
             ) -> ServiceConfig:
    data = _only(data, {"instances", "timeout_ms", *(("transport",) if len(transports) > 1 else ())},
                 where)
    transport = _take(data, "transport", str, where, transports[0])
    if transport not in transports:
        raise ConfigError(f"{where}.transport must be one of {', '.join(transports)}, "
                          f"not {transport!r}")
    timeout = _take(data, "timeout_ms", int, where, timeout_ms)
    if not 1 <= timeout <= MAX_SERVICE_TIMEOUT_MS:
        raise ConfigError(f"{where}.timeout_ms must be from 1 to {MAX_SERVICE_TIMEOUT_MS}, "
                          f"got {timeout}")
    return ServiceConfig(_instances(data.get("instances"), f"{where}.instances", 1), timeout,
                         transport)


def parse_config(raw: Any, *, base_dir: Path, source: str = "") -> GatewayConfig:
    top = _only(raw, {"listen", "public_url", "admin", "tls", "issuers", "auth", "policy",
                      "rate_limits", "ext_authz", "ext_proc", "servers", "state_dir", "identity",
                      "max_request_bytes", "telemetry", "audit", "catalog", "backends",
                      "secrets", "envoy", "aggregate", "virtual_servers", "inner_tls",
                      "console"}, "config")

    def path(p: str) -> str:
        return str((base_dir / os.path.expandvars(p)).resolve()) if p else p

    listen = _instance(top.get("listen", {"port": 8443}), "listen")
    public_url = _take(top, "public_url", str, "config", f"https://127.0.0.1:{listen.port}")
    tls_raw = _only(top.get("tls"), {"cert_file", "key_file", "client_ca_file", "min_version",
                                     "sds_file"}, "tls")
    min_version = _take(tls_raw, "min_version", str, "tls", "TLSv1_2")
    if min_version not in ("TLSv1_2", "TLSv1_3"):
        raise ConfigError("tls.min_version must be TLSv1_2 or TLSv1_3 (older versions are unsafe)")
    ca = _take(tls_raw, "client_ca_file", (str, type(None)), "tls", None)
    sds_file = _take(tls_raw, "sds_file", (str, type(None)), "tls", None)
    tls = TlsConfig(path(_take(tls_raw, "cert_file", str, "tls")),
                    path(_take(tls_raw, "key_file", str, "tls")),
                    path(ca) if ca else None, min_version, path(sds_file) if sds_file else None)

    secrets = tuple(_take(top, "secrets", list, "config", []))
    for name in secrets:
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ConfigError(f"secrets: {name!r} is not an environment variable name "
                              f"(upper-case letters, digits and '_')")

    servers_raw = top.get("servers")
    if not isinstance(servers_raw, dict) or not servers_raw:
        raise ConfigError("servers must be a non-empty mapping of name -> server")
    envoy = _envoy_tuning(top.get("envoy"), path)
    servers = []
    for name, sdata in servers_raw.items():
        where = f"servers.{name}"
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}: a server name is letters, digits, '-' and '_'")
        if "__" in name or name.endswith("_"):
            # /mcp exposes <server>__<tool>: the first "__" must end the server's name.
            raise ConfigError(f"{where}: a server name may not contain '__' or end with '_' "
                              f"(the aggregate endpoint names tools <server>__<tool>)")
        override = sdata.get("envoy") if isinstance(sdata, dict) else None
        creds_raw = sdata.get("credentials") if isinstance(sdata, dict) else None
        if isinstance(sdata, dict):
            sdata = {k: v for k, v in sdata.items() if k not in ("envoy", "credentials")}
        server = _server(name, sdata, where, secrets, path)
        tuning = _section(UpstreamTuning, override, f"{where}.envoy", ranges="upstream",
                          base=envoy.upstream)
        try:
            creds = parse_credentials(
                creds_raw, where, secrets=secrets,
                audience=server.urls[0].url if server.urls else
                f"{public_url.rstrip('/')}/mcp/{name}",
                state_dir=path(_take(top, "state_dir", str, "config", ".run")), path=path)
        except CredentialsConfigError as exc:
            raise ConfigError(str(exc)) from None
        if server.kind != "url" and not isinstance(creds, NoCredentials):
            # A command server's bridge forwards no header to its stdio child and a module's
            # tools cannot read request headers: the credential would reach nothing.
            raise ConfigError(f"{where}.credentials: kind {creds.kind} is for url servers only "
                              f"(a {server.kind} server never receives request headers)")
        if creds.header is not None and creds.header in dict(server.headers):
            raise ConfigError(f"{where}.credentials.header: {creds.header} is also in "
                              f"{where}.headers (one of them would overwrite the other)")
        servers.append(replace(server, envoy=tuning, credentials=creds))
    servers = [_with_audience(s, servers_raw[s.name]) for s in servers]
    names = [s.name for s in servers]
    aggregate = _aggregate(top.get("aggregate"), secrets)
    virtual_servers = _virtual_servers(top.get("virtual_servers"), names, aggregate)
    # Parsed before the issuers (a console adds its audience to their defaults); its oidc.issuer
    # must name one of them.
    issuer_names = [i.get("issuer") for i in top.get("issuers") or [] if isinstance(i, dict)]
    console = _console(top.get("console"), [n for n in issuer_names if isinstance(n, str)])
    _refuse_shared_audiences(servers, public_url, [v.name for v in virtual_servers])

    backends = []
    backends_raw = _take(top, "backends", dict, "config", {})
    for name, bdata in backends_raw.items():
        where = f"backends.{name}"
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}: a backend name is letters, digits, '-' and '_'")
        bdata = _only(bdata, {"module", "instance", "args", "env", "health_path"}, where)
        health_path = _take(bdata, "health_path", str, where, "/health")
        if not health_path.startswith("/"):
            raise ConfigError(f"{where}.health_path must start with '/'")
        backends.append(BackendConfig(
            name, _take(bdata, "module", str, where),
            _instance(_take(bdata, "instance", dict, where), f"{where}.instance"),
            tuple(str(a) for a in _take(bdata, "args", list, where, [])),
            _env(bdata, where, secrets), health_path))
    clash = {b.name for b in backends} & set(names)
    if clash:
        raise ConfigError(f"backends: {', '.join(sorted(clash))} is also a server name")

    issuers = []
    for i, idata in enumerate(_take(top, "issuers", list, "config")):
        where = f"issuers[{i}]"
        idata = _only(idata, {"issuer", "jwks_url", "audiences", "algorithms", "advertise",
                              "delegation"}, where)
        algs = tuple(_take(idata, "algorithms", list, where, ["RS256", "ES256"]))
        bad = [a for a in algs if a not in {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
                                            "PS256", "PS384", "PS512", "EdDSA"}]
        if bad or not algs:
            raise ConfigError(f"{where}.algorithms: only asymmetric algorithms are allowed, got {bad}")
        base = f"{public_url.rstrip('/')}/mcp"
        default_audiences = [f"{base}/{n}" for n in names]
        if aggregate.enabled:
            default_audiences += [base, *(f"{base}/{v.name}" for v in virtual_servers)]
        if console.enabled:
            default_audiences.append(f"{public_url.rstrip('/')}{CONSOLE_PATH}")
        audiences = tuple(_take(idata, "audiences", list, where, default_audiences))
        delegation = _take(idata, "delegation", bool, where, False)
        advertise = _take(idata, "advertise", bool, where, not delegation)
        if delegation:
            _check_delegation_issuer(idata, where, advertise, audiences, base,
                                     {f"{base}/{v.name}" for v in virtual_servers},
                                     f"{public_url.rstrip('/')}{CONSOLE_PATH}")
        issuers.append(IssuerConfig(_take(idata, "issuer", str, where),
                                    _take(idata, "jwks_url", str, where), audiences, algs,
                                    advertise, delegation))
    if not issuers:
        raise ConfigError("issuers must name at least one token issuer")
    if all(i.delegation for i in issuers):
        raise ConfigError("issuers: every issuer is a delegation issuer; the callers they act for "
                          "need an issuer of their own (delegation: false)")

    auth = _section(AuthConfig, top.get("auth"), "auth")
    pol_raw = top.get("policy") or {}
    policy_dir = _take(pol_raw, "dir", str, "policy", "policies") if isinstance(pol_raw, dict) else ""
    policy = _section(PolicyConfig, pol_raw, "policy", dir=path(policy_dir))
    if policy.engine not in ("embedded", "opa"):
        raise ConfigError("policy.engine must be 'embedded' or 'opa'")
    if policy.engine == "opa" and not policy.opa_url:
        raise ConfigError("policy.opa_url is required when policy.engine is 'opa'")
    token_ref = _SECRET_REF.fullmatch(policy.opa_token or "")
    if policy.opa_token is not None and (token_ref is None or token_ref.group(1) not in secrets):
        raise ConfigError("policy.opa_token must name a secret listed in secrets, as ${NAME} "
                          "(the token itself never goes in the config)")

    rl_raw = _only(top.get("rate_limits", {}), {"backend", "redis_url", "per_user", "per_tool",
                                                "edge"}, "rate_limits")
    rate_limits = RateLimitConfig(
        backend=_take(rl_raw, "backend", str, "rate_limits", "memory"),
        redis_url=_secret_url(_take(rl_raw, "redis_url", (str, type(None)), "rate_limits", None),
                              "rate_limits.redis_url", secrets),
        per_user=_rate(rl_raw.get("per_user", {"rate_per_second": 50, "burst": 100}), "rate_limits.per_user"),
        per_tool=_rate(rl_raw.get("per_tool"), "rate_limits.per_tool"),
        edge=_rate(rl_raw.get("edge", {"rate_per_second": 1000, "burst": 2000}), "rate_limits.edge"),
    )
    # Envoy's token bucket refills a whole number of tokens per second.
    if rate_limits.edge is not None and not rate_limits.edge.rate_per_second.is_integer():
        raise ConfigError("rate_limits.edge.rate_per_second must be a whole number (Envoy refills "
                          "whole tokens once a second)")
    if rate_limits.backend not in ("memory", "redis"):
        raise ConfigError("rate_limits.backend must be 'memory' or 'redis'")
    if rate_limits.backend == "redis" and not rate_limits.redis_url:
        raise ConfigError("rate_limits.redis_url is required when rate_limits.backend is 'redis'")

    telemetry = _section(TelemetryConfig, top.get("telemetry"), "telemetry")
    if telemetry.otlp_endpoint is not None:
        otlp_target(telemetry.otlp_endpoint)
    if not telemetry.metrics_host:
        raise ConfigError("telemetry.metrics_host must be a host name or address")
    if telemetry.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("telemetry.log_level must be DEBUG, INFO, WARNING or ERROR")
    # Files that belong to one running gateway live under state_dir unless placed elsewhere.
    state_dir = path(_take(top, "state_dir", str, "config", ".run"))
    audit_raw = _only(top.get("audit", {}), set(AuditConfig.__slots__), "audit")
    audit_dir = (path(_take(audit_raw, "dir", str, "audit")) if "dir" in audit_raw
                 else str(Path(state_dir) / "audit"))
    audit_key = path(_take(audit_raw, "signing_key", str, "audit")) if audit_raw.get("signing_key") else None
    audit = _section(AuditConfig, audit_raw, "audit", dir=audit_dir, signing_key=audit_key)
    if audit.master_key is not None and audit.master_key not in secrets:
        raise ConfigError(f"audit.master_key: {audit.master_key!r} is not listed in secrets")
    for key in ("sync", "result_sync"):  # gateway.telemetry.audit.SYNC_MODES
        if getattr(audit, key) not in ("batch", "interval"):
            raise ConfigError(f"audit.{key} must be 'batch' or 'interval', got {getattr(audit, key)!r}")
    cat_raw = _only(top.get("catalog", {}), set(CatalogConfig.__slots__), "catalog")
    cat_path = (path(_take(cat_raw, "path", str, "catalog")) if "path" in cat_raw
                else str(Path(state_dir) / "catalog.sqlite"))
    catalog = _section(CatalogConfig, cat_raw, "catalog", path=cat_path)
    if catalog.mode not in ("tofu", "require_approval"):
        raise ConfigError("catalog.mode must be 'tofu' or 'require_approval'")

    ext_authz = _service(top.get("ext_authz"), "ext_authz", EXT_AUTHZ_TIMEOUT_MS,
                         transports=EXT_AUTHZ_TRANSPORTS)
    # Past Envoy's timeout the deadline could never fire first: the caller would get Envoy's
    # error instead of the policy's 503, and the evaluation would keep a worker for nothing.
    if policy.engine == "embedded" and policy.eval_timeout_ms >= ext_authz.timeout_ms:
        raise ConfigError(f"policy.eval_timeout_ms ({policy.eval_timeout_ms}) must be less than "
                          f"ext_authz.timeout_ms ({ext_authz.timeout_ms})")
    for server in servers:
        # The exchange runs inside the check: its own deadline must fire before Envoy's.
        creds = server.credentials
        if isinstance(creds, TokenExchangeCredentials) and creds.timeout_ms >= ext_authz.timeout_ms:
            raise ConfigError(f"servers.{server.name}.credentials.timeout_ms ({creds.timeout_ms}) "
                              f"must be less than ext_authz.timeout_ms ({ext_authz.timeout_ms})")

    admin = _instance(top.get("admin", {"port": 9901}), "admin")
    ext_proc = _service(top.get("ext_proc"), "ext_proc", EXT_PROC_TIMEOUT_MS)
    _refuse_shared_ports([
        ("listen", listen), ("admin", admin),
        *((("telemetry.envoy_stats_port", Instance(listen.host, telemetry.envoy_stats_port)),)
          if telemetry.envoy_stats_port is not None else ()),
        *((f"ext_authz.instances[{i}]", inst) for i, inst in enumerate(ext_authz.instances)),
        *((f"ext_proc.instances[{i}]", inst) for i, inst in enumerate(ext_proc.instances)),
        *((f"servers.{s.name}.instances[{i}]", inst) for s in servers if s.kind != "url"
          for i, inst in enumerate(s.instances)),
        *((f"backends.{b.name}.instance", b.instance) for b in backends),
        *((f"aggregate.instances[{i}]", inst) for i, inst in enumerate(aggregate.instances)),
        *((("aggregate.inner_listener", aggregate.inner_listener),)
          if aggregate.inner_listener is not None else ()),
        *((f"console.instances[{i}]", inst) for i, inst in enumerate(console.instances))])

    identity = _identity(top.get("identity"), path, state_dir)
    for server in servers:
        creds = server.credentials
        if isinstance(creds, TokenExchangeCredentials) and creds.subject == "assertion" \
                and not identity.assertion:
            raise ConfigError(f"servers.{server.name}.credentials.subject: assertion needs "
                              f"identity.assertion: true (the gateway signs the assertion it "
                              f"exchanges)")
    return GatewayConfig(
        listen=listen, telemetry=telemetry, audit=audit, catalog=catalog, public_url=public_url,
        admin=admin,
        tls=tls, issuers=tuple(issuers), auth=auth, policy=policy, rate_limits=rate_limits,
        ext_authz=ext_authz,
        ext_proc=ext_proc,
        servers=tuple(servers), backends=tuple(backends), secrets=secrets, envoy=envoy,
        aggregate=aggregate, virtual_servers=virtual_servers, console=console,
        identity=identity,
        inner_tls=_inner_tls(top.get("inner_tls"), path, state_dir),
        state_dir=state_dir,
        max_request_bytes=_take(top, "max_request_bytes", int, "config", 1024 * 1024),
        source=source,
    )


def _identity(raw: Any, path: Callable[[str], str], state_dir: str) -> IdentityConfig:
    """The identity: section. Absent: no assertion (the identity headers of gateway.wire go
    upstream, as before). Key files default under <state_dir>/keys."""
    if raw is None:
        return IdentityConfig(keys=str(Path(state_dir) / "keys" / "assertion-keys.json"),
                              jwks_file=str(Path(state_dir) / "keys" / "assertion-jwks.json"))
    data = _only(raw, {f.name for f in fields(IdentityConfig)}, "identity")
    assertion = _take(data, "assertion", bool, "identity", True)
    ttl = _take(data, "ttl_seconds", int, "identity", 60)
    if isinstance(ttl, bool) or not 1 <= ttl <= 60:
        raise ConfigError(f"identity.ttl_seconds must be 1..60 (an assertion lives a minute at "
                          f"most), got {ttl!r}")
    keys = _take(data, "keys", str, "identity", "") or str(Path(state_dir) / "keys" / "assertion-keys.json")
    jwks = _take(data, "jwks_file", str, "identity", "") \
        or str(Path(keys).with_name("assertion-jwks.json"))
    keys, jwks = path(keys), path(jwks)
    if keys == jwks:
        raise ConfigError("identity.jwks_file must differ from identity.keys (the JWKS is published; "
                          "the key file holds private keys)")
    return IdentityConfig(assertion, ttl, keys, jwks)


def _with_audience(server: ServerConfig, raw: Any) -> ServerConfig:
    """servers.<name>.audience: the assertion's `aud` for this upstream (an absolute URI)."""
    if not isinstance(raw, dict) or "audience" not in raw:
        return server
    where = f"servers.{server.name}.audience"
    value = raw["audience"]
    if not isinstance(value, str) or not value.strip() or len(value) > 2048 \
            or not value.isascii() or any(c.isspace() for c in value) or ":" not in value:
        raise ConfigError(f"{where} must be an absolute URI (e.g. https://files.example/mcp), "
                          f"got {value!r}")
    return replace(server, audience=value)


def _refuse_shared_audiences(servers: list[ServerConfig], public_url: str,
                             virtual: list[str]) -> None:
    """A caller assertion minted for one party must never be one another accepts: each server
    has its own assertion audience, never the aggregate endpoint's (<public_url>/mcp) nor a
    virtual server's, and no token exchange sends its assertion subject to (token_endpoint) or
    asks a token for (credentials.audience) another server's assertion audience."""
    base = f"{public_url.rstrip('/')}/mcp"
    endpoints = {base: "the aggregate endpoint /mcp",
                 **{f"{base}/{v}": f"the virtual server {v}" for v in virtual}}
    accepted: dict[str, str] = {}
    for server in servers:
        audience = server.audience or f"{base}/{server.name}"
        taken = endpoints.get(audience) or (f"server {accepted[audience]}"
                                            if audience in accepted else None)
        if taken is not None:
            raise ConfigError(f"servers.{server.name}.audience {audience!r} is already the caller "
                              f"assertion audience of {taken}: each server needs its own (an "
                              f"assertion for one would be accepted by the other)")
        accepted[audience] = server.name
    for server in servers:
        creds = server.credentials
        if not isinstance(creds, TokenExchangeCredentials):
            continue
        where = f"servers.{server.name}.credentials"
        for key, value, own in (("audience", creds.audience, server.name),
                                ("token_endpoint", creds.token_endpoint, None)):
            other = accepted.get(value)
            if other is not None and other != own:
                raise ConfigError(f"{where}.{key} {value!r} is the caller assertion audience of "
                                  f"server {other}: that server would accept what is sent there")


def _aggregate(raw: Any, secrets: tuple[str, ...]) -> AggregateConfig:
    """The aggregate: section. Absent: the aggregate endpoint is off."""
    if raw is None:
        return AggregateConfig(enabled=False)
    data = _only(raw, {f.name for f in fields(AggregateConfig)}, "aggregate")
    enabled = _take(data, "enabled", bool, "aggregate", True)
    keys = _take(data, "session_keys", str, "aggregate", DEFAULT_AGGREGATE_SESSION_KEYS)
    instances: tuple[Instance, ...] = ()
    inner = None
    if enabled or "instances" in data:
        instances = _instances(data.get("instances"), "aggregate.instances", 1)
    if enabled or "inner_listener" in data:
        inner = _instance(_take(data, "inner_listener", dict, "aggregate"), "aggregate.inner_listener")
    if enabled and keys not in secrets:
        raise ConfigError(f"aggregate.session_keys: {keys!r} is not listed in secrets (it holds the "
                          f"keys that seal aggregate session ids)")
    return AggregateConfig(enabled, instances, keys, inner)


def _check_delegation_issuer(idata: dict[str, Any], where: str, advertise: bool,
                             audiences: tuple[str, ...], aggregate: str, virtual: set[str],
                             console: str) -> None:
    """A delegation issuer (``issuers[].delegation``) acts for callers at the servers it names:
    never advertised to clients, its audiences listed explicitly, and never an endpoint that
    fans out to every server (``/mcp``, a virtual server) or the console."""
    if advertise:
        raise ConfigError(f"{where}.advertise: a delegation issuer is not an authorization server "
                          "for clients; leave advertise unset or false")
    if "audiences" not in idata:
        raise ConfigError(f"{where}.audiences: a delegation issuer lists the servers it may act "
                          "at (the default, every server, is too wide)")
    wide = sorted(a for a in audiences if a == aggregate or a in virtual or a == console)
    if wide:
        raise ConfigError(f"{where}.audiences: {wide[0]} is an aggregate endpoint or the console; "
                          "a delegation issuer's tokens are for single servers only")


def _console(raw: Any, issuers: list[str]) -> ConsoleConfig:
    """The console: section. Absent: no console."""
    if raw is None:
        return ConsoleConfig()
    data = _only(raw, {f.name for f in fields(ConsoleConfig)}, "console")
    enabled = _take(data, "enabled", bool, "console", True)
    instances = _instances(data.get("instances"), "console.instances", 1) \
        if enabled or "instances" in data else ()
    if len(instances) > 1:
        # A session lives in the memory of the process that signed it in, and a browser's first
        # request has no cookie to hash on: a second process would not know its session.
        raise ConfigError("console.instances: one console process only (sessions live in its memory)")
    entrypoint = _take(data, "entrypoint", str, "console", DEFAULT_CONSOLE_ENTRYPOINT)
    if not re.fullmatch(r"[a-z_][a-z0-9_]*(/[a-z_][a-z0-9_]*)+", entrypoint):
        raise ConfigError(f"console.entrypoint must be a Rego rule path like "
                          f"{DEFAULT_CONSOLE_ENTRYPOINT!r}, got {entrypoint!r}")
    seconds = _take(data, "session_seconds", int, "console", 3600)
    if not 60 <= seconds <= 86_400:
        raise ConfigError(f"console.session_seconds must be an integer from 60 to 86400, got {seconds}")
    oidc = _console_oidc(data.get("oidc"), issuers)
    tenants = _take(data, "matrix_tenants", list, "console", [])
    if len(tenants) > MAX_CONSOLE_MATRIX_TENANTS or not all(
            isinstance(t, str) and re.fullmatch(r"[\x21-\x7e]{1,128}", t) for t in tenants) \
            or len(set(tenants)) != len(tenants):
        raise ConfigError(f"console.matrix_tenants must be at most {MAX_CONSOLE_MATRIX_TENANTS} distinct "
                          f"tenant names (printable, no spaces, 1 to 128 characters)")
    stats_url = _take(data, "envoy_stats_url", str, "console", None)
    if stats_url is not None:
        parsed = urlsplit(stats_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query \
                or parsed.fragment or parsed.username or len(stats_url) > 2048 \
                or not parsed.path.endswith("/stats/prometheus"):
            raise ConfigError(f"console.envoy_stats_url must be an http(s) URL of Envoy's stats "
                              f"listener ending in /stats/prometheus (no query, no credentials), "
                              f"got {stats_url!r}")
    return ConsoleConfig(enabled, instances, entrypoint, seconds, oidc, tuple(tenants), stats_url)


def _console_oidc(raw: Any, issuers: list[str]) -> ConsoleOidcConfig | None:
    if raw is None:
        return None
    where = "console.oidc"
    data = _only(raw, {f.name for f in fields(ConsoleOidcConfig)}, where)
    issuer = _take(data, "issuer", str, where)
    if issuer not in issuers:
        raise ConfigError(f"{where}.issuer: {issuer!r} is not one of issuers[].issuer (its tokens "
                          f"are verified with that issuer's keys)")
    endpoints = {}
    for key in ("authorization_endpoint", "token_endpoint"):
        url = _take(data, key, str, where)
        parts = urlsplit(url)
        loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
        if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
            raise ConfigError(f"{where}.{key} must be an https URL (http only on loopback), got {url!r}")
        endpoints[key] = url
    client_id = _take(data, "client_id", str, where)
    secret_env = _take(data, "client_secret_env", (str, type(None)), where, None)
    scope = _take(data, "scope", str, where, "openid")
    if not client_id or not re.fullmatch(r"[\x21-\x7e]+( [\x21-\x7e]+)*", scope):
        raise ConfigError(f"{where}: client_id must not be empty and scope must be space-separated tokens")
    return ConsoleOidcConfig(issuer, endpoints["authorization_endpoint"], endpoints["token_endpoint"],
                             client_id, secret_env, scope)


def _inner_tls(raw: Any, path: Callable[[str], str], state_dir: str) -> InnerTlsConfig:
    """The inner_tls: section. Absent: off. Paths default under <state_dir>/tls/inner."""
    if raw is None:
        raw = {}
    data = _only(raw, {f.name for f in fields(InnerTlsConfig)}, "inner_tls")
    for key in ("dir", "ca_file", "cert_file", "key_file", "sds_dir"):
        if not _take(data, key, str, "inner_tls", "x"):
            raise ConfigError(f"inner_tls.{key} must be a non-empty path")
    enabled = _take(data, "enabled", bool, "inner_tls", False)
    domain = _take(data, "domain", str, "inner_tls", INNER_TLS_DEFAULT_DOMAIN)
    if not _DNS_NAME.match(domain):
        raise ConfigError(f"inner_tls.domain must be a lower-case DNS name, got {domain!r}")
    folder = path(data["dir"]) if "dir" in data else str(Path(state_dir) / "tls" / "inner")

    def file(key: str, default: str) -> str:
        return path(data[key]) if key in data else str(Path(folder) / default)

    return InnerTlsConfig(enabled=enabled, dir=folder, ca_file=file("ca_file", "ca.pem"),
                          cert_file=file("cert_file", f"{inner_tls.ENVOY}.pem"),
                          key_file=file("key_file", f"{inner_tls.ENVOY}.key"), domain=domain,
                          sds_dir=path(data["sds_dir"]) if "sds_dir" in data
                          else str(Path(state_dir) / "envoy-sds"))


def _virtual_servers(raw: Any, servers: list[str], aggregate: AggregateConfig
                     ) -> tuple[VirtualServerConfig, ...]:
    """virtual_servers: name -> {tools: ["<server>/<tool glob>", ...], description}."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError("virtual_servers must be a mapping of name -> virtual server")
    if raw and not aggregate.enabled:
        raise ConfigError("virtual_servers are served by the aggregate endpoint: they need "
                          "aggregate.enabled")
    out = []
    for name, vdata in raw.items():
        where = f"virtual_servers.{name}"
        if not isinstance(name, str) or not _VIRTUAL_NAME.match(name):
            raise ConfigError(f"{where}: a virtual server name is lower-case letters, digits and "
                              f"'-', starting with a letter")
        if name in servers:
            raise ConfigError(f"{where}: {name!r} is also a server name (both would be /mcp/{name})")
        vdata = _only(vdata, {"tools", "description"}, where)
        tools = _take(vdata, "tools", list, where)
        if not tools:
            raise ConfigError(f"{where}.tools must list at least one \"<server>/<tool glob>\"")
        for i, entry in enumerate(tools):
            _tool_glob(entry, f"{where}.tools[{i}]", servers)
        out.append(VirtualServerConfig(name, tuple(tools),
                                       _take(vdata, "description", str, where, "")))
    return tuple(out)


def _tool_glob(entry: Any, where: str, servers: list[str]) -> None:
    if not isinstance(entry, str) or "/" not in entry:
        raise ConfigError(f"{where} must be \"<server>/<tool glob>\", got {entry!r}")
    server, tool = entry.split("/", 1)
    if server not in servers:
        raise ConfigError(f"{where}: {server!r} is not a configured server")
    if not tool or not _TOOL_GLOB.match(tool) or "/" in tool:
        raise ConfigError(f"{where}: {tool!r} is not a tool name glob (letters, digits, _ . - and "
                          f"the wildcards * ? [...])")
    depth = 0
    for char in tool:
        depth += (char == "[") - (char == "]")
        if depth not in (0, 1):
            raise ConfigError(f"{where}: unbalanced '[' ']' in {tool!r}")
    if depth:
        raise ConfigError(f"{where}: unbalanced '[' ']' in {tool!r}")


_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})


def _refuse_shared_ports(listeners: list[tuple[str, Instance]]) -> None:
    """Two processes of one gateway cannot listen on one port of one address (a wildcard
    address takes the port on every address): the second would fail at start, or on a
    reused port quietly answer for the first."""
    seen: dict[int, list[tuple[str, str]]] = {}
    for key, inst in listeners:
        for other_key, other_host in seen.get(inst.port, []):
            if inst.host == other_host or {inst.host, other_host} & _WILDCARD_HOSTS:
                raise ConfigError(f"{key} and {other_key} both listen on port {inst.port}")
        seen.setdefault(inst.port, []).append((key, inst.host))


def load_config(path: str | os.PathLike[str] | None = None) -> GatewayConfig:
    """Load the gateway config (the embedded default when no path is given)."""
    p = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {p} is not valid YAML: {exc}") from None
    # Relative paths in the embedded default resolve against the working directory (the
    # checkout), whether it is loaded by default or by its path (the dev stack hands its path to
    # the aggregator, which must find the same state_dir); in a user's file, against its folder.
    embedded = path is None or p.resolve() == DEFAULT_CONFIG_PATH.resolve()
    base = Path.cwd() if embedded else p.resolve().parent
    return parse_config(raw, base_dir=base, source=str(p))
