"""The process plan: which processes the dev stack runs, with which arguments, environment and
ports, in which start order, and which health check each one answers. Nothing here starts a
process; ``check_ports`` only tries to bind each port before anything starts."""

from __future__ import annotations

import errno
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from gateway import inner_tls
from gateway.config import DEFAULT_CONFIG_PATH, GatewayConfig, Instance, ServerConfig
from gateway.console.settings import INNER_TLS_IDENTITY as CONSOLE_IDENTITY
from gateway.credentials.config import credential_secrets
from gatewayctl import envoy_config, runtimes
from gatewayctl.devstack.credentials import local_jwks_issuer
from gatewayctl.devstack.state import StackError, paths


def config_arguments(config: GatewayConfig) -> tuple[str, ...]:
    """``--config FILE`` for the services, or nothing for the embedded default."""
    if not config.source or Path(config.source) == DEFAULT_CONFIG_PATH:
        return ()
    return ("--config", str(Path(config.source).resolve()))


def base_dir(config: GatewayConfig) -> Path:
    """The folder relative paths of ``config`` resolve against (children run there)."""
    if not config.source or Path(config.source) == DEFAULT_CONFIG_PATH:
        return Path.cwd()
    return Path(config.source).resolve().parent


@dataclass(frozen=True, slots=True)
class Probe:
    kind: str  # "http" | "grpc" | "envoy" | "mcp" (a url server, gateway.upstream.probe)
    host: str
    port: int
    path: str = "/"  # mcp: the endpoint's URL
    server: str = ""  # mcp: the server's name in the config
    # inner_tls: the name the component's certificate carries; the probe then speaks TLS with
    # the gateway's client certificate ("" : plain text).
    tls_name: str = ""


def remote(component: Component) -> bool:
    """A url server's endpoint: nothing to start, bind or stop, only to check."""
    return component.probe.kind == "mcp"


@dataclass(frozen=True, slots=True)
class Component:
    name: str  # "jwks", "ext_authz", "ext_proc", a server name, "envoy"
    instance: int
    host: str
    port: int
    argv: tuple[str, ...]
    probe: Probe
    env: tuple[str, ...] = ()  # secrets this process receives
    wave: int = 1  # 0: backends, 1: gateway services and MCP servers, 2: Envoy
    metrics_url: str | None = None  # where Prometheus scrapes this process
    # Folders put first on this process's PATH: a command server's runtime (gatewayctl.runtimes),
    # so the bridge, and the stdio server it starts, find the installed program.
    path_prefix: tuple[str, ...] = ()
    # inner_tls: the MCP_INNER_TLS_* variables naming this process's certificate files.
    tls_env: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.name}[{self.instance}]"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def workdir(config: GatewayConfig, server: ServerConfig) -> Path:
    """Where a command server's program runs: its ``workdir``, else state_dir/servers/<name>."""
    return Path(server.workdir) if server.workdir else paths(config).state_dir / "servers" / server.name


def runtime_path_prefix(config: GatewayConfig, server: ServerConfig) -> tuple[str, ...]:
    """The runtime's bin folders of a command server (none without a runtime). Computed from
    the runtime's folder, which depends only on the config and the environment: nothing is
    installed here (Stack.prepare does that)."""
    if server.runtime is None:
        return ()
    directory = runtimes.runtime_dir(config, server)
    return runtimes.bin_dirs(server.runtime, directory)


SERVICE_MODULES = {"ext_authz": "ext_authz", "ext_proc": "ext_proc"}
# ext_authz over Envoy's HTTP mode answers its health check here (ext_authz.http_front.HEALTH_PATH).
HTTP_AUTHZ_HEALTH_PATH = "/-/health"


def assertion_args(config: GatewayConfig, name: str) -> tuple[str, ...]:
    """Flags of a server (or bridge) behind the gateway with identity.assertion on: require the
    gateway's signed caller assertion, verified with the published JWKS file."""
    if not config.identity.assertion:
        return ()
    return ("--assertion-jwks", config.identity.jwks_file,
            "--assertion-issuer", config.public_url.rstrip("/"),
            "--assertion-audience", config.server_audience(name))


