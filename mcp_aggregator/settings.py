"""The aggregator's one settings object: read from argv (and the gateway config) at the edge,
validated once."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gateway.aggregate.session_token import parse_keys
from gateway.aggregate.views import AGGREGATE_VIEW, View, aggregate_view, views_from_config
from gateway.jsonrpc import DEFAULT_MAX_BYTES
from mcp_servers.core.identity import add_assertion_arguments
from mcp_servers.core.settings import LOOPBACK_HOSTS

DEFAULT_KEYS_ENV = "MCP_GATEWAY_AGGREGATE_KEYS"
DEFAULT_LEG_TIMEOUT = 10.0
DEFAULT_LIST_CHANGED_WINDOW = 0.1
DEFAULT_SESSION_TTL = 3600.0
DEFAULT_SSE_KEEPALIVE = 15.0
DEFAULT_SSE_RETRY_MS = 1000
DEFAULT_STREAM_BACKOFF = 0.2
DEFAULT_STREAM_BACKOFF_MAX = 10.0
DEFAULT_DRAIN_SECONDS = 5.0
SERVER_NAME = "mcp-gateway"


@dataclass(frozen=True, slots=True)
class AggregatorSettings:
    """Where to serve, where the per-server routes are, which views, and the bounds of each leg.

    ``upstream_base`` is Envoy's inner listener (``http://127.0.0.1:PORT``): every leg goes to
    ``<upstream_base>/mcp/<server>`` so it meets the same authorization, list filtering and
    masking as a client calling that server directly."""

    upstream_base: str
    views: Mapping[str, View]
    keys: tuple[bytes, ...]
    host: str = "127.0.0.1"
    port: int = 0
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    leg_timeout: float = DEFAULT_LEG_TIMEOUT
    max_body_bytes: int = DEFAULT_MAX_BYTES
    list_changed_window: float = DEFAULT_LIST_CHANGED_WINDOW
    session_ttl: float = DEFAULT_SESSION_TTL
    sse_keepalive: float = DEFAULT_SSE_KEEPALIVE
    sse_retry_ms: int = DEFAULT_SSE_RETRY_MS
    stream_backoff: float = DEFAULT_STREAM_BACKOFF
    stream_backoff_max: float = DEFAULT_STREAM_BACKOFF_MAX
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    # Late joiners and ended sessions, shared with ext_authz: Redis when set, else this process.
    redis_url: str | None = None
    server_name: str = SERVER_NAME
    log_level: str = "INFO"
    otlp_endpoint: str | None = None
    # The gateway's caller assertion (mcp_servers.core.identity): required when the JWKS is set;
    # with --config and identity.assertion on, taken from the gateway config.
    assertion_jwks: str | None = None
    assertion_issuer: str | None = None
    assertion_audience: str | None = None

    def __post_init__(self) -> None:
        if self.assertion_jwks is not None and not (self.assertion_issuer and self.assertion_audience):
            raise ValueError("--assertion-jwks needs --assertion-issuer and --assertion-audience")
        parts = urlsplit(self.upstream_base)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
                or parts.query or parts.fragment:
            raise ValueError(f"--upstream-base must be http(s)://host:port, not {self.upstream_base!r}")
        if AGGREGATE_VIEW not in self.views:
            raise ValueError("no aggregate view: name the servers (--server or --config)")
        if not self.servers:
            raise ValueError("no servers to aggregate")
        if not self.keys:
            raise ValueError("the session key ring is empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        for name in ("leg_timeout", "session_ttl", "sse_keepalive", "stream_backoff",
                     "stream_backoff_max"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.list_changed_window < 0 or self.drain_seconds < 0:
            raise ValueError("list_changed_window and drain_seconds must be >= 0")
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        if not self.allowed_hosts:
            raise ValueError("allowed_hosts is empty")

    @property
    def servers(self) -> tuple[str, ...]:
        return self.views[AGGREGATE_VIEW].servers

    @property
    def base(self) -> str:
        return self.upstream_base.rstrip("/")

    @classmethod
    def from_argv(cls, argv: Sequence[str], environ: Mapping[str, str] | None = None) -> AggregatorSettings:
        environ = os.environ if environ is None else environ
        parser = argparse.ArgumentParser(
            prog="python -m mcp_aggregator",
            description="Serve /mcp and the virtual servers by fanning out to Envoy's per-server routes.")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, required=True, help="port to bind; 0 picks a free one")
        parser.add_argument("--upstream-base", required=True, metavar="URL",
                            help="Envoy's inner listener, serving /mcp/<server> (http://127.0.0.1:PORT)")
        parser.add_argument("--config", default=None, metavar="FILE",
                            help="gateway config: servers, virtual_servers, aggregate.session_keys, "
                                 "rate_limits.redis_url")
        parser.add_argument("--server", action="append", default=[], metavar="NAME",
                            help="a server to aggregate (without --config; repeat for each)")
        parser.add_argument("--keys-env", default=None, metavar="NAME",
                            help="environment variable holding the session key ring (default: the "
                                 f"config's aggregate.session_keys, else {DEFAULT_KEYS_ENV})")
        parser.add_argument("--redis-url", default=None,
                            help="shared store of late joiners and ended sessions (default: the "
                                 "config's rate_limits.redis_url when its backend is redis)")
        parser.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                            help="also answer to this Host ('*' disables the check)")
        parser.add_argument("--leg-timeout", type=float, default=DEFAULT_LEG_TIMEOUT,
                            help="seconds each upstream leg may take (default %(default)s)")
        parser.add_argument("--drain-seconds", type=float, default=DEFAULT_DRAIN_SECONDS)
        parser.add_argument("--log-level", default="INFO")
        parser.add_argument("--otlp-endpoint", default=environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
                            help="OTLP/gRPC collector for spans (default $OTEL_EXPORTER_OTLP_ENDPOINT)")
        add_assertion_arguments(parser, environ)
        ns = parser.parse_args(list(argv))
        assertion = (ns.assertion_jwks, ns.assertion_issuer, ns.assertion_audience)
        keys_env = ns.keys_env
        redis_url = ns.redis_url
        if ns.config is not None:
            if ns.server:
                parser.error("--server and --config are exclusive (the config names the servers)")
            from gateway.config import ConfigError, load_config

            try:
                cfg = load_config(ns.config)
            except ConfigError as exc:
                parser.error(str(exc))
            views = views_from_config(cfg)
            if not views:
                parser.error(f"{ns.config}: aggregate.enabled is false")
            aggregate: Any = getattr(cfg, "aggregate", None)
            keys_env = keys_env or getattr(aggregate, "session_keys", None)
            if redis_url is None and cfg.rate_limits.backend == "redis":
                redis_url = cfg.rate_limits.redis_url
            identity = cfg.identity
            if identity.assertion and assertion[0] is None:
                # The gateway mints the aggregator's assertions for <public_url>/mcp.
                assertion = (identity.jwks_file, cfg.public_url.rstrip("/"), cfg.aggregate_url())
        else:
            if not ns.server:
                parser.error("name the servers: --config FILE or --server NAME ...")
            views = {AGGREGATE_VIEW: aggregate_view(ns.server)}
        keys_env = keys_env or DEFAULT_KEYS_ENV
        secret = environ.get(keys_env)
        if not secret:
            parser.error(f"the session key ring ${keys_env} is not set")
        try:
            keys = parse_keys(secret)
        except ValueError as exc:
            parser.error(f"${keys_env}: {exc}")
        return cls(upstream_base=ns.upstream_base, views=views, keys=keys, host=ns.host, port=ns.port,
                   allowed_hosts=(*LOOPBACK_HOSTS, *(h.lower() for h in ns.allowed_host)),
                   leg_timeout=ns.leg_timeout, drain_seconds=ns.drain_seconds, redis_url=redis_url,
                   log_level=ns.log_level, otlp_endpoint=ns.otlp_endpoint,
                   assertion_jwks=assertion[0], assertion_issuer=assertion[1],
                   assertion_audience=assertion[2])
