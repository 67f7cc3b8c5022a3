"""mTLS on the inner hops (docs/inner-tls.md): Envoy -> ext_authz, ext_proc, the MCP servers, the
bridge and the aggregator, and the aggregator -> Envoy's inner listener.

Each of our services learns its files from three environment variables (the same in the dev
stack, docker compose and Kubernetes): its own certificate and key, and the inner CA that signed
the gateway's client certificate. Set, the service serves TLS only and refuses a client without a
certificate from that CA; unset, it serves plain HTTP/gRPC as before. Setting only some of them is
an error (never a quiet fall back to plain text).

Certificates rotate without a restart: an aiohttp service reloads the files into its live
``SSLContext`` when they change (new connections get the new certificate, open ones keep
theirs); a grpc.aio service uses dynamic credentials whose fetcher hands gRPC the new files on
the next handshake.

Who may call whom is checked on top of the CA (``gateway.inner_peers``): each service names the
identities it accepts (:data:`ENVOY_ONLY`, :data:`SERVER_CALLERS`) and refuses any other
certificate of the inner CA; the domain those identities live in is read from the service's own
certificate (:class:`PeerPolicy`)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CERT_ENV = "MCP_INNER_TLS_CERT_FILE"
KEY_ENV = "MCP_INNER_TLS_KEY_FILE"
CA_ENV = "MCP_INNER_TLS_CA_FILE"
ENV_NAMES = (CERT_ENV, KEY_ENV, CA_ENV)
# How often an aiohttp service looks at its files (a stat of three files).
RELOAD_CHECK_SECONDS = 1.0

# The identities (the first DNS SAN is "<identity>.<inner_tls.domain>") of the inner components.
ENVOY = "envoy"
EXT_AUTHZ = "ext-authz"
EXT_PROC = "ext-proc"
AGGREGATOR = "aggregator"
# docker compose's Prometheus (gatewayctl.compose_init.SCRAPER): a client-only certificate that may
# GET /metrics on a service that serves it on its TLS port, and nothing else.
METRICS_SCRAPER = "prometheus"
METRICS_PATH = "/metrics"
# The web console (gateway.console): its overview reads the same /metrics, with the same rights.
CONSOLE = "console"
METRICS_READERS = (METRICS_SCRAPER, CONSOLE)

# Who may call whom (docs/inner-tls.md): ext_authz, ext_proc and the aggregator are called by
# Envoy only; the MCP servers and bridges also by ext_authz, whose catalog fetch lists their tools.
ENVOY_ONLY = frozenset({ENVOY})
SERVER_CALLERS = frozenset({ENVOY, EXT_AUTHZ})
# The JSON-RPC error's data.reason (and the log's) when a certificate of the inner CA names a
# component that may not call this one.
PEER_NOT_ALLOWED = "peer_not_allowed"


def server_identity(name: str) -> str:
    """The identity of an MCP server of kind module or command (its bridge) named ``name``."""
    return "server-" + name.replace("_", "-").lower()


class InnerTlsError(ValueError):
    """The inner TLS files are incomplete or unreadable; the message names the variable or file."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """One component's certificate chain and key (PEM), and the CA its peers are checked with."""

    cert_file: str
    key_file: str
    ca_file: str

    def env(self) -> dict[str, str]:
        return {CERT_ENV: self.cert_file, KEY_ENV: self.key_file, CA_ENV: self.ca_file}

    def digest(self) -> str:
        """A hash of the three files' bytes ("" while one cannot be read)."""
        h = hashlib.sha256()
        try:
            for name in (self.cert_file, self.key_file, self.ca_file):
                h.update(Path(name).read_bytes())
                h.update(b"\0")
        except OSError:
            return ""
        return h.hexdigest()


def first_dns_name(cert_pem: bytes) -> str | None:
    """The first DNS subject alternative name of the first certificate in ``cert_pem``."""
    from cryptography import x509  # only services with inner TLS on read certificates

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    dns = names.get_values_for_type(x509.DNSName)
    return dns[0].lower() if dns else None


def own_domain(cert_file: str) -> str:
    """The inner domain of this service: its certificate's first DNS SAN after the identity
    label (``server-files.mcp-gateway.internal`` -> ``mcp-gateway.internal``)."""
    try:
        name = first_dns_name(Path(cert_file).read_bytes())
    except OSError as exc:
        raise InnerTlsError(f"cannot read {cert_file} ({CERT_ENV}): {exc}") from exc
    label, _, domain = (name or "").partition(".")
    if not label or not domain:
        raise InnerTlsError(f"the certificate {cert_file} ({CERT_ENV}) names no DNS name "
                            f"<identity>.<domain> first (found {name!r})")
    return domain