def _server_common_args(config: GatewayConfig, name: str, inst: Instance) -> tuple[str, ...]:
    """Flags every server built on mcp_servers.core takes: its own audit file (the writer locks
    it, so one per instance) in audit.dir, signed and sealed like ext_authz's (the subject key
    store is the one in audit.dir; the master key comes in the secret audit.master_key names,
    see ``audit_secrets``), and the log level. Tracing reaches servers through the
    OTEL_EXPORTER_OTLP_ENDPOINT environment variable."""
    audit = config.audit
    return ("--audit-file", str(Path(audit.dir) / f"{name}-{inst.port}.jsonl"),
            "--audit-max-bytes", str(audit.max_bytes), "--audit-keep", str(audit.keep),
            "--audit-checkpoint-seconds", str(audit.checkpoint_seconds),
            *(("--audit-signing-key", audit.signing_key) if audit.signing_key else ()),
            *(("--audit-master-key-env", audit.master_key) if audit.master_key else ()),
            *(("--audit-retention-days", str(audit.retention_days))
              if audit.retention_days is not None else ()),
            "--audit-sync", audit.result_sync,
            "--audit-sync-interval-ms", str(audit.sync_interval_ms),
            "--log-level", config.telemetry.log_level, *assertion_args(config, name))


def audit_secrets(config: GatewayConfig, env: tuple[str, ...]) -> tuple[str, ...]:
    """``env`` plus the secret holding the audit master key, for a process that seals entries."""
    key = config.audit.master_key
    return (*env, key) if key and key not in env else env


# Envoy's hot restart (`mcp-gateway reload`): the new Envoy takes the listening sockets over, the
# old one drains its connections for ENVOY_DRAIN_SECONDS and exits after
# ENVOY_PARENT_SHUTDOWN_SECONDS (streams still open then, e.g. long SSE answers, are cut).
ENVOY_DRAIN_SECONDS = 5
ENVOY_PARENT_SHUTDOWN_SECONDS = 15


def envoy_base_id(config: GatewayConfig) -> int:
    """Envoy's --base-id: names the shared memory and sockets of its hot restart, so it must
    differ between stacks on one machine; their listen ports already do."""
    return config.listen.port


def envoy_command(config: GatewayConfig) -> tuple[str, ...]:
    """The stack's Envoy: its restarter (which adds ``--restart-epoch`` and hot-restarts it on
    SIGHUP: Envoy with hot restart on dies with the process that started it) and Envoy's argv."""
    return (sys.executable, "-m", "gatewayctl.envoy_restarter", "--state-dir",
            str(paths(config).state_dir), "--",
            str(envoy_config.find_envoy()), "-c", str(paths(config).envoy_yaml),
            "--log-level", "warn", "--base-id", str(envoy_base_id(config)),
            "--drain-time-s", str(ENVOY_DRAIN_SECONDS),
            "--parent-shutdown-time-s", str(ENVOY_PARENT_SHUTDOWN_SECONDS),
            "--concurrency", str(envoy_config.worker_threads()))


