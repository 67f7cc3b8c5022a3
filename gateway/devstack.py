"""The local dev stack: every gateway process on one machine, supervised.

``mcp-gateway up`` starts, in order: the auxiliary backends (``backends``: e.g. the demo ERP that
the integration server reads its OpenAPI document from at start-up); then, in parallel, a JWKS
server for the dev signing key, the ext_authz processes, ext_proc (when installed) and two or
more instances of each MCP server; and Envoy last (its health checks need the upstreams). It
waits until each one answers its health check, then prints endpoints, a token, client snippets,
and where traces, metrics and audit files are.

Process handling, and why:
* Every child gets its own session (``start_new_session=True``): a Ctrl-C in the terminal
  reaches only the supervisor, which stops children in reverse order; and detached children
  survive the shell that started them (seen here: an Envoy started from a short-lived shell
  died with that shell's job).
* In the foreground the children also ask the kernel for SIGTERM when the supervisor dies
  (``PR_SET_PDEATHSIG``), so not even a SIGKILLed supervisor leaves orphans.
* A PID file in ``state_dir`` records each PID with its kernel start time; ``down`` and
  ``status`` act only on processes whose start time still matches, so a reused PID is never
  signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import http.client
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.config import DEFAULT_CONFIG_PATH, GatewayConfig, Instance
from gatewayctl import envoy_config, tokens

logger = logging.getLogger(__name__)

PID_FILE = "stack.json"
STARTUP_TIMEOUT_SECONDS = 90.0
STOP_TIMEOUT_SECONDS = 10.0
PROBE_TIMEOUT_SECONDS = 1.0
POLL_INTERVAL_SECONDS = 0.1
DEV_CERT_DAYS = 825
# The token `up` prints: every role and scope the example policy knows, for trying things out.
DEV_TOKEN_SUB = "dev-user"  # noqa: S105  (a user name, not a secret)
DEV_TOKEN_ROLES = ("admin",)
DEV_TOKEN_TTL = 8 * 3600
DEV_TOKEN_TENANT = "dev"  # noqa: S105  (a tenant name, not a secret)


class StackError(RuntimeError):
    """The dev stack cannot start, or a command cannot act on it; the message says why."""


# ------------------------------------------------------------------------------------- layout

@dataclass(frozen=True, slots=True)
class Paths:
    state_dir: Path

    @property
    def tls_dir(self) -> Path:
        return self.state_dir / "tls"

    @property
    def ca_cert(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.tls_dir / "ca.key"

    @property
    def signing_key(self) -> Path:
        return self.state_dir / "keys" / "dev-signing-key.pem"

    @property
    def jwks_root(self) -> Path:
        return self.state_dir / "jwks"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / PID_FILE

    @property
    def envoy_yaml(self) -> Path:
        return self.state_dir / "envoy.yaml"

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"


def paths(config: GatewayConfig) -> Paths:
    return Paths(Path(config.state_dir))


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


# --------------------------------------------------------------------------------- TLS + keys

def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    tmp.replace(path)


def _san_for(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def ensure_tls(config: GatewayConfig) -> Path | None:
    """Create a dev CA and server certificate when the configured ones live in state_dir and are
    missing. Returns the CA file clients should trust (None: the certificates are the user's)."""
    p = paths(config)
    cert, key = Path(config.tls.cert_file), Path(config.tls.key_file)
    if cert.exists() and key.exists():
        return p.ca_cert if p.ca_cert.exists() and _inside(cert, p.state_dir) else None
    if not (_inside(cert, p.state_dir) and _inside(key, p.state_dir)):
        missing = cert if not cert.exists() else key
        # Never invent a certificate for a path the operator chose: that would hide a mistake.
        raise StackError(f"TLS file {missing} does not exist (tls.cert_file / tls.key_file)")
    now = datetime.datetime.now(datetime.UTC)
    if p.ca_cert.exists() and p.ca_key.exists():
        ca_key = serialization.load_pem_private_key(p.ca_key.read_bytes(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise StackError(f"{p.ca_key} is not the EC key of the dev CA; delete {p.tls_dir}")
        ca_cert = x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mcp-gateway dev CA")])
        ca_cert = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=DEV_CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
        _write_private(p.ca_key, ca_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        p.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    hosts = ["localhost", "127.0.0.1", "::1"]
    for extra in (config.listen.host, urlsplit(config.public_url).hostname or ""):
        if extra and extra not in hosts and extra not in ("0.0.0.0", "::"):  # noqa: S104
            hosts.append(extra)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mcp-gateway dev")]))
        .issuer_name(ca_cert.subject).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=DEV_CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san_for(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
    _write_private(key, server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM)
                     + ca_cert.public_bytes(serialization.Encoding.PEM))
    logger.info("created dev TLS certificate %s (CA %s)", cert, p.ca_cert)
    return p.ca_cert


def _local_jwks_issuer(config: GatewayConfig) -> tuple[int, str] | None:
    """(port, url path) of the first issuer whose JWKS the dev stack serves itself: plain HTTP on
    loopback. Issuers elsewhere are real identity providers."""
    for issuer in config.issuers:
        url = urlsplit(issuer.jwks_url)
        if url.scheme == "http" and url.hostname in ("127.0.0.1", "localhost") and url.port:
            return url.port, url.path or "/"
    return None


def signing_key(config: GatewayConfig) -> tokens.SigningKey:
    """The dev signing key (created on first use), with its JWKS written where the JWKS server
    serves it."""
    p = paths(config)
    key = tokens.load_or_create_key(p.signing_key)
    local = _local_jwks_issuer(config)
    if local is not None:
        target = p.jwks_root / local[1].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(key.jwks(), indent=2) + "\n", encoding="utf-8")
    return key


def mint(config: GatewayConfig, *, sub: str, roles: tuple[str, ...] = (),
         scopes: tuple[str, ...] | None = None, tenant: str | None = None, ttl: int = 3600,
         server: str | None = None) -> str:
    """A token the dev stack accepts. Without ``server`` it is valid for every server; without
    ``scopes`` it carries ``tools:call:<server>/*`` for each server it is valid for."""
    names = [server] if server else [s.name for s in config.servers]
    if server is not None:
        config.server(server)  # KeyError names an unknown server
    if scopes is None:
        scopes = tuple(f"tools:call:{n}/*" for n in names)
    audience = [config.resource_url(n) for n in names]
    return tokens.mint_token(signing_key(config), issuer=config.issuers[0].issuer,
                             audience=audience[0] if len(audience) == 1 else audience,
                             sub=sub, roles=roles, scopes=scopes, tenant=tenant, ttl=ttl)


def ensure_secrets(config: GatewayConfig) -> dict[str, str]:
    """The value of every configured secret: from this process's environment when set there
    (an operator's real key), else a random dev value generated once into state_dir/secrets."""
    out: dict[str, str] = {}
    folder = paths(config).secrets_dir
    for name in config.secrets:
        if os.environ.get(name):
            out[name] = os.environ[name]
            continue
        path = folder / name
        try:
            value = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            value = ""
        if not value:
            value = secrets.token_urlsafe(32)
            _write_private(path, value.encode("ascii") + b"\n")
        out[name] = value
    return out


# ------------------------------------------------------------------------------ the processes

@dataclass(frozen=True, slots=True)
class Probe:
    kind: str  # "http" | "grpc" | "envoy"
    host: str
    port: int
    path: str = "/"


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

    @property
    def label(self) -> str:
        return f"{self.name}[{self.instance}]"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


SERVICE_MODULES = {"ext_authz": "ext_authz", "ext_proc": "ext_proc"}
# ext_authz over Envoy's HTTP mode answers its health check here (ext_authz.http_front.HEALTH_PATH).
HTTP_AUTHZ_HEALTH_PATH = "/-/health"


def _server_common_args(config: GatewayConfig, name: str, inst: Instance) -> tuple[str, ...]:
    """Flags every server built on mcp_servers.core takes: its own audit file (the writer locks
    it, so one per instance) and the log level. Tracing reaches servers through the
    OTEL_EXPORTER_OTLP_ENDPOINT environment variable."""
    audit = config.audit
    return ("--audit-file", str(Path(audit.dir) / f"{name}-{inst.port}.jsonl"),
            "--audit-max-bytes", str(audit.max_bytes), "--audit-keep", str(audit.keep),
            "--log-level", config.telemetry.log_level)


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
    local = _local_jwks_issuer(config)
    if local is not None:
        port, url_path = local
        out.append(Component("jwks", 0, "127.0.0.1", port,
                             (py, "-m", "http.server", "--bind", "127.0.0.1",
                              "--directory", str(p.jwks_root), str(port)),
                             Probe("http", "127.0.0.1", port, url_path)))
    for i, inst in enumerate(config.ext_authz.instances):
        out.append(Component("ext_authz", i, inst.host, inst.port,
                             (py, "-m", mods["ext_authz"], *config_args, "--port", str(inst.port)),
                             Probe("http", inst.host, inst.port, HTTP_AUTHZ_HEALTH_PATH)
                             if config.ext_authz.transport == "http" else
                             Probe("grpc", inst.host, inst.port),
                             metrics_url=f"http://{inst.host}:{inst.port + offset}/metrics"))
    if ext_proc if ext_proc is not None else envoy_config.ext_proc_available():
        for i, inst in enumerate(config.ext_proc.instances):
            out.append(Component("ext_proc", i, inst.host, inst.port,
                                 (py, "-m", mods["ext_proc"], *config_args, "--port", str(inst.port)),
                                 Probe("grpc", inst.host, inst.port),
                                 metrics_url=f"http://{inst.host}:{inst.port + offset}/metrics"))
    for server in config.servers:
        for i, inst in enumerate(server.instances):
            out.append(Component(server.name, i, inst.host, inst.port,
                                 (py, "-m", server.module, "--host", inst.host,
                                  "--port", str(inst.port), *_server_common_args(config, server.name, inst),
                                  *server.args),
                                 Probe("http", inst.host, inst.port, "/ready"), env=server.env,
                                 metrics_url=f"http://{inst.host}:{inst.port}/metrics"))
    envoy_argv = (str(envoy_config.find_envoy()), "-c", str(p.envoy_yaml), "--log-level", "warn",
                  "--disable-hot-restart", "--concurrency", str(envoy_config.worker_threads()))
    out.append(Component("envoy", 0, config.listen.host, config.listen.port, envoy_argv,
                         Probe("envoy", config.admin.host, config.admin.port, "/ready"), wave=2,
                         metrics_url=f"http://{config.admin.host}:{config.admin.port}/stats/prometheus"))
    return out


def listening_ports(config: GatewayConfig, components: list[Component]) -> list[tuple[str, str, int]]:
    """(what, host, port) of every socket the stack binds."""
    ports = [(c.label, c.host, c.port) for c in components]
    ports.append(("envoy admin", config.admin.host, config.admin.port))
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


# ------------------------------------------------------------------------------------- probes

def _http_status(host: str, port: int, path: str, *, tls: ssl.SSLContext | None = None,
                 timeout: float = PROBE_TIMEOUT_SECONDS) -> int:
    conn: http.client.HTTPConnection
    if tls is not None:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=tls)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def _grpc_serving(host: str, port: int, timeout: float = PROBE_TIMEOUT_SECONDS) -> bool:
    import grpc  # grpc starts threads: load it only to probe
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # generated stub: untyped methods
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def probe(component: Component, config: GatewayConfig, ca_file: Path | None) -> bool:
    """One health check of one component (bounded by PROBE_TIMEOUT_SECONDS)."""
    pr = component.probe
    try:
        if pr.kind == "grpc":
            return _grpc_serving(pr.host, pr.port)
        if pr.kind == "http":
            return _http_status(pr.host, pr.port, pr.path) == 200
        # Envoy: admin /ready is LIVE only after every cluster finished its first health checks;
        # then /health through the TLS listener proves the listener and certificate work.
        if _http_status(pr.host, pr.port, pr.path) != 200:
            return False
        if config.tls.client_ca_file is not None:
            return True  # the listener wants a client certificate the probe does not have
        ctx = ssl.create_default_context(cafile=str(ca_file)) if ca_file else \
            ssl._create_unverified_context()  # noqa: S323  (user CA unknown here; liveness only)
        host = config.listen.host if config.listen.host not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
        return _http_status(host, config.listen.port, "/health", tls=ctx) == 200
    except (OSError, http.client.HTTPException):
        return False


# ---------------------------------------------------------------------------- PID bookkeeping

def _start_time(pid: int) -> int | None:
    """Kernel start time of a live, non-zombie process (None if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _alive(entry: dict[str, Any]) -> bool:
    started = _start_time(int(entry["pid"]))
    return started is not None and started == entry.get("start_time")


def read_pid_file(config: GatewayConfig) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(paths(config).pid_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StackError(f"cannot read {paths(config).pid_file}: {exc}") from None
    return data


# -------------------------------------------------------------------------------------- stack

_PR_SET_PDEATHSIG = 1


def _die_with_parent_hook() -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    return hook


@dataclass
class Stack:
    """A running (or starting) dev stack."""

    config: GatewayConfig
    ext_proc: bool | None = None
    modules: dict[str, str] | None = None
    startup_timeout: float = STARTUP_TIMEOUT_SECONDS
    components: list[Component] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ca_file: Path | None = None
    secrets: dict[str, str] = field(default_factory=dict)

    def prepare(self) -> None:
        """Certificates, keys, effective config and Envoy config; fails before starting anything."""
        p = paths(self.config)
        running = read_pid_file(self.config)
        if running and any(_alive(e) for e in running.get("components", [])):
            raise StackError(f"a dev stack is already running from {p.state_dir}; "
                             f"run `mcp-gateway down` first")
        self.components = plan(self.config, ext_proc=self.ext_proc, modules=self.modules)
        check_ports(listening_ports(self.config, self.components))
        p.logs.mkdir(parents=True, exist_ok=True)
        self.ca_file = ensure_tls(self.config)
        self.secrets = ensure_secrets(self.config)
        signing_key(self.config)
        with_ext_proc = any(c.name == "ext_proc" for c in self.components)
        p.envoy_yaml.write_text(envoy_config.render(
            self.config, envoy_config.RenderOptions(ext_proc=with_ext_proc)), encoding="utf-8")

    def start(self, *, detach: bool) -> None:
        """Start every component and wait until all are healthy (or raise, leaving none)."""
        self.prepare()
        hook = None if detach else _die_with_parent_hook()
        cwd = base_dir(self.config)
        # A secret reaches only the processes that list it, whatever the parent environment holds.
        env = {k: v for k, v in os.environ.items() if k not in self.config.secrets}
        env["PYTHONUNBUFFERED"] = "1"
        if self.config.telemetry.otlp_endpoint:
            # MCP servers take their collector from the standard OpenTelemetry variable (a server
            # module need not accept a flag for it); ext_authz and ext_proc read the config.
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.config.telemetry.otlp_endpoint
        # Backends first (servers may read from them at start-up); then the Python processes in
        # parallel; Envoy once they answer, so its first round of active health checks finds
        # them up instead of marking them failed.
        waves = [[c for c in self.components if c.wave == w] for w in (0, 1, 2)]
        try:
            for wave in waves:
                for comp in wave:
                    self._spawn(comp, hook, cwd, {**env, **{n: self.secrets[n] for n in comp.env}})
                    self._write_pid_file(supervisor=None if detach else os.getpid())
                self.wait_healthy(wave)
            self._write_pid_file(supervisor=None if detach else os.getpid(), ready=True)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, comp: Component, hook: Callable[[], None] | None, cwd: Path,
               env: dict[str, str]) -> None:
        log = paths(self.config).logs / f"{comp.name}-{comp.instance}.log"
        with open(log, "ab") as out:
            # argv is built from the config and never passes through a shell.
            self.procs[comp.label] = subprocess.Popen(
                comp.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=cwd, env=env, start_new_session=True, preexec_fn=hook)
        logger.debug("started %s pid %d", comp.label, self.procs[comp.label].pid)

    def _write_pid_file(self, *, supervisor: int | None, ready: bool = False) -> None:
        entries = []
        for comp in self.components:
            proc = self.procs.get(comp.label)
            if proc is None:
                continue
            entries.append({"component": comp.name, "instance": comp.instance,
                            "address": comp.address, "pid": proc.pid,
                            "start_time": _start_time(proc.pid),
                            "log": str(paths(self.config).logs / f"{comp.name}-{comp.instance}.log"),
                            "probe": asdict(comp.probe)})
        # `ready`: every component answered its health check once (start-up is over).
        data: dict[str, Any] = {"config": self.config.source, "ready": ready, "components": entries}
        if supervisor is not None:
            data["supervisor"] = {"pid": supervisor, "start_time": _start_time(supervisor)}
        path = paths(self.config).pid_file
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        tmp.replace(path)

    def wait_healthy(self, components: list[Component] | None = None) -> None:
        deadline = time.monotonic() + self.startup_timeout
        for comp in self.components if components is None else components:
            proc = self.procs[comp.label]
            while not probe(comp, self.config, self.ca_file):
                if proc.poll() is not None:
                    raise StackError(f"{comp.label} exited with code {proc.returncode} during "
                                     f"start-up:\n{self.log_tail(comp)}")
                if time.monotonic() > deadline:
                    raise StackError(f"{comp.label} on {comp.address} was not healthy within "
                                     f"{self.startup_timeout:g} s:\n{self.log_tail(comp)}")
                time.sleep(POLL_INTERVAL_SECONDS)

    def log_tail(self, comp: Component, lines: int = 20) -> str:
        log = paths(self.config).logs / f"{comp.name}-{comp.instance}.log"
        try:
            text = log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no log at {log})"
        return "\n".join(f"  | {line}" for line in text) + f"\n  (full log: {log})"

    def stop(self) -> None:
        """Stop every started child, newest first; SIGKILL what ignores SIGTERM (idempotent)."""
        for comp in reversed(self.components):
            proc = self.procs.get(comp.label)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT_SECONDS)
        with contextlib.suppress(FileNotFoundError):
            paths(self.config).pid_file.unlink()

    def supervise(self, stop: threading.Event) -> None:
        """Foreground: report children that exit; return when ``stop`` is set or none is left."""
        reported: set[str] = set()
        while not stop.wait(0.5):
            for label, proc in self.procs.items():
                if label not in reported and proc.poll() is not None:
                    reported.add(label)
                    comp = next(c for c in self.components if c.label == label)
                    print(f"!! {label} exited with code {proc.returncode}\n{self.log_tail(comp, 5)}",
                          file=sys.stderr, flush=True)
            if len(reported) == len(self.procs):
                return


@contextlib.contextmanager
def running(config: GatewayConfig, **kwargs: Any) -> Iterator[Stack]:
    """A started stack for the duration of a ``with`` block (children die with this process)."""
    stack = Stack(config, **kwargs)
    stack.start(detach=False)
    try:
        yield stack
    finally:
        stack.stop()


# ------------------------------------------------------------------------------ status / down

def status(config: GatewayConfig) -> list[dict[str, Any]]:
    """One row per recorded process: component, instance, address, pid, alive, healthy."""
    data = read_pid_file(config)
    if data is None:
        return []
    ca = paths(config).ca_cert
    rows = []
    for entry in data.get("components", []):
        alive = _alive(entry)
        pr = Probe(**entry["probe"])
        host, _, port = entry["address"].rpartition(":")
        comp = Component(entry["component"], entry["instance"], host, int(port), (), pr)
        rows.append({"component": entry["component"], "instance": entry["instance"],
                     "address": entry["address"], "pid": entry["pid"], "alive": alive,
                     "healthy": alive and probe(comp, config, ca if ca.exists() else None),
                     "log": entry.get("log")})
    return rows


def down(config: GatewayConfig, timeout: float = STOP_TIMEOUT_SECONDS) -> list[int]:
    """Stop exactly the processes in the PID file; returns the PIDs that were signalled."""
    data = read_pid_file(config)
    if data is None:
        return []
    # (entry, signal the whole process group): children lead their own group, which also holds
    # anything they spawned; the foreground supervisor (if any) stops its children itself.
    entries: list[tuple[dict[str, Any], bool]] = [
        (e, True) for e in reversed(data.get("components", []))]
    supervisor = data.get("supervisor")
    if isinstance(supervisor, dict):
        entries.insert(0, (supervisor, False))
    live = [e for e in entries if _alive(e[0])]
    for entry, group in live:
        with contextlib.suppress(ProcessLookupError):
            (os.killpg if group else os.kill)(entry["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(e) for e, _ in live) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_SECONDS)
    for entry, _ in live:
        if _alive(entry):
            logger.warning("pid %d ignored SIGTERM; sending SIGKILL", entry["pid"])
            with contextlib.suppress(ProcessLookupError):
                os.kill(entry["pid"], signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(_alive(e) for e, _ in live) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_SECONDS)
    still = [e["pid"] for e, _ in live if _alive(e)]
    if still:
        raise StackError(f"processes {still} did not stop")
    with contextlib.suppress(FileNotFoundError):
        paths(config).pid_file.unlink()
    return [e["pid"] for e, _ in live]


# ------------------------------------------------------------------------------------- banner

def serves_metrics(url: str) -> bool:
    """Whether a /metrics URL answers 200 (services grow their endpoints issue by issue)."""
    parts = urlsplit(url)
    try:
        return _http_status(parts.hostname or "127.0.0.1", parts.port or 80, parts.path) == 200
    except (OSError, http.client.HTTPException):
        return False


def observability_lines(config: GatewayConfig, components: list[Component], *,
                        live: Callable[[str], bool] = lambda url: True) -> list[str]:
    """Where traces, metrics, audit files and auxiliary backends of the stack are; ``live``
    selects the metrics URLs worth printing (the running stack passes :func:`serves_metrics`)."""
    tel = config.telemetry
    lines = ["Traces: " + (f"OTLP/gRPC to {tel.otlp_endpoint} (Envoy samples "
                           f"{tel.trace_sample_percent:g}%)" if tel.otlp_endpoint else
                           "off (set telemetry.otlp_endpoint to an OTLP/gRPC collector, e.g. "
                           "http://127.0.0.1:4317 from `docker compose up jaeger`)"),
             "Metrics (Prometheus text):"]
    scraped = [c for c in components if c.metrics_url and live(c.metrics_url)]
    width = max((len(c.label) for c in components), default=0)
    lines += [f"  {c.label:<{width}}  {c.metrics_url}" for c in scraped]
    lines.append(f"Audit trail (JSON lines, one file per process): {config.audit.dir}/")
    if config.backends:
        lines.append("Backends (not behind the gateway):")
        lines += [f"  {b.name:<{width}}  http://{b.instance.host}:{b.instance.port}"
                  for b in config.backends]
    if config.secrets:
        lines.append(f"Dev secrets ({', '.join(config.secrets)}): {paths(config).secrets_dir}/ "
                     f"(or exported in the environment of `up`)")
    return lines


def banner(config: GatewayConfig, token: str, ca_file: Path | None, *, detach: bool = False,
           components: list[Component] | None = None) -> str:
    """What a user needs to talk to the running stack: endpoints, token, CA and snippets."""
    host = config.public_url.rstrip("/")
    first = config.servers[0].name
    ca = str(ca_file) if ca_file else "<your CA bundle>"
    lines = ["", "MCP gateway dev stack is up.", "", "Endpoints (Streamable HTTP, TLS):"]
    lines += [f"  {config.resource_url(s.name)}" for s in config.servers]
    lines += [
        f"  {host}/.well-known/oauth-protected-resource/mcp/<server>  (RFC 9728 metadata)",
        f"  {host}/health",
        f"Envoy admin (loopback only): http://{config.admin.host}:{config.admin.port}",
        f"CA certificate: {ca}",
        f"Logs: {paths(config).logs}",
        *observability_lines(config, components or [], live=serves_metrics),
        "",
        f"Token ({DEV_TOKEN_SUB}, roles {','.join(DEV_TOKEN_ROLES)}, every server, "
        f"{DEV_TOKEN_TTL // 3600} h):",
        f"  export MCP_TOKEN={token}",
        "  (another one: mcp-gateway token --sub alice --role analyst --tenant acme --ttl 3600)",
        "",
        "curl:",
        f"  curl --cacert {ca} {config.resource_url(first)} \\",
        "    -H \"Authorization: Bearer $MCP_TOKEN\" -H 'Content-Type: application/json' \\",
        "    -H 'Accept: application/json, text/event-stream' \\",
        "    -d '{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"initialize\",\"params\":{\"protocolVersion\":"
        "\"2025-11-25\",\"capabilities\":{},\"clientInfo\":{\"name\":\"curl\",\"version\":\"1\"}}}'",
        "",
        "Python (official mcp SDK: `pip install mcp==2.3.0`; `make test` installs it in .venv):",
        "  import asyncio, os, ssl, httpx2",
        "  from mcp import ClientSession",
        "  from mcp.client.streamable_http import streamable_http_client",
        "  async def main():",
        f"      tls = ssl.create_default_context(cafile={ca!r})",
        "      headers = {'Authorization': 'Bearer ' + os.environ['MCP_TOKEN']}",
        "      async with httpx2.AsyncClient(verify=tls, headers=headers) as http, \\",
        f"              streamable_http_client({config.resource_url(first)!r}, http_client=http) "
        "as (r, w), \\",
        "              ClientSession(r, w) as session:",
        "          await session.initialize()",
        "          print(await session.list_tools())",
        "  asyncio.run(main())",
        "",
        "MCP Inspector (CLI):",
        f"  NODE_EXTRA_CA_CERTS={ca} npx @modelcontextprotocol/inspector --cli \\",
        f"    {config.resource_url(first)} --transport http --method tools/list \\",
        "    --header \"Authorization: Bearer $MCP_TOKEN\"",
        "",
        "Claude Code (.mcp.json; VS Code's .vscode/mcp.json uses \"servers\" instead of "
        "\"mcpServers\"); start the client with NODE_EXTRA_CA_CERTS=" + ca + ":",
    ]
    mcp_json = {"mcpServers": {s.name: {"type": "http", "url": config.resource_url(s.name),
                                        "headers": {"Authorization": "Bearer ${MCP_TOKEN}"}}
                               for s in config.servers}}
    lines += ["  " + line for line in json.dumps(mcp_json, indent=2).splitlines()]
    lines += ["", "`mcp-gateway down` stops everything." if detach else "Ctrl-C stops everything."]
    return "\n".join(lines)


def dev_token(config: GatewayConfig) -> str:
    return mint(config, sub=DEV_TOKEN_SUB, roles=DEV_TOKEN_ROLES, tenant=DEV_TOKEN_TENANT,
                ttl=DEV_TOKEN_TTL)
