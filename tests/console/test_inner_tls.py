"""The console under inner TLS, through a real dev stack (inner_tls on): Envoy reaches it over
mTLS, and it refuses plain text and any client certificate but Envoy's."""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway import inner_tls
from gateway.config import GatewayConfig, load_config
from gateway.console.service_metrics import ClientTls, ServiceMetrics, metrics_targets
from gateway.console.settings import INNER_TLS_IDENTITY
from gatewayctl import devstack
from gatewayctl.devstack import credentials
from tests.e2e.conftest import installed
from tests.e2e.helpers import REPO, authz_transport, stack_config
from tests.ports import free_ports

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devstack.Stack]:
    if not installed("ext_authz.__main__"):
        pytest.skip("needs ext_authz")
    tmp = tmp_path_factory.mktemp("console-inner-tls")
    (tmp / "files-root").mkdir()
    (console_port,) = free_ports(1)
    servers = {"files": {"module": "mcp_servers.files", "count": 1,
                         "args": ["--root", str(tmp / "files-root")]}}
    extra = {"console": {"instances": [{"port": console_port}]}, "inner_tls": {"enabled": True}}
    path = stack_config(tmp, servers=servers, ext_authz=1, extra=extra, authz_transport=authz_transport())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(REPO))
        with devstack.running(load_config(path), ext_proc=False) as running:
            yield running


def _status(port: int, context: ssl.SSLContext, path: str) -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=TIMEOUT, context=context)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def _refused(port: int, context: ssl.SSLContext) -> bool:
    """The handshake failed, or the connection closed without an answer (TLS 1.3 alerts arrive
    with the first read)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            conn.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return conn.recv(4096) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def test_envoy_reaches_the_console_over_mtls(stack: devstack.Stack) -> None:
    """The sign-in page answers through Envoy's TLS listener: Envoy's hop to the console is mTLS
    (the console serves TLS only)."""
    config = stack.config
    edge = ssl.create_default_context(cafile=str(stack.ca_file))
    assert _status(config.listen.port, edge, "/console/login") == 200


def test_the_console_refuses_plain_text_and_other_certificates(stack: devstack.Stack,
                                                               tmp_path: Path) -> None:
    """Plain HTTP gets no HTTP answer; a client without a certificate, or with the certificate
    of another component, is refused; Envoy's certificate is served."""
    config = stack.config
    port = config.console.instances[0].port
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as conn:
        conn.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        try:
            reply = conn.recv(4096)
        except ConnectionResetError:
            reply = b""
    assert not reply.startswith(b"HTTP/")
    it = config.inner_tls
    anonymous = inner_tls.client_context(None, ca_file=it.ca_file, check_hostname=False)
    assert _refused(port, anonymous)
    ext_proc = inner_tls.client_context(it.files(inner_tls.EXT_PROC), check_hostname=False)
    assert _refused(port, ext_proc)
    envoy = inner_tls.client_context(it.files(inner_tls.ENVOY), check_hostname=False)
    assert _status(port, envoy, "/ready") == 200
    assert it.san(INNER_TLS_IDENTITY) == f"console.{it.domain}"


def _console_client_files(config: GatewayConfig, folder: Path) -> inner_tls.TlsFiles:
    """The console's identity with the client usage (the dev stack issues the console's
    certificate for serving only: see docs/console.md, "Not done yet")."""
    ca_key, ca_cert = credentials._dev_ca(config)
    key, cert = credentials._issue(ca_key, ca_cert, config.inner_tls.san(INNER_TLS_IDENTITY),
                                   [config.inner_tls.san(INNER_TLS_IDENTITY)],
                                   [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    files = inner_tls.TlsFiles(str(folder / "console.pem"), str(folder / "console.key"),
                               config.inner_tls.ca_file)
    Path(files.key_file).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    Path(files.cert_file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


async def test_the_console_reads_the_servers_metrics_with_its_own_certificate(
        stack: devstack.Stack, tmp_path: Path) -> None:
    """Under inner_tls the console's identity is admitted on a server's GET /metrics (the
    overview's scrape finds it up, over mTLS with the server's name checked) and on nothing else
    of it."""
    config = stack.config
    targets = [t for t in metrics_targets(config) if t.component == "files"]
    assert targets and all(t.url.startswith("https://") for t in targets)
    files = _console_client_files(config, tmp_path)
    tls = ClientTls(files)
    async with aiohttp.ClientSession() as http:
        sm = ServiceMetrics(targets, http, interval=5, keep=2, timeout=TIMEOUT, client_tls=tls)
        await sm.scrape_once()
        (view,) = sm.views()
        assert view.up, view.error
        assert set(view.rates) == {"calls_ok", "calls_failed"}
    port = next(s for s in config.servers if s.name == "files").instances[0].port
    console = inner_tls.client_context(files, check_hostname=False)
    assert _status(port, console, "/metrics") == 200
    assert _status(port, console, "/ready") == 403
