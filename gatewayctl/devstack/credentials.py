"""What the dev stack makes for itself: a dev CA and server certificate, the signing key with
the JWKS its JWKS server serves, the tokens it accepts, and a value for every configured secret.
Certificates and keys live under ``state_dir`` and are made once, then reused."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import secrets
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import inner_tls
from gateway.config import GatewayConfig
from gateway.console.settings import INNER_TLS_IDENTITY as CONSOLE_IDENTITY
from gateway.credentials.config import StaticCredentials, TokenExchangeCredentials, credential_secrets
from gateway.telemetry.audit_chain import generate_signing_key
from gatewayctl import envoy_config, tokens
from gatewayctl.devstack.state import StackError, paths

logger = logging.getLogger(__name__)

DEV_CERT_DAYS = 825
# The token `up` prints: every role and scope the example policy knows, for trying things out.
DEV_TOKEN_SUB = "dev-user"  # noqa: S105  (a user name, not a secret)
DEV_TOKEN_ROLES = ("admin",)
DEV_TOKEN_TTL = 8 * 3600
DEV_TOKEN_TENANT = "dev"  # noqa: S105  (a tenant name, not a secret)


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


def _dev_ca(config: GatewayConfig) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The dev CA's key and certificate, made on first use."""
    p = paths(config)
    now = datetime.datetime.now(datetime.UTC)
    if p.ca_cert.exists() and p.ca_key.exists():
        ca_key = serialization.load_pem_private_key(p.ca_key.read_bytes(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise StackError(f"{p.ca_key} is not the EC key of the dev CA; delete {p.tls_dir}")
        return ca_key, x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
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
    return ca_key, ca_cert


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str,
           names: list[str], usages: list[x509.ObjectIdentifier]
           ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate for ``names`` (DNS names or IP addresses) with the given key usages."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=DEV_CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san_for(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
    return key, cert


def inner_identities(config: GatewayConfig) -> dict[str, tuple[list[str], bool]]:
    """Each inner component's identity -> (the hosts it listens on, whether it is also a client).

    Envoy is the client of every inner hop and the server of the inner listener; the aggregator
    serves Envoy and is the inner listener's client; ext_authz fetches the servers' tool lists
    itself (the catalog); the console reads the services' metrics; the others only serve."""
    out: dict[str, tuple[list[str], bool]] = {}
    inner = config.aggregate.inner_listener
    out[inner_tls.ENVOY] = ([inner.host] if inner is not None else [], True)
    out[inner_tls.EXT_AUTHZ] = ([i.host for i in config.ext_authz.instances], True)
    out[inner_tls.EXT_PROC] = ([i.host for i in config.ext_proc.instances], False)
    if config.aggregate.enabled:
        out[inner_tls.AGGREGATOR] = ([i.host for i in config.aggregate.instances], True)
    if config.console.enabled:
        # A client too: it reads the services' GET /metrics (the only thing they admit it to).
        out[CONSOLE_IDENTITY] = ([i.host for i in config.console.instances], True)
    for server in config.servers:
        if server.kind != "url":  # a url server has its own TLS settings (servers.<name>.tls)
            out[inner_tls.server_identity(server.name)] = ([i.host for i in server.instances], False)
    return out


def issue_inner_tls(config: GatewayConfig, *, only_missing: bool = True) -> list[str]:
    """Issue (``only_missing=False``: reissue, i.e. rotate) the inner certificates from the dev
    CA: ``<identity>.pem`` / ``.key`` per component and the CA file. Each pair is replaced by
    renames (key first), so a reader sees the old or the new file, never a partial one. Returns
    the identities issued. Files outside state_dir are the operator's: never made here."""
    it = config.inner_tls
    state = paths(config).state_dir
    wanted = inner_identities(config)
    todo = []
    for identity in wanted:
        files = it.files(identity)
        have = Path(files.cert_file).exists() and Path(files.key_file).exists()
        if have and only_missing:
            continue
        for name in (files.cert_file, files.key_file):
            if not _inside(Path(name), state):
                if have:
                    break  # the operator's files: rotating them is the operator's job
                raise StackError(f"inner TLS file {name} does not exist (inner_tls)")
        else:
            todo.append(identity)
    if not todo and Path(it.ca_file).exists():
        return []
    ca_key, ca_cert = _dev_ca(config)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    if not Path(it.ca_file).exists() or Path(it.ca_file).read_bytes() != ca_pem:
        if not _inside(Path(it.ca_file), state):
            raise StackError(f"inner TLS file {it.ca_file} does not exist (inner_tls.ca_file)")
        _write_private(Path(it.ca_file), ca_pem)
    for identity in todo:
        hosts, client = wanted[identity]
        names = [it.san(identity), "localhost", "127.0.0.1", "::1"]
        names += [h for h in hosts if h and h not in names and h not in ("0.0.0.0", "::")]  # noqa: S104
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, *([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])]
        key, cert = _issue(ca_key, ca_cert, it.san(identity), names, usages)
        files = it.files(identity)
        _write_private(Path(files.key_file), key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        _write_private(Path(files.cert_file), cert.public_bytes(serialization.Encoding.PEM))
    if todo:
        logger.info("issued inner TLS certificates for %s in %s", ", ".join(todo), it.dir)
    return todo


def ensure_inner_tls(config: GatewayConfig) -> None:
    """Under inner_tls: the missing inner certificates issued and Envoy's SDS files written."""
    if not config.inner_tls.enabled:
        return
    issue_inner_tls(config)
    envoy_config.write_sds_documents(config)


def inner_client_context(config: GatewayConfig) -> ssl.SSLContext:
    """A client context with the gateway's (Envoy's) inner certificate, for the stack's own
    probes and scrapes of components that require it (the host name is not checked: liveness)."""
    return inner_tls.client_context(config.inner_tls.files(inner_tls.ENVOY), check_hostname=False)


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
    ca_key, ca_cert = _dev_ca(config)
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


def local_jwks_issuer(config: GatewayConfig) -> tuple[int, str] | None:
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
    local = local_jwks_issuer(config)
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
    if server is None and config.aggregate.enabled:
        # Valid for every server: also for /mcp and each virtual server (docs/aggregate.md).
        audience += [config.aggregate_url(), *(config.aggregate_url(v.name)
                                               for v in config.virtual_servers)]
    if server is None and config.console.enabled:
        # The web console admits the roles policies/console.rego names (docs/console.md).
        audience.append(config.console_url())
    return tokens.mint_token(signing_key(config), issuer=config.issuers[0].issuer,
                             audience=audience[0] if len(audience) == 1 else audience,
                             sub=sub, roles=roles, scopes=scopes, tenant=tenant, ttl=ttl)


def ensure_audit_key(config: GatewayConfig) -> None:
    """The audit checkpoints' Ed25519 signing key (audit.signing_key), made on first use when it
    lies under state_dir; elsewhere it is the operator's key and must exist."""
    if not config.audit.signing_key:
        return
    key = Path(config.audit.signing_key)
    if key.exists():
        return
    if not _inside(key, paths(config).state_dir):
        raise StackError(f"audit.signing_key {key} does not exist")
    generate_signing_key(key)


def upstream_secrets(config: GatewayConfig) -> frozenset[str]:
    """The secrets whose value goes to an upstream's systems (a static credential, a token
    exchange's client secret): only the operator can know them, so they are never generated."""
    return frozenset(name for server in config.servers
                     if isinstance(server.credentials, StaticCredentials | TokenExchangeCredentials)
                     for name in credential_secrets(server.credentials))


def ensure_secrets(config: GatewayConfig, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """The value of every configured secret (or of ``names`` only): from this process's
    environment when set there (an operator's real key), else state_dir/secrets/<name>, else a
    random dev value generated once there; an upstream credential (``upstream_secrets``) is
    never generated: left out, its server answers 503 upstream_credential_unavailable."""
    out: dict[str, str] = {}
    folder = paths(config).secrets_dir
    upstream = upstream_secrets(config)
    for name in config.secrets if names is None else names:
        if os.environ.get(name):
            out[name] = os.environ[name]
            continue
        path = folder / name
        try:
            value = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            value = ""
        if not value:
            if name in upstream:
                continue
            value = secrets.token_urlsafe(32)
            _write_private(path, value.encode("ascii") + b"\n")
        out[name] = value
    return out


def dev_token(config: GatewayConfig) -> str:
    return mint(config, sub=DEV_TOKEN_SUB, roles=DEV_TOKEN_ROLES, tenant=DEV_TOKEN_TENANT,
                ttl=DEV_TOKEN_TTL)