@dataclass(frozen=True, slots=True)
class PeerVerdict:
    """What one client certificate may do here: call the service, or GET /metrics only."""

    peer: str  # the certificate's first DNS name ("" when it has none), for the logs
    allowed: bool
    metrics_only: bool = False

    def admits(self, method: str, path: str) -> bool:
        return self.allowed or (self.metrics_only and method in ("GET", "HEAD")
                                and path == METRICS_PATH)


class PeerPolicy:
    """The identities that may call a service, as the DNS names ``<identity>.<domain>`` their
    certificates carry first; the domain is that of the service's own certificate, re-read by
    :meth:`refresh` when the certificate rotates. Anything else is refused: no DNS name, another
    domain, another identity."""

    def __init__(self, cert_file: str, callers: frozenset[str], *, scraper: bool = False) -> None:
        if not callers:
            raise InnerTlsError("a service must accept at least one caller identity")
        self.callers = callers
        self.scraper = scraper
        self.domain = ""
        self._verdicts: dict[str, PeerVerdict] = {}
        self.refresh(cert_file)

    def refresh(self, cert_file: str) -> None:
        """Take the domain of ``cert_file``; raises InnerTlsError (keeping the current one)."""
        domain = own_domain(cert_file)
        verdicts = {f"{identity}.{domain}": PeerVerdict(f"{identity}.{domain}", True)
                    for identity in self.callers}
        if self.scraper:
            for reader in METRICS_READERS:
                name = f"{reader}.{domain}"
                verdicts.setdefault(name, PeerVerdict(name, False, metrics_only=True))
        self.domain, self._verdicts = domain, verdicts

    def verdict(self, dns_name: str | None) -> PeerVerdict:
        """The verdict for a client whose certificate's first DNS name is ``dns_name``."""
        if not dns_name:
            return PeerVerdict("", False)
        name = dns_name.lower()
        return self._verdicts.get(name) or PeerVerdict(name[:255], False)

    def verdict_for_peercert(self, peercert: Any) -> PeerVerdict:
        """The verdict for ``ssl``'s decoded peer certificate (``getpeercert()``)."""
        names = peercert.get("subjectAltName", ()) if isinstance(peercert, dict) else ()
        first = next((value for kind, value in names if kind == "DNS"), None)
        return self.verdict(first if isinstance(first, str) else None)


def files_from_env(environ: Mapping[str, str] | None = None) -> TlsFiles | None:
    """The service's files from its environment; None when no variable is set (plain text)."""
    env = os.environ if environ is None else environ
    values = {name: env.get(name, "") for name in ENV_NAMES}
    if not any(values.values()):
        return None
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise InnerTlsError(f"inner TLS needs {', '.join(ENV_NAMES)} together; {', '.join(missing)} "
                            f"is not set")
    return TlsFiles(values[CERT_ENV], values[KEY_ENV], values[CA_ENV])


