"""mTLS on the inner hops, service side: the inner_tls: config section, the three environment
variables, an aiohttp site and a grpc.aio server that require the gateway's client certificate,
and certificates reloaded without a restart."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
import yaml
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway import inner_tls
from gateway.config import DEFAULT_CONFIG_PATH, ConfigError, GatewayConfig, load_config, parse_config
from gateway.inner_tls import InnerTlsError, ReloadingTls, TlsFiles
from gateway.upstream import targets

DEADLINE_SECONDS = 10.0


def _config(section: Any) -> GatewayConfig:
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["inner_tls"] = section
    return parse_config(raw, base_dir=Path("/srv/gw"))


def test_inner_tls_is_off_in_the_dev_config_with_paths_under_state_dir() -> None:
    """The dev config ships inner_tls off; the files default to <state_dir>/tls/inner."""
    cfg = load_config()
    it = cfg.inner_tls
    assert it.enabled is False
    assert it.dir == str(Path(cfg.state_dir) / "tls" / "inner")
    assert it.ca_file == str(Path(it.dir) / "ca.pem")
    assert it.files("envoy") == TlsFiles(str(Path(it.dir) / "envoy.pem"),
                                         str(Path(it.dir) / "envoy.key"), it.ca_file)
    assert it.files(inner_tls.server_identity("my_files")).cert_file.endswith("server-my-files.pem")
    assert it.san("ext-authz") == "ext-authz.mcp-gateway.internal"


def test_inner_tls_paths_resolve_against_the_config_folder() -> None:
    """Relative paths resolve like every other path; Envoy's pair and the CA can live elsewhere."""
    it = _config({"enabled": True, "dir": "certs", "ca_file": "/pki/ca.pem",
                  "cert_file": "envoy/tls.crt", "key_file": "envoy/tls.key",
                  "domain": "gw.example.internal", "sds_dir": "sds"}).inner_tls
    assert it.enabled and it.dir == "/srv/gw/certs" and it.ca_file == "/pki/ca.pem"
    assert it.files("envoy") == TlsFiles("/srv/gw/envoy/tls.crt", "/srv/gw/envoy/tls.key", "/pki/ca.pem")
    assert it.files("ext-proc") == TlsFiles("/srv/gw/certs/ext-proc.pem", "/srv/gw/certs/ext-proc.key",
                                            "/pki/ca.pem")
    assert it.sds_dir == "/srv/gw/sds" and it.san("aggregator") == "aggregator.gw.example.internal"


@pytest.mark.parametrize(("section", "key"), [
    ({"enabled": "yes"}, "inner_tls.enabled"),
    ({"ca_file": ""}, "inner_tls.ca_file"),
    ({"dir": 3}, "inner_tls.dir"),
    ({"domain": "Not A Name"}, "inner_tls.domain"),
    ({"verify": False}, "inner_tls: unknown key"),
    ("on", "inner_tls must be a mapping"),
])
def test_inner_tls_mistakes_name_their_key(section: Any, key: str) -> None:
    """A wrong type, an empty path, a bad domain or an unknown key is refused naming its key."""
    with pytest.raises(ConfigError, match=key):
        _config(section)


def test_environment_variables_all_or_none() -> None:
    """No variable: plain text; all three: the files; only some: an error naming what is missing."""
    assert inner_tls.files_from_env({}) is None
    files = inner_tls.files_from_env({inner_tls.CERT_ENV: "c", inner_tls.KEY_ENV: "k",
                                      inner_tls.CA_ENV: "a"})
    assert files == TlsFiles("c", "k", "a") and files.env()[inner_tls.CA_ENV] == "a"
    with pytest.raises(InnerTlsError, match=inner_tls.KEY_ENV):
        inner_tls.files_from_env({inner_tls.CERT_ENV: "c", inner_tls.CA_ENV: "a"})


# ------------------------------------------------------------------------ real TLS servers


@dataclass
class Pki:
    folder: Path
    ca: trustme.CA
    server: TlsFiles  # what the service serves with (files are replaced in rotation tests)
    client: TlsFiles  # the gateway's client certificate
    stranger: TlsFiles  # a client certificate from another CA

    def write(self, files: TlsFiles, leaf: trustme.LeafCert) -> None:
        leaf.private_key_pem.write_to_path(files.key_file)
        leaf.cert_chain_pems[0].write_to_path(files.cert_file)


def _pki(folder: Path) -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(folder / "ca.pem")
    other.cert_pem.write_to_path(folder / "other-ca.pem")

    def files(name: str, issuer: trustme.CA, ca_file: str, *names: str) -> TlsFiles:
        out = TlsFiles(str(folder / f"{name}.pem"), str(folder / f"{name}.key"), ca_file)
        leaf = issuer.issue_cert(*names)
        leaf.private_key_pem.write_to_path(out.key_file)
        leaf.cert_chain_pems[0].write_to_path(out.cert_file)
        return out

    ca_file = str(folder / "ca.pem")
    return Pki(folder, ca, files("server", ca, ca_file, "server-x.mcp-gateway.internal", "127.0.0.1"),
               files("envoy", ca, ca_file, "envoy.mcp-gateway.internal"),
               files("stranger", other, str(folder / "other-ca.pem"), "envoy.mcp-gateway.internal"))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return _pki(tmp_path)


@pytest.fixture
async def tls_site(pki: Pki) -> AsyncIterator[tuple[int, ReloadingTls]]:
    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    tls = ReloadingTls(pki.server)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.context)
    await site.start()
    try:
        yield runner.addresses[0][1], tls
    finally:
        await runner.cleanup()


