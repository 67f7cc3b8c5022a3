"""The bridge's one settings object: read from argv at the edge, validated once."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mcp_servers.core.identity import add_assertion_arguments
from mcp_servers.core.settings import LOOPBACK_HOSTS

# Environment a child inherits (as the SDK's stdio client does, plus LANG and TZ); everything else
# must be named with --env, so the gateway's own secrets never reach a third-party server.
ENV_ALLOWLIST: tuple[str, ...] = ("HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER", "LANG", "TZ")

DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_STDERR_LINE = 8 * 1024
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_STDIN_QUEUE = 256
DEFAULT_MAX_IN_FLIGHT_PER_CHILD = 64
DEFAULT_MAX_IN_FLIGHT = 1024
DEFAULT_MAX_SESSIONS = 32
DEFAULT_POOL_SIZE = 2
DEFAULT_SESSION_IDLE_SECONDS = 1800.0
DEFAULT_START_TIMEOUT = 30.0
DEFAULT_STOP_GRACE = 2.0
DEFAULT_DRAIN_SECONDS = 10.0
DEFAULT_RESTART_BACKOFF = 0.2
DEFAULT_RESTART_BACKOFF_MAX = 10.0
DEFAULT_MAX_FAILED_RESTARTS = 3
DEFAULT_CRASH_LOOP_EXITS = 5
DEFAULT_CRASH_LOOP_WINDOW = 60.0
DEFAULT_NON_JSON_PER_MINUTE = 100
DEFAULT_MAX_BUFFERED_EVENTS = 1000
DEFAULT_SSE_KEEPALIVE = 15.0
DEFAULT_SSE_RETRY_MS = 1000
DEFAULT_RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    """Where to serve, what to run, and the bounds that keep one bridge's cost fixed."""

    argv: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 0
    path: str = "/mcp"
    name: str = "stdio"
    workdir: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_stderr_line: int = DEFAULT_MAX_STDERR_LINE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    stdin_queue: int = DEFAULT_STDIN_QUEUE
    max_in_flight_per_child: int = DEFAULT_MAX_IN_FLIGHT_PER_CHILD
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_sessions: int = DEFAULT_MAX_SESSIONS
    pool_size: int = DEFAULT_POOL_SIZE
    session_idle_seconds: float = DEFAULT_SESSION_IDLE_SECONDS
    start_timeout: float = DEFAULT_START_TIMEOUT
    stop_grace: float = DEFAULT_STOP_GRACE
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    restart_backoff: float = DEFAULT_RESTART_BACKOFF
    restart_backoff_max: float = DEFAULT_RESTART_BACKOFF_MAX
    max_failed_restarts: int = DEFAULT_MAX_FAILED_RESTARTS
    crash_loop_exits: int = DEFAULT_CRASH_LOOP_EXITS
    crash_loop_window: float = DEFAULT_CRASH_LOOP_WINDOW
    non_json_per_minute: int = DEFAULT_NON_JSON_PER_MINUTE
    max_buffered_events: int = DEFAULT_MAX_BUFFERED_EVENTS
    sse_keepalive: float = DEFAULT_SSE_KEEPALIVE
    sse_retry_ms: int = DEFAULT_SSE_RETRY_MS
    retry_after_seconds: int = DEFAULT_RETRY_AFTER_SECONDS
    log_level: str = "INFO"
    otlp_endpoint: str | None = None  # OTLP/gRPC collector for spans; None: no export
    # The gateway's caller assertion (mcp_servers.core.identity): required when the JWKS is set.
    assertion_jwks: str | None = None
    assertion_issuer: str | None = None
    assertion_audience: str | None = None

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("no command: give the stdio server's argv after '--'")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        if not self.path.startswith("/") or self.path in ("/ready", "/metrics"):
            raise ValueError(f"path must start with '/' and not be /ready or /metrics: {self.path!r}")
        for name in ("max_line_bytes", "max_stderr_line", "max_body_bytes", "stdin_queue",
                     "max_in_flight_per_child", "max_in_flight", "max_sessions",
                     "max_buffered_events", "crash_loop_exits", "max_failed_restarts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.pool_size < 0:
            raise ValueError("pool_size must be >= 0")
        for name in ("session_idle_seconds", "start_timeout", "stop_grace", "restart_backoff",
                     "restart_backoff_max", "crash_loop_window", "sse_keepalive"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.assertion_jwks is not None and not (self.assertion_issuer and self.assertion_audience):
            raise ValueError("--assertion-jwks needs --assertion-issuer and --assertion-audience")
        if self.workdir is not None and not Path(self.workdir).is_dir():
            raise ValueError(f"workdir {self.workdir!r} is not a directory")

    def child_env(self) -> dict[str, str]:
        """The child's whole environment: the allowlist from ours, then the named variables."""
        base = {k: v for k, v in os.environ.items() if k in ENV_ALLOWLIST}
        return {**base, **self.env}

    @classmethod
    def from_argv(cls, args: Sequence[str], environ: Mapping[str, str] | None = None) -> BridgeSettings:
        """Parse ``[options] -- argv...``; ``--env NAME`` copies NAME from ``environ`` (must be set)."""
        environ = os.environ if environ is None else environ
        args = list(args)
        if "--" in args:
            cut = args.index("--")
            options, command = args[:cut], args[cut + 1:]
        else:
            options, command = args, []
        parser = argparse.ArgumentParser(prog="python -m mcp_bridge",
                                         description="Serve a stdio MCP server over Streamable HTTP.")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--path", default="/mcp")
        parser.add_argument("--name", default="stdio", help="server name in logs and metrics")
        parser.add_argument("--workdir", default=None)
        parser.add_argument("--env", action="append", default=[], metavar="NAME",
                            help="pass this variable of the bridge's environment to the child")
        parser.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                            help="also answer to this Host ('*' disables the check)")
        parser.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS)
        parser.add_argument("--pool", type=int, default=DEFAULT_POOL_SIZE)
        parser.add_argument("--session-idle-seconds", type=float, default=DEFAULT_SESSION_IDLE_SECONDS)
        parser.add_argument("--max-line-bytes", type=int, default=DEFAULT_MAX_LINE_BYTES)
        parser.add_argument("--drain-seconds", type=float, default=DEFAULT_DRAIN_SECONDS)
        parser.add_argument("--start-timeout", type=float, default=DEFAULT_START_TIMEOUT)
        parser.add_argument("--restart-backoff", type=float, default=DEFAULT_RESTART_BACKOFF,
                            help=f"first delay before restarting a child (doubles up to "
                                 f"{DEFAULT_RESTART_BACKOFF_MAX:g} s)")
        parser.add_argument("--log-level", default="INFO")
        parser.add_argument("--otlp-endpoint", default=environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
                            help="OTLP/gRPC collector for spans (default $OTEL_EXPORTER_OTLP_ENDPOINT)")
        add_assertion_arguments(parser, environ)
        ns = parser.parse_args(options)
        env: dict[str, str] = {}
        for name in ns.env:
            if name not in environ:
                parser.error(f"--env {name}: not set in the bridge's environment")
            env[name] = environ[name]
        return cls(argv=tuple(command), host=ns.host, port=ns.port, path=ns.path, name=ns.name,
                   workdir=ns.workdir, env=env,
                   allowed_hosts=(*LOOPBACK_HOSTS, *(h.lower() for h in ns.allowed_host)),
                   max_sessions=ns.max_sessions, pool_size=ns.pool,
                   session_idle_seconds=ns.session_idle_seconds, max_line_bytes=ns.max_line_bytes,
                   drain_seconds=ns.drain_seconds, start_timeout=ns.start_timeout,
                   restart_backoff=ns.restart_backoff,
                   log_level=ns.log_level, otlp_endpoint=ns.otlp_endpoint,
                   assertion_jwks=ns.assertion_jwks, assertion_issuer=ns.assertion_issuer,
                   assertion_audience=ns.assertion_audience)