def _load(ctx: ssl.SSLContext, files: TlsFiles) -> None:
    try:
        ctx.load_cert_chain(files.cert_file, files.key_file)
        ctx.load_verify_locations(cafile=files.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise InnerTlsError(f"cannot load inner TLS files {files.cert_file}, {files.key_file}, "
                            f"{files.ca_file}: {exc}") from exc


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A TLS 1.2+ server context that requires a client certificate signed by ``files.ca_file``
    (OpenSSL also requires the clientAuth usage of it: a server's certificate is no client's)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load(ctx, files)
    return ctx


def client_context(files: TlsFiles | None, *, ca_file: str | None = None,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """A client context trusting the inner CA and presenting ``files``' certificate when given."""
    ca = files.ca_file if files is not None else ca_file
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if files is not None:
        try:
            ctx.load_cert_chain(files.cert_file, files.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise InnerTlsError(f"cannot load {files.cert_file} / {files.key_file}: {exc}") from exc
    return ctx


@contextlib.contextmanager
def _snapshot(files: TlsFiles) -> Iterator[TlsFiles]:
    """One consistent copy of the three files (private, temporary), checked to load as a server
    pair: a rotation caught between its two renames is refused here, not half-installed."""
    with tempfile.TemporaryDirectory(prefix="inner-tls-") as folder:
        snap = TlsFiles(*(str(Path(folder) / n) for n in ("cert.pem", "key.pem", "ca.pem")))
        for source, target in zip((files.cert_file, files.key_file, files.ca_file),
                                  (snap.cert_file, snap.key_file, snap.ca_file), strict=True):
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(Path(source).read_bytes())
        server_context(snap)
        yield snap


class ReloadingTls:
    """An ``SSLContext`` (a server's, or with ``server=False`` a client's) whose certificate,
    key and CA are reloaded when the files change.

    ``check()`` reloads into the same context object (so the listening socket needs no change);
    a half-written pair (the certificate changed, the key not yet) fails to load and the old one
    stays until the next check. ``watch()`` is the cleanup_ctx-style loop that calls it."""

    def __init__(self, files: TlsFiles, *, server: bool = True,
                 peers: PeerPolicy | None = None) -> None:
        self.files = files
        self.context = server_context(files) if server else client_context(files)
        # A server's callers (gateway.inner_peers checks them); its domain follows the certificate.
        self.peers = peers
        self._digest = files.digest()
        self.reloads = 0
        self._task: asyncio.Task[None] | None = None

    def check(self) -> bool:
        """Reload when the files changed; True when a new certificate was taken."""
        digest = self.files.digest()
        if not digest or digest == self._digest:
            return False
        try:
            # OpenSSL installs the certificate before it finds that the key does not match:
            # a failed load would break the live context. So: one snapshot of the bytes, tried
            # on a scratch context first, then loaded into the live one.
            with _snapshot(self.files) as snap:
                if self.peers is not None:
                    self.peers.refresh(snap.cert_file)
                _load(self.context, snap)
        except (InnerTlsError, OSError) as exc:
            logger.warning("inner TLS reload failed, keeping the current certificate: %s", exc)
            return False
        self._digest = digest
        self.reloads += 1
        logger.info("inner TLS certificate reloaded from %s", self.files.cert_file)
        return True

    def start(self, every: float = RELOAD_CHECK_SECONDS) -> None:
        """Check the files every ``every`` seconds on the running loop until :meth:`stop`."""
        async def loop() -> None:
            while True:
                await asyncio.sleep(every)  # a periodic file check, not a readiness wait
                self.check()

        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(loop())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @contextlib.asynccontextmanager
    async def watch(self, every: float = RELOAD_CHECK_SECONDS) -> AsyncIterator[None]:
        self.start(every)
        try:
            yield
        finally:
            await self.stop()


def server_tls_from_env(environ: Mapping[str, str] | None = None, *, callers: frozenset[str],
                        scraper: bool = False) -> ReloadingTls | None:
    """The service's TLS when its variables are set, accepting the ``callers`` identities (and
    with ``scraper`` Prometheus's and the console's certificates on GET /metrics); None: plain
    text."""
    files = files_from_env(environ)
    if files is None:
        return None
    return ReloadingTls(files, peers=PeerPolicy(files.cert_file, callers, scraper=scraper))


@contextlib.asynccontextmanager
async def watching(tls: ReloadingTls | None) -> AsyncIterator[None]:
    """``tls.watch()``, or nothing when the service serves plain text."""
    if tls is None:
        yield
        return
    async with tls.watch():
        yield


def grpc_server_credentials(files: TlsFiles, peers: PeerPolicy | None = None) -> Any:
    """grpc.aio server credentials requiring a client certificate from the inner CA, re-read on
    the first handshake after the files change (gRPC calls the fetcher on each new connection);
    ``peers`` takes the domain of each new certificate."""
    import grpc

    def configuration() -> Any:
        try:
            with _snapshot(files) as snap:
                if peers is not None:
                    peers.refresh(snap.cert_file)
                cert, key, ca = (Path(n).read_bytes() for n in (snap.cert_file, snap.key_file,
                                                                  snap.ca_file))
        except OSError as exc:
            raise InnerTlsError(f"cannot read inner TLS files: {exc}") from exc
        # gRPC takes the bytes as given: they were checked to be a matching pair above.
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    state = {"digest": files.digest()}
    lock = threading.Lock()

    def fetch() -> Any:
        # Runs on gRPC's threads: the lock keeps two handshakes from both reloading.
        with lock:
            digest = files.digest()
            if not digest or digest == state["digest"]:
                return None  # no change: gRPC keeps the current configuration
            try:
                config = configuration()
            except InnerTlsError as exc:
                logger.warning("inner TLS reload failed, keeping the current certificate: %s", exc)
                return None
            state["digest"] = digest
            logger.info("inner TLS certificate reloaded from %s", files.cert_file)
            return config

    return grpc.dynamic_ssl_server_credentials(configuration(), fetch,
                                               require_client_authentication=True)