def _handshake(port: int, client: ssl.SSLContext) -> bytes:
    """The server certificate (DER) after a full handshake and one HTTP exchange."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_SECONDS) as raw, \
            client.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
        assert b"hello" in reply
        der = conn.getpeercert(binary_form=True)
        assert der is not None
        return der


def _refused(port: int, client: ssl.SSLContext) -> bool:
    """The server refused the handshake: an alert (with TLS 1.3 it arrives with the first read
    after the client's side completed) or the connection closed without an answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_SECONDS) as raw, \
                client.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return conn.recv(4096) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def _client(files: TlsFiles | None, ca_file: str) -> ssl.SSLContext:
    return inner_tls.client_context(files, ca_file=ca_file)


async def test_aiohttp_site_requires_the_gateway_client_certificate(
        pki: Pki, tls_site: tuple[int, ReloadingTls]) -> None:
    """With the gateway's certificate the call works; without one, or with another CA's, the
    TLS handshake fails; plain HTTP gets no answer."""
    port, _ = tls_site
    ca = pki.server.ca_file
    assert await asyncio.to_thread(_handshake, port, _client(pki.client, ca))
    for client in (_client(None, ca), _client(pki.stranger, ca)):
        assert await asyncio.to_thread(_refused, port, client)


async def test_aiohttp_site_reloads_a_rotated_certificate(
        pki: Pki, tls_site: tuple[int, ReloadingTls]) -> None:
    """New files are served to the next connection after a check; a half-written pair keeps the
    old one; an untouched file set is not reloaded."""
    port, tls = tls_site
    client = _client(pki.client, pki.server.ca_file)
    before = await asyncio.to_thread(_handshake, port, client)
    assert tls.check() is False
    fresh = pki.ca.issue_cert("server-x.mcp-gateway.internal", "127.0.0.1")
    fresh.cert_chain_pems[0].write_to_path(pki.server.cert_file)  # key not yet replaced
    assert tls.check() is False and await asyncio.to_thread(_handshake, port, client) == before
    fresh.private_key_pem.write_to_path(pki.server.key_file)
    assert tls.check() is True and tls.reloads == 1
    after = await asyncio.to_thread(_handshake, port, client)
    assert after != before
    assert ssl.DER_cert_to_PEM_cert(after).strip() == fresh.cert_chain_pems[0].bytes().decode().strip()


async def test_watch_reloads_on_its_own(pki: Pki, tls_site: tuple[int, ReloadingTls]) -> None:
    """The watch loop takes the new files without anyone calling check()."""
    _, tls = tls_site
    pki.write(pki.server, pki.ca.issue_cert("server-x.mcp-gateway.internal", "127.0.0.1"))
    async with tls.watch(every=0.05):
        async with asyncio.timeout(DEADLINE_SECONDS):
            while tls.reloads == 0:
                await asyncio.sleep(0.05)  # polling the reload counter with a deadline


async def _grpc_server(files: TlsFiles) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", inner_tls.grpc_server_credentials(files))
    await server.start()
    return server, port


async def _grpc_check(port: int, client: TlsFiles | None, ca_file: str) -> None:
    key = Path(client.key_file).read_bytes() if client else None
    chain = Path(client.cert_file).read_bytes() if client else None
    creds = grpc.ssl_channel_credentials(Path(ca_file).read_bytes(), key, chain)
    async with grpc.aio.secure_channel(
            f"127.0.0.1:{port}", creds,
            options=[("grpc.ssl_target_name_override", "server-x.mcp-gateway.internal")]) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # generated stub: untyped methods
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE_SECONDS)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _served(port: int, client: ssl.SSLContext) -> bytes:
    """The certificate (DER) a TLS server presents to ``client`` (handshake only)."""
    client.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_SECONDS) as raw, \
            client.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        der = conn.getpeercert(binary_form=True)
        assert der is not None
        return der


async def test_grpc_server_requires_the_gateway_client_certificate(pki: Pki) -> None:
    """A grpc.aio server with the inner credentials answers the gateway's client certificate and
    refuses a client without one or with another CA's."""
    server, port = await _grpc_server(pki.server)
    try:
        await _grpc_check(port, pki.client, pki.server.ca_file)
        for client in (None, pki.stranger):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _grpc_check(port, client, pki.server.ca_file)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_grpc_server_takes_rotated_files_on_the_next_connection(pki: Pki) -> None:
    """After the files change, the next connection's handshake gets the new certificate, and
    calls keep working."""
    server, port = await _grpc_server(pki.server)
    try:
        client = _client(pki.client, pki.server.ca_file)
        before = await asyncio.to_thread(_served, port, client)
        fresh = pki.ca.issue_cert("server-x.mcp-gateway.internal", "127.0.0.1")
        pki.write(pki.server, fresh)
        after = await asyncio.to_thread(_served, port, _client(pki.client, pki.server.ca_file))
        assert after != before
        assert ssl.DER_cert_to_PEM_cert(after).strip() == fresh.cert_chain_pems[0].bytes().decode().strip()
        await _grpc_check(port, pki.client, pki.server.ca_file)
    finally:
        await server.stop(None)


def test_catalog_targets_of_our_servers_use_the_inner_certificate(pki: Pki) -> None:
    """With the variables set, a module server's endpoints are https with this process's
    certificate, re-read when rotated; without them, plain http as before."""
    server = load_config().server("files")
    plain = targets(server, {})
    assert all(t.url.startswith("http://") and t.ssl is None for t in plain)
    env = TlsFiles(pki.client.cert_file, pki.client.key_file, pki.server.ca_file).env()
    secured = targets(server, env)
    assert all(t.url.startswith("https://") and t.ssl is not None for t in secured)
    target = secured[0]
    assert target.inner is not None and target.request_kwargs()["ssl"] is target.ssl
    pki.write(pki.client, pki.ca.issue_cert("ext-authz.mcp-gateway.internal"))
    target.request_kwargs()
    assert target.inner.reloads == 1