def plan(config: GatewayConfig, *, ext_proc: bool | None = None,
         modules: dict[str, str] | None = None) -> list[Component]:
    """Every process the stack runs, in start order (pure: starts nothing).

    ``ext_proc`` None: run it when the service is installed. ``modules`` replaces the Python
    module of ext_authz / ext_proc (tests run stand-ins)."""
    py = sys.executable
    mods = {**SERVICE_MODULES, **(modules or {})}
    p = paths(config)
    # Children get the user's file as is (they run in its folder, so relative paths agree);
    # without --config they load the embedded default, relative to the same working directory.
    config_args = config_arguments(config)
    out: list[Component] = []
    offset = config.telemetry.metrics_port_offset
    for backend in config.backends:
        inst = backend.instance
        out.append(Component(backend.name, 0, inst.host, inst.port,
                             (py, "-m", backend.module, "--host", inst.host, "--port", str(inst.port),
                              *backend.args),
                             Probe("http", inst.host, inst.port, backend.health_path),
                             env=backend.env, wave=0))
    local = local_jwks_issuer(config)
    if local is not None:
        port, url_path = local
        out.append(Component("jwks", 0, "127.0.0.1", port,
                             (py, "-m", "http.server", "--bind", "127.0.0.1",
                              "--directory", str(p.jwks_root), str(port)),
                             Probe("http", "127.0.0.1", port, url_path)))
    # url servers' static header secrets: Envoy sends them, ext_authz's catalog fetch too.
    upstream_secrets = envoy_config.envoy_environment(config)
    # The aggregate session key ring: ext_authz opens the session ids the aggregator seals.
    key_ring: tuple[str, ...] = (config.aggregate.session_keys,) if config.aggregate.enabled else ()
    # The upstream credentials' secrets (static values, token endpoint client secrets, store keys).
    key_ring += tuple(dict.fromkeys(n for s in config.servers
                                    for n in credential_secrets(s.credentials)))
    # The audit master key: ext_authz seals the personal fields of its entries under it.
    key_ring = audit_secrets(config, key_ring)
    for i, inst in enumerate(config.ext_authz.instances):
        out.append(Component("ext_authz", i, inst.host, inst.port,
                             (py, "-m", mods["ext_authz"], *config_args, "--port", str(inst.port)),
                             Probe("http", inst.host, inst.port, HTTP_AUTHZ_HEALTH_PATH)
                             if config.ext_authz.transport == "http" else
                             Probe("grpc", inst.host, inst.port), env=(*upstream_secrets, *key_ring),
                             metrics_url=f"http://{inst.host}:{inst.port + offset}/metrics"))
    if ext_proc if ext_proc is not None else envoy_config.ext_proc_available():
        for i, inst in enumerate(config.ext_proc.instances):
            out.append(Component("ext_proc", i, inst.host, inst.port,
                                 (py, "-m", mods["ext_proc"], *config_args, "--port", str(inst.port)),
                                 Probe("grpc", inst.host, inst.port),
                                 metrics_url=f"http://{inst.host}:{inst.port + offset}/metrics"))
    for server in config.servers:
        if server.kind == "url":
            # Runs elsewhere: the stack waits until each endpoint answers its MCP-level check.
            for i, url in enumerate(server.urls):
                out.append(Component(server.name, i, url.host, url.port, (),
                                     Probe("mcp", url.host, url.port, url.url, server.name)))
            continue
        if server.kind == "command":
            # A stdio server behind the bridge (mcp_bridge), one bridge per instance; the
            # bridge runs the command in its own process group and answers /ready. A runtime's
            # bin folders go first on the bridge's PATH, which the child inherits.
            prefix = runtime_path_prefix(config, server)
            for i, inst in enumerate(server.instances):
                out.append(Component(
                    server.name, i, inst.host, inst.port,
                    (py, "-m", "mcp_bridge", "--host", inst.host, "--port", str(inst.port),
                     "--name", server.name, "--workdir", str(workdir(config, server)),
                     "--log-level", config.telemetry.log_level, *assertion_args(config, server.name),
                     *(a for n in server.env for a in ("--env", n)), "--", *server.command),
                    Probe("http", inst.host, inst.port, "/ready"), env=server.env,
                    metrics_url=f"http://{inst.host}:{inst.port}/metrics", path_prefix=prefix))
            continue
        for i, inst in enumerate(server.instances):
            out.append(Component(server.name, i, inst.host, inst.port,
                                 (py, "-m", server.module, "--host", inst.host,
                                  "--port", str(inst.port), *_server_common_args(config, server.name, inst),
                                  *server.args),
                                 Probe("http", inst.host, inst.port, "/ready"),
                                 env=audit_secrets(config, server.env),
                                 metrics_url=f"http://{inst.host}:{inst.port}/metrics"))
    out += aggregators(config)
    out += consoles(config)
    envoy_argv = envoy_command(config)
    # Envoy reads url servers' static header secrets from its environment (%ENVIRONMENT%).
    out.append(Component("envoy", 0, config.listen.host, config.listen.port, envoy_argv,
                         Probe("envoy", config.admin.host, config.admin.port, "/ready"), wave=2,
                         env=upstream_secrets,
                         metrics_url=f"http://{config.admin.host}:{config.admin.port}/stats/prometheus"))
    return [with_inner_tls(config, c) for c in out]


def inner_identity(config: GatewayConfig, component: str) -> str | None:
    """The inner_tls identity of a component the stack runs (None: it has no inner certificate:
    Envoy's is its client one, backends and the JWKS server are not behind Envoy)."""
    if component in ("ext_authz", "ext_proc"):
        return inner_tls.EXT_AUTHZ if component == "ext_authz" else inner_tls.EXT_PROC
    if component == "aggregator" and config.aggregate.enabled:
        return inner_tls.AGGREGATOR
    if component == "console" and config.console.enabled:
        return CONSOLE_IDENTITY
    if any(s.name == component and s.kind != "url" for s in config.servers):
        return inner_tls.server_identity(component)
    return None


def with_inner_tls(config: GatewayConfig, comp: Component) -> Component:
    """Under inner_tls: the component's certificate files in its environment, its probe over
    TLS, and its same-port /metrics over https."""
    identity = inner_identity(config, comp.name) if config.inner_tls.enabled else None
    if identity is None or remote(comp):
        return comp
    metrics = comp.metrics_url
    if metrics is not None and metrics.startswith(f"http://{comp.host}:{comp.port}/"):
        metrics = "https" + metrics.removeprefix("http")
    return replace(comp, tls_env=tuple(config.inner_tls.files(identity).env().items()),
                   probe=replace(comp.probe, tls_name=config.inner_tls.san(identity)),
                   metrics_url=metrics)


def inner_base_url(config: GatewayConfig) -> str:
    """Where the aggregator reaches Envoy's inner listener (a wildcard address: loopback)."""
    inner = config.aggregate.inner_listener
    if inner is None:
        raise StackError("aggregate.inner_listener is not set")
    host = "127.0.0.1" if inner.host in ("0.0.0.0", "") else "::1" if inner.host in ("::", "[::]") \
        else inner.host
    # inner_tls: the inner listener serves TLS and wants the aggregator's client certificate.
    scheme = "https" if config.inner_tls.enabled else "http"
    return f"{scheme}://[{host}]:{inner.port}" if ":" in host else f"{scheme}://{host}:{inner.port}"


def aggregators(config: GatewayConfig) -> list[Component]:
    """The aggregator processes of the aggregate endpoint /mcp (none when it is off). They read
    the servers, virtual servers and the key ring's name from the config (the embedded default
    by its path: unlike the services, they have no built-in default), and answer to the public
    host name that Envoy passes on."""
    if not config.aggregate.enabled:
        return []
    source = Path(config.source).resolve() if config.source else DEFAULT_CONFIG_PATH
    public_host = urlsplit(config.public_url).hostname or "127.0.0.1"
    out = []
    for i, inst in enumerate(config.aggregate.instances):
        out.append(Component(
            "aggregator", i, inst.host, inst.port,
            (sys.executable, "-m", "mcp_aggregator", "--host", inst.host, "--port", str(inst.port),
             "--config", str(source), "--upstream-base", inner_base_url(config),
             "--allowed-host", public_host, "--log-level", config.telemetry.log_level),
            Probe("http", inst.host, inst.port, "/ready"), env=(config.aggregate.session_keys,),
            metrics_url=f"http://{inst.host}:{inst.port}/metrics"))
    return out


def consoles(config: GatewayConfig) -> list[Component]:
    """The web console's processes (docs/console.md; none when the config has no console). They
    read the config by its path, as the aggregator does, and the audit master key's secret to
    show sealed subjects."""
    if not config.console.enabled:
        return []
    source = Path(config.source).resolve() if config.source else DEFAULT_CONFIG_PATH
    return [Component("console", i, inst.host, inst.port,
                      (sys.executable, "-m", "gateway.console", "--config", str(source),
                       "--host", inst.host, "--port", str(inst.port)),
                      Probe("http", inst.host, inst.port, "/ready"), env=audit_secrets(config, ()))
            for i, inst in enumerate(config.console.instances)]


def listening_ports(config: GatewayConfig, components: list[Component]) -> list[tuple[str, str, int]]:
    """(what, host, port) of every socket the stack binds."""
    ports = [(c.label, c.host, c.port) for c in components if not remote(c)]
    ports.append(("envoy admin", config.admin.host, config.admin.port))
    inner = config.aggregate.inner_listener
    if config.aggregate.enabled and inner is not None and any(c.name == "envoy" for c in components):
        ports.append(("envoy inner listener", inner.host, inner.port))
    offset = config.telemetry.metrics_port_offset
    ports += [(f"{c.label} /metrics", c.host, c.port + offset) for c in components
              if c.name in SERVICE_MODULES]
    return ports


def check_ports(ports: list[tuple[str, str, int]]) -> None:
    """Fail with the port's name when two components share a port or one is already taken."""
    seen: dict[int, str] = {}
    for what, host, port in ports:
        if port in seen:
            raise StackError(f"port {port} is configured for both {seen[port]} and {what}")
        seen[port] = what
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StackError(f"port {port} on {host} ({what}) is already in use; stop what "
                                     f"uses it or change the port in the config") from None
                raise StackError(f"cannot bind {host}:{port} ({what}): {exc.strerror}") from None
